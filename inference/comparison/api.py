r"""``compare``: several guides and NUTS on one model, measured against a reference posterior.

For each method and each scalar parameter :math:`\theta_j` with reference mean :math:`m_j` and
sd :math:`s_j`, the table holds the mean error in reference sds :math:`(\hat m_j - m_j)/s_j`,
the sd ratio :math:`\hat s_j / s_j`, and the 1-Wasserstein distance between the method's and
the reference's marginal draws (also in units of :math:`s_j`). Per method, the summary adds
PSIS :math:`\hat k`, the ELBO and whether the fit passed its convergence test for guides, ESS/s,
R-hat and divergences for NUTS, and for every method ``gradient_evaluations``: the log-density
gradients it spent (``result.config["gradient_evaluations"]``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from scipy.stats import wasserstein_distance

from vilab.guides.registry import guide_name
from vilab.inference.common.arguments import check_no_learned_params
from vilab.inference.comparison.arguments import check_compare_arguments, method_names
from vilab.inference.common.diagnostics import k_hat_verdict, nuts_diagnostics, psis, weighted_moments
from vilab.inference.nuts.api import NUTSResult, run_nuts
from vilab.samples import flatten_samples, masked_out_names, match_reference, to_numpy
from vilab.inference.svi.api import LaplaceError, NonFiniteLossError, SVIResult, fit_svi
from vilab.inference.common.validation import check_model, check_positive_int, keyword_options
from vilab.types import Model

__all__ = ["MethodResult", "ComparisonReport", "compare", "reference_from_draws"]


@dataclass
class MethodResult:
    """One method's draws (flat names -> 1-D arrays) and its per-method numbers."""

    name: str
    kind: str  # "vi" or "nuts"
    draws: dict[str, np.ndarray]
    result: SVIResult | NUTSResult
    inference_data: Any
    metrics: dict[str, Any] = field(default_factory=dict)
    log_weights: Optional[np.ndarray] = None


@dataclass
class ComparisonReport:
    """What ``compare`` returns: ``table`` (one row per method and parameter), ``summary`` (one
    row per method), the methods themselves and the reference draws."""

    table: pd.DataFrame
    summary: pd.DataFrame
    methods: dict[str, MethodResult]
    reference: dict[str, np.ndarray]
    reference_name: str
    title: str = "vilab comparison"
    failures: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # recorded in run.json by save()

    def save(self, directory: str) -> "Any":
        """Write metrics JSON, CSV tables, NetCDF InferenceData per method, PNG plots and a
        report page into ``directory``; returns its path.

        The folder is written whole (built beside it, then swapped into place): an earlier
        report there is replaced, and a crash leaves it untouched. A file, or a folder holding
        anything but a report, is refused with a ``ValueError`` before anything is written."""
        from vilab.inference.report.save import save_report

        return save_report(self, directory)


