r"""Simulation-based checks of an inference method: VSBC for VI, SBC for NUTS.

For :math:`m = 1..M`: draw :math:`\theta^{(m)} \sim p(\theta)` and
:math:`y^{(m)} \sim p(y \mid \theta^{(m)})` from the model itself (its observed sites
unconditioned), fit the method to :math:`y^{(m)}`, and record for every scalar parameter
:math:`\theta_j` where the truth falls in the fitted posterior.

**VSBC** (VI methods). The posterior quantile :math:`p_{jm} = \Pr_q(\theta_j < \theta_j^{(m)})`
from ``num_draws`` draws of the fitted guide. If the method's marginal for :math:`\theta_j` is
unbiased, the :math:`p_{jm}` are symmetric about 1/2 (Yao et al., Theorem 1). Test, as in the
paper: the two-sample Kolmogorov-Smirnov test of :math:`\{p_{jm}\}_m` against
:math:`\{1 - p_{jm}\}_m`. The mean of :math:`p_{jm}` says which way: above 1/2, the truth tends
to lie above the fitted posterior (the method underestimates :math:`\theta_j`).

Symmetry is all VSBC asks of VI (an approximation need not be calibrated), so a method that is
over-confident in both directions passes it. The table therefore also holds
``uniformity_p_value``, the one-sample KS test of the quantiles against Uniform(0, 1) (what a
calibrated posterior gives); it informs the verdict's wording, not the flag.

**SBC** (``method="nuts"``). The rank of :math:`\theta_j^{(m)}` among :math:`L` posterior draws
thinned evenly from all chains, uniform on :math:`\{0..L\}` for a calibrated sampler (Talts et
al.). Test: Pearson's chi-square of the ranks in ``num_bins`` equal bins against uniform.

**Failure budget.** Each of the :math:`J` parameters is flagged when its p-value is below
:math:`\alpha / J` (Bonferroni): for a calibrated method the chance that any parameter is
flagged is at most :math:`\alpha` (default 0.05), up to the tests' own approximation (KS's
two samples are mirror images, not independent; SBC ranks assume thinned draws that are nearly
independent).

References:
    Yes, but did it work?: Evaluating variational inference, Yao, Vehtari, Simpson and Gelman,
    ICML 2018, arXiv:1802.02538 (Section 4, VSBC).
    Validating Bayesian inference algorithms with simulation-based calibration, Talts,
    Betancourt, Simpson, Vehtari and Gelman, 2018, arXiv:1804.06788.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from scipy import stats
from tqdm.auto import tqdm

from vilab.samples import flatten_samples
from vilab.inference.common.validation import check_model, check_positive_int, check_probability
from vilab.types import Model

__all__ = ["CalibrationResult", "calibrate", "simulate", "vsbc_test", "sbc_test"]


@dataclass
class CalibrationResult:
    """What :func:`calibrate` returns.

    Attributes:
        method: the method checked; test: ``"VSBC"`` or ``"SBC"``.
        statistics: flat parameter -> ``(M,)`` posterior quantiles (VSBC) or ranks (SBC).
        table: one row per parameter: ``statistic`` (KS or chi-square), ``p_value``,
            ``threshold`` (:math:`\\alpha/J`), ``flagged``, ``mean_quantile`` and ``verdict``.
        alpha: the family failure budget; num_simulations: fits that succeeded.
        failures: simulation index -> why its fit failed (left out of the tests).
        wall_time: seconds in all.
        num_ranks: SBC's :math:`L + 1`.
        unconverged: simulations whose fit did not report convergence (VI: the method's own
            ``converged``; NUTS: a divergence). They stay in the tests: a method that cannot
            fit the data the prior generates is part of what VSBC measures, but a flag driven by
            them says "did not converge" rather than "biased".
    """

    method: str
    test: str
    statistics: dict[str, np.ndarray]
    table: pd.DataFrame
    alpha: float
    num_simulations: int
    failures: dict[int, str] = field(default_factory=dict)
    wall_time: float = 0.0
    num_ranks: Optional[int] = None
    unconverged: list[int] = field(default_factory=list)

    @property
    def flagged(self) -> list[str]:
        """The parameters whose test failed."""
        return list(self.table.loc[self.table["flagged"], "parameter"])

    def save(self, directory: str) -> str:
        """Write ``calibration.json``, ``calibration.csv`` and ``calibration.png`` to ``directory``."""
        from vilab.inference.comparison.calibration_plots import plot_calibration

        os.makedirs(directory, exist_ok=True)
        self.table.to_csv(os.path.join(directory, "calibration.csv"), index=False)
        record = {
            "method": self.method,
            "test": self.test,
            "alpha": self.alpha,
            "num_simulations": self.num_simulations,
            "failures": {str(k): v for k, v in self.failures.items()},
            "wall_time": self.wall_time,
            "unconverged": self.unconverged,
            "parameters": self.table.to_dict(orient="records"),
            "statistics": {k: v.tolist() for k, v in self.statistics.items()},
        }
        with open(os.path.join(directory, "calibration.json"), "w") as handle:
            json.dump(record, handle, indent=1, default=float)
        plot_calibration(self, os.path.join(directory, "calibration.png"))
        return directory


def simulate(
    model: Model, args: tuple, kwargs: dict, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One draw of the latent sites from the prior and of the observed sites given them.

    Returns:
        ``(latents, observations)``: site -> value, from one run of the model with its
        observed sites unconditioned.
    """
    trace = check_model(model, args, kwargs)
    observed = [n for n, s in trace.nodes.items() if s["type"] == "sample" and s["is_observed"]]
    with torch.random.fork_rng():
        pyro.set_rng_seed(seed)
        simulated = poutine.trace(poutine.uncondition(model)).get_trace(*args, **kwargs)
    latents = {
        n: s["value"].detach()
        for n, s in simulated.nodes.items()
        if s["type"] == "sample"
        and n in trace.nodes
        and not trace.nodes[n]["is_observed"]
        and not site_is_subsample(s)
        and not s["infer"].get("_deterministic", False)
    }
    return latents, {n: simulated.nodes[n]["value"].detach() for n in observed}


def vsbc_test(quantiles: np.ndarray) -> tuple[float, float]:
    """KS statistic and p-value of ``quantiles`` ``(M,)`` against their mirror ``1 - quantiles``."""
    result = stats.ks_2samp(quantiles, 1.0 - quantiles)
    return float(result.statistic), float(result.pvalue)


def sbc_test(ranks: np.ndarray, num_ranks: int, num_bins: int) -> tuple[float, float]:
    """Chi-square statistic and p-value of ``ranks`` in ``{0..num_ranks - 1}`` against uniform,
    in ``num_bins`` equal bins."""
    counts = np.bincount((ranks * num_bins) // num_ranks, minlength=num_bins)
    result = stats.chisquare(counts)
    return float(result.statistic), float(result.pvalue)


def _fit_quantiles(model, args, kwargs, method, truth, num_draws, seed, options) -> dict[str, float]:
    from vilab.inference.svi.api import fit_svi

    result = fit_svi(model, method, *args, seed=seed, progress=False, **options, **kwargs)
    draws = flatten_samples({k: v for k, v in result.sample(num_draws, seed=seed).items() if k in truth}, 1)
    flat_truth = flatten_samples({k: v.unsqueeze(0) for k, v in truth.items()}, 1)
    # Ties (a truth equal to draws, e.g. at a boundary) count half, so p stays symmetric.
    quantiles = {
        name: float(np.mean(draws[name] < flat_truth[name][0]) + 0.5 * np.mean(draws[name] == flat_truth[name][0]))
        for name in flat_truth
    }
    return quantiles, bool(result.converged)


def _nuts_ranks(model, args, kwargs, truth, num_ranks, seed, options) -> dict[str, float]:
    from vilab.inference.nuts.api import run_nuts

    result = run_nuts(model, *args, seed=seed, progress=False, **options, **kwargs)
    flat = {
        k: v.reshape(-1) for k, v in flatten_samples({k: v for k, v in result.samples.items() if k in truth}, 2).items()
    }
    flat_truth = flatten_samples({k: v.unsqueeze(0) for k, v in truth.items()}, 1)
    keep = np.linspace(0, len(next(iter(flat.values()))) - 1, num_ranks - 1).round().astype(int)
    ranks = {name: float(np.sum(flat[name][keep] < flat_truth[name][0])) for name in flat_truth}
    return ranks, result.num_divergences == 0


def _check_options(method, num_simulations, num_draws, alpha, num_bins, num_ranks):
    if not isinstance(method, str):
        raise TypeError(f"method: expected a method name such as 'meanfield' or 'nuts'; got {type(method).__name__}")
    check_positive_int(num_simulations, "num_simulations", minimum=10)
    check_positive_int(num_draws, "num_draws", minimum=10)
    check_probability(alpha, "alpha")
    check_positive_int(num_bins, "num_bins", minimum=2)
    if not isinstance(num_ranks, int) or num_ranks % num_bins:
        raise ValueError(f"num_ranks: expected a multiple of num_bins ({num_bins}); got {num_ranks!r}")


def calibrate(
    model: Model,
    *args: Any,
    method: str = "meanfield",
    num_simulations: int = 100,
    num_draws: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    method_options: Optional[dict] = None,
    num_bins: int = 10,
    num_ranks: int = 100,
    progress: bool = True,
    **kwargs: Any,
) -> CalibrationResult:
    r"""VSBC of a VI method (or SBC of ``method="nuts"``) on ``model(*args, **kwargs)``.

    Args:
        model: a Pyro model; ``*args, **kwargs`` its data (the observed values are replaced by
            simulated ones; their shapes are kept).
        method: a ``fit_svi`` guide or method name (``"meanfield"``, ``"fullrank"``,
            ``"pathfinder"``, ``"bam"``...) or ``"nuts"``.
        num_simulations: :math:`M`, prior simulations (one fit each).
        num_draws: guide draws per fit for the quantiles (VSBC).
        seed: simulation :math:`m` uses seed ``seed + m`` for the prior draw and the fit.
        alpha: family failure budget (Bonferroni over parameters).
        method_options: keyword options of ``fit_svi`` (e.g. ``{"num_steps": 1000}``) or of
            ``run_nuts`` (e.g. ``{"num_samples": 500, "num_chains": 2}``).
        num_bins, num_ranks: SBC's chi-square bins and :math:`L + 1` (``num_ranks - 1``
            thinned draws per fit; a multiple of ``num_bins``).

    Returns:
        A :class:`CalibrationResult`; ``result.save(directory)`` writes its table and plot.
    """
    _check_options(method, num_simulations, num_draws, alpha, num_bins, num_ranks)
    check_model(model, args, kwargs)
    start, options = time.perf_counter(), dict(method_options or {})
    collected: dict[str, list[float]] = {}
    failures: dict[int, str] = {}
    unconverged: list[int] = []
    for m in tqdm(range(num_simulations), desc=f"calibrate {method}", disable=not progress):
        truth, observations = simulate(model, args, kwargs, seed + m)
        conditioned = poutine.condition(model, data=observations)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # per-fit warnings would flood; failures are kept
                values, converged = (
                    _nuts_ranks(conditioned, args, kwargs, truth, num_ranks, seed + m, options)
                    if method == "nuts"
                    else _fit_quantiles(conditioned, args, kwargs, method, truth, num_draws, seed + m, options)
                )
        except (ValueError, RuntimeError, FloatingPointError) as error:
            failures[m] = f"{type(error).__name__}: {error}"
            continue
        if not converged:
            unconverged.append(m)
        for name, value in values.items():
            collected.setdefault(name, []).append(value)
    if not collected:
        raise RuntimeError(f"calibrate: every fit failed; first: {next(iter(failures.values()))}")
    statistics = {name: np.asarray(values) for name, values in collected.items()}
    table = _table(statistics, method, alpha, num_bins, num_ranks)
    return CalibrationResult(
        method,
        "SBC" if method == "nuts" else "VSBC",
        statistics,
        table,
        alpha,
        num_simulations - len(failures),
        failures,
        time.perf_counter() - start,
        num_ranks if method == "nuts" else None,
        unconverged,
    )


def _table(statistics, method, alpha, num_bins, num_ranks) -> pd.DataFrame:
    threshold = alpha / len(statistics)
    rows = []
    for name, values in statistics.items():
        if method == "nuts":
            statistic, p_value = sbc_test(values.astype(int), num_ranks, num_bins)
            mean_quantile = float(values.mean() / (num_ranks - 1))
            uniformity = p_value
        else:
            statistic, p_value = vsbc_test(values)
            mean_quantile = float(values.mean())
            uniformity = float(stats.kstest(values, "uniform").pvalue)
        flagged = p_value < threshold
        rows.append(
            {
                "parameter": name,
                "statistic": statistic,
                "p_value": p_value,
                "threshold": threshold,
                "flagged": flagged,
                "mean_quantile": mean_quantile,
                "uniformity_p_value": uniformity,
                "verdict": _verdict(flagged, mean_quantile, method, uniformity < threshold),
            }
        )
    return pd.DataFrame(rows)


def _verdict(flagged: bool, mean_quantile: float, method: str, not_uniform: bool = False) -> str:
    if not flagged:
        return (
            "passed (symmetric, but not calibrated: quantiles not uniform)"
            if not_uniform and method != "nuts"
            else "passed"
        )
    if method == "nuts":
        return "flagged: ranks not uniform (the sampler's posterior is miscalibrated)"
    side = "under" if mean_quantile > 0.5 else "over"
    return f"flagged: quantiles asymmetric (mean {mean_quantile:.2f}); the method tends to {side}estimate it"