def reference_from_draws(model: Model, args: tuple, kwargs: dict, draws: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flatten reference draws given per site (``(..., *site_shape)``) or per flat name."""
    trace = check_model(model, args, kwargs, allow_enumerated=True)
    flat: dict[str, np.ndarray] = {}
    for name, value in draws.items():
        array = to_numpy(value)
        node = trace.nodes.get(name)
        site_shape = tuple(np.shape(to_numpy(node["value"]))) if node is not None else ()
        if site_shape and array.shape[-len(site_shape) :] == site_shape:
            batch = array.ndim - len(site_shape)
            flat.update({k: v.reshape(-1) for k, v in flatten_samples({name: array}, batch).items()})
        else:
            flat[name] = array.reshape(-1)
    return flat


def _is_parameter(reference: np.ndarray) -> bool:
    """Whether a flat name varies under the reference: entries of a ``pyro.deterministic`` site
    that equal data (the observed entries of an ``obs_mask`` site) are constants, and errors in
    units of their zero sd do not exist."""
    finite = reference[np.isfinite(reference)]
    return finite.size > 1 and float(np.ptp(finite)) > 0


def _moments(values: np.ndarray) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1))


def _rows(method: MethodResult, reference: dict[str, np.ndarray]) -> list[dict]:
    names = [name for name in match_reference(method.draws, reference) if _is_parameter(reference[name])]
    reweighted = (
        weighted_moments({n: method.draws[n] for n in names}, method.log_weights)
        if method.log_weights is not None and np.isfinite(method.metrics.get("k_hat", np.nan))
        else {}
    )
    lrvb_sd = (getattr(method.result, "config", None) or {}).get("lrvb_sd") or {}
    rows = []
    for name in names:
        mean, sd = _moments(method.draws[name])
        ref_mean, ref_sd = _moments(reference[name])
        w1 = wasserstein_distance(method.draws[name], reference[name])
        row = {
            "method": method.name,
            "parameter": name,
            "mean": mean,
            "sd": sd,
            "ref_mean": ref_mean,
            "ref_sd": ref_sd,
            "mean_error_sd": (mean - ref_mean) / ref_sd,
            "sd_ratio": sd / ref_sd,
            "wasserstein": w1,
            "wasserstein_sd": w1 / ref_sd,
        }
        if name in reweighted:
            row["psis_mean_error_sd"] = (reweighted[name][0] - ref_mean) / ref_sd
            row["psis_sd_ratio"] = reweighted[name][1] / ref_sd
        if name in lrvb_sd:  # DADVI's linear-response sd, beside the mean-field sd
            row["lrvb_sd"], row["lrvb_sd_ratio"] = lrvb_sd[name], lrvb_sd[name] / ref_sd
        rows.append(row)
    return rows


def _fit_guide(model, args, kwargs, guide, name, seed, num_draws, svi_options, guide_options, progress) -> MethodResult:
    from vilab.inference.svi.methods import is_method

    # svi_options are SVI's (steps, lr, ...); a method that is not SVI on a guide takes its own
    # options from guide_options, and fit_svi refuses SVI options given to it.
    options = {} if is_method(guide) else dict(svi_options or {})
    result = fit_svi(
        model,
        guide,
        *args,
        seed=seed,
        progress=progress,
        guide_options=(guide_options or {}).get(guide_name(guide)),
        **options,
        **kwargs,
    )
    draws = result.draws(num_draws, seed=seed)
    samples, log_weights = draws.samples, to_numpy(draws.log_weights)
    smoothed = psis(log_weights)
    idata = result.inference_data(draws=draws)
    metrics = {
        "kind": "vi",
        "k_hat": smoothed.k_hat,
        "k_hat_verdict": k_hat_verdict(smoothed.k_hat),
        "psis_ess": smoothed.ess,
        "elbo": float(np.mean(log_weights)),
        "elbo_se": float(np.std(log_weights) / np.sqrt(len(log_weights))),
        "final_loss": float(np.mean(result.losses[-50:])),
        "num_steps": result.num_steps,
        "converged": result.converged,
        "wall_time": result.wall_time,
        "gradient_evaluations": result.config.get("gradient_evaluations"),
        "convergence": result.config.get("convergence", {}).get("reason", ""),
    }
    flat = {k: v.reshape(-1) for k, v in flatten_samples(samples, 1).items()}
    return MethodResult(name, "vi", flat, result, idata, metrics, smoothed.log_weights)


def _nuts_method(nuts: NUTSResult) -> MethodResult:
    flat = {k: v.reshape(-1) for k, v in flatten_samples(nuts.samples, 2).items()}
    diagnostics = nuts_diagnostics(nuts.inference_data)
    metrics = {
        "kind": "nuts",
        "wall_time": nuts.wall_time,
        **diagnostics,
        "gradient_evaluations": nuts.config.get("gradient_evaluations"),
        "ess_per_second": diagnostics["ess_bulk_min"] / max(nuts.wall_time, 1e-9),
    }
    return MethodResult("nuts", "nuts", flat, nuts, nuts.inference_data, metrics)


def compare(
    model: Model,
    *args: Any,
    guides: Sequence[Any] = ("meanfield", "fullrank", "iaf"),
    reference: Optional[NUTSResult | Mapping[str, Any]] = None,
    include_nuts: bool = False,
    seed: int = 0,
    num_draws: int = 4000,
    svi_options: Optional[dict] = None,
    nuts_options: Optional[dict] = None,
    guide_options: Optional[dict[str, dict]] = None,
    reference_name: Optional[str] = None,
    progress: bool = True,
    **kwargs: Any,
) -> ComparisonReport:
    r"""Fit every guide in ``guides`` and measure each against a reference posterior.

    Args:
        model: a Pyro model; ``*args, **kwargs`` are its data.
        guides: registry names or guide objects. Two guides with one name (two ``AutoNormal``
            objects) are told apart as ``AutoNormal``, ``AutoNormal_2``, ... everywhere.
        reference: a :class:`NUTSResult`, or reference draws (site or flat name ->
            array; flat names like ``"theta[1]"`` allowed). ``None`` runs NUTS first and uses it.
        include_nuts: with external reference draws, also run NUTS and score it.
        num_draws: guide draws used for the metrics and PSIS; the Pareto :math:`\hat k` of a
            near-exact guide is itself noisy with a few thousand draws, hence the default.
        seed: an int (NUTS chains take ``seed, seed + 1, ...``; every guide is fitted from
            ``seed``).
        svi_options: keyword options for :func:`fit_svi` (``num_steps``, ``lr``, ``elbo``...), for the
            guides fitted by SVI; methods such as ``dadvi`` or ``pathfinder`` take theirs from
            ``guide_options``.
        nuts_options: keyword options for :func:`run_nuts` (``num_samples``, ``num_chains``...).
        guide_options: per guide name, options of its family (``{"iaf": {"num_flows": 4}}``).

    A model with enumerated discrete sites (``config_enumerate``, as in Pyro's mixture
    tutorial) is compared on its continuous sites: NUTS and each guide (fitted with
    ``TraceEnum_ELBO``) sum the discrete sites out; their draws of them come from the
    conditional posterior given each continuous draw, and PSIS weights use the marginal density.

    Every guide, option name and seed is checked before anything runs. A model with
    ``pyro.param`` sites is refused: NUTS would condition on whatever value Pyro's param store
    holds while each guide learns its own, so the methods would not share one posterior.

    Returns:
        A :class:`ComparisonReport`. A guide whose fit fails for any reason (non-finite loss,
        no Laplace approximation at a degenerate mode, an error inside the model) is left out
        with a ``RuntimeWarning`` and its reason kept in ``report.failures`` and in the
        report's warnings; the other methods are kept.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> y = torch.linspace(2.0, 4.0, 20)  # posterior of mu: mean 3.0, sd 0.22
        >>> from vilab.inference import compare
        >>> report = compare(model, y, guides=("meanfield",), num_draws=500, progress=False,
        ...                  nuts_options={"num_samples": 200, "num_warmup": 200, "num_chains": 2,
        ...                                "chain_method": "sequential"},
        ...                  svi_options={"num_steps": 1000, "lr": 0.1})
        >>> list(report.summary.index)
        ['nuts', 'meanfield']
    """
    check_positive_int(num_draws, "num_draws", minimum=10)
    check_compare_arguments(
        model,
        kwargs,
        guides=guides,
        seed=seed,
        svi_options=svi_options,
        nuts_options=nuts_options,
        guide_options=guide_options,
        compare_options=keyword_options(compare),
    )
    trace = check_model(model, args, kwargs, allow_enumerated=True)
    check_no_learned_params(trace, "compare")
    names = method_names(guides)
    methods: dict[str, MethodResult] = {}
    if reference is None or isinstance(reference, NUTSResult):
        nuts = (
            reference
            if reference is not None
            else run_nuts(model, *args, seed=seed, progress=progress, **(nuts_options or {}), **kwargs)
        )
        methods["nuts"] = _nuts_method(nuts)
        reference_draws, reference_name = methods["nuts"].draws, reference_name or "nuts"
    elif isinstance(reference, Mapping):
        reference_draws = reference_from_draws(model, args, kwargs, reference)
        reference_name = reference_name or "reference draws"
        if include_nuts:
            methods["nuts"] = _nuts_method(
                run_nuts(model, *args, seed=seed, progress=progress, **(nuts_options or {}), **kwargs)
            )
    else:
        raise TypeError(f"reference: expected None, a NUTSResult or a dict of draws; got {type(reference).__name__}")
    failures: dict[str, str] = {}
    for guide, name in zip(guides, names):
        try:
            methods[name] = _fit_guide(
                model, args, kwargs, guide, name, seed, num_draws, svi_options, guide_options, progress
            )
        except Exception as error:  # noqa: BLE001 -- KeyboardInterrupt and SystemExit still end the run
            # One guide that cannot be fitted must not cost the user the others' results (NUTS's
            # above all); the reason stays in the report.
            reason = (
                str(error)
                if isinstance(error, (NonFiniteLossError, LaplaceError))
                else f"{type(error).__name__}: {error}"
            )
            failures[name] = reason
            warnings.warn(f"compare: guide {name!r} failed and is left out: {reason}", RuntimeWarning, stacklevel=2)
    ignored = masked_out_names(trace)
    reference_draws = {k: v for k, v in reference_draws.items() if k not in ignored}
    return _build_report(methods, reference_draws, reference_name, failures)


def _build_report(methods, reference_draws, reference_name, failures=None) -> ComparisonReport:
    rows = []
    for method in methods.values():
        if method.kind == "nuts" and reference_name == "nuts":
            continue  # NUTS is the reference here: its errors against itself are zero by construction
        rows.extend(_rows(method, reference_draws))
    table = pd.DataFrame(rows)
    summary = []
    for name, method in methods.items():
        part = table[table["method"] == name] if len(table) else table
        entry = {"method": name, **method.metrics}
        if len(part):
            entry.update(
                mean_abs_error_sd=float(part["mean_error_sd"].abs().mean()),
                max_abs_error_sd=float(part["mean_error_sd"].abs().max()),
                mean_abs_log_sd_ratio=float(np.log(part["sd_ratio"]).abs().mean()),
                mean_wasserstein_sd=float(part["wasserstein_sd"].mean()),
            )
            if "lrvb_sd_ratio" in part and part["lrvb_sd_ratio"].notna().any():
                entry["mean_abs_log_lrvb_sd_ratio"] = float(np.log(part["lrvb_sd_ratio"]).abs().mean())
        summary.append(entry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # Every method may have failed: the report still says why (``failures``).
        summary_frame = pd.DataFrame(summary, columns=None if summary else ["method"]).set_index("method")
    return ComparisonReport(
        table, summary_frame, methods, reference_draws, reference_name, failures=dict(failures or {})
    )
