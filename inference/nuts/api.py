r"""``run_nuts``: the No-U-Turn sampler on a Pyro model, returned as a plain record.

Chains run in separate processes when the machine has more than one core (forked, so models
defined in a notebook work): the vectorized sampler's one batch of chains per core, Pyro's one
process per chain; else in this process. Each chain records per-draw statistics so
ArviZ can compute R-hat, bulk/tail ESS, MCSE and E-BFMI.

References:
    Hoffman & Gelman, "The No-U-Turn Sampler", 2014, arXiv:1111.4246.
    Betancourt, "A Conceptual Introduction to Hamiltonian Monte Carlo", 2017, arXiv:1701.02434.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import arviz as az
import numpy as np
import pyro
import torch
from pyro.infer.autoguide.initialization import init_to_value
from pyro.infer.mcmc import MCMC

from vilab.inference.common.arviz_io import to_inference_data
from vilab.inference.engine.api import VectorizationError, available_workers, resolve_compiler, run_chains
from vilab.inference.nuts.sampler import sample_vectorized_nuts
from vilab.inference.common.model_handlers import for_inference
from vilab.inference.nuts.pyro_backend import RecordingNUTS, stats_dtype
from vilab.inference.common.tracing import evaluate_draws, is_posterior_site
from vilab.inference.common.validation import (
    check_init_values,
    check_model,
    check_model_kwargs,
    check_positive_int,
    check_probability,
    check_seed,
    keyword_options,
)
from vilab.types import Model, Samples

__all__ = ["NUTSResult", "run_nuts", "check_nuts_options"]


# Rank-normalised split R-hat above this says the chains have not mixed (Vehtari et al., 2021).
MAX_R_HAT = 1.01


def _warn_if_chains_disagree(idata) -> None:
    """A ``RuntimeWarning`` naming the worst site where split R-hat exceeds :data:`MAX_R_HAT`:
    chains stuck in different modes give draws whose mean is no posterior's."""
    posterior = idata.posterior
    if posterior.sizes.get("chain", 1) < 2 or posterior.sizes.get("draw", 0) < 4:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant sites: R-hat is NaN
        r_hat = az.rhat(posterior)
    worst = {name: float(np.nanmax(value.values)) for name, value in r_hat.data_vars.items() if value.size}
    worst = {name: value for name, value in worst.items() if np.isfinite(value)}
    if worst and max(worst.values()) > MAX_R_HAT:
        name = max(worst, key=lambda site: worst[site])
        warnings.warn(
            f"run_nuts: R-hat {worst[name]:.3g} > {MAX_R_HAT} at site {name!r}: the chains disagree "
            "(stuck in different modes, or not yet mixed), so these draws do not represent the "
            "posterior. Run longer, start the chains elsewhere (init_values) or reparameterise.",
            RuntimeWarning,
            stacklevel=3,
        )


@dataclass
class NUTSResult:
    """What ``run_nuts`` returns.

    Attributes:
        samples: site -> ``(chain, draw, *site_shape)``, latent and deterministic sites.
        sample_stats: statistic -> ``(chain, draw)`` array.
        inference_data: ``arviz.InferenceData`` with posterior, sample_stats,
            log_likelihood and observed_data.
        wall_time: seconds, warmup and sampling of all chains.
        num_divergences: divergent transitions after warmup, over all chains.
        config: the run's settings; ``gradient_evaluations`` counts potential gradients (leapfrog
            steps, warmup included, all chains).
    """

    samples: Samples
    sample_stats: dict[str, np.ndarray]
    inference_data: az.InferenceData
    wall_time: float
    num_divergences: int
    config: dict = field(default_factory=dict)

    def summary(self, **kwargs) -> "Any":
        """ArviZ's summary table (mean, sd, HDI, MCSE, bulk/tail ESS, R-hat)."""
        return az.summary(self.inference_data, **kwargs)


def _chain_worker(model, args, kwargs, config, chain, report):
    """One chain in this process: returns (latent draws as numpy, stats)."""
    pyro.set_rng_seed(config["seed"] + chain)
    init = config.get("init_values") or {}
    kernel = RecordingNUTS(
        model,
        target_accept_prob=config["target_accept"],
        full_mass=config["dense_mass"],
        max_tree_depth=config["max_tree_depth"],
        jit_compile=config["jit"],
        ignore_jit_warnings=True,
        init_strategy=init_to_value(values={name: value[chain] for name, value in init.items()}),
    )
    stats = {k: [] for k in ("energy", "lp", "n_steps", "tree_depth", "step_size", "acceptance_rate", "diverging")}
    warmup_steps = [0]

    def hook(kernel, params, stage, i):
        report(1)
        if stage != "Sample":
            warmup_steps[0] += int(kernel.last_stats["n_steps"])
        else:
            for key, value in kernel.last_stats.items():
                stats[key].append(value)

    mcmc = MCMC(
        kernel,
        num_samples=config["num_samples"],
        warmup_steps=config["num_warmup"],
        num_chains=1,
        hook_fn=hook,
        disable_progbar=True,
    )
    mcmc.run(*args, **kwargs)
    draws = {k: v.detach().cpu().numpy() for k, v in mcmc.get_samples().items()}
    return draws, {k: np.asarray(v, dtype=stats_dtype(k)) for k, v in stats.items()}, warmup_steps[0]


def run_nuts(
    model: Model,
    *args: Any,
    num_samples: int = 1000,
    num_warmup: int = 1000,
    num_chains: int = 4,
    seed: int = 0,
    target_accept: float = 0.8,
    dense_mass: bool = False,
    max_tree_depth: int = 10,
    jit: bool = False,
    chain_method: str = "auto",
    backend: str = "auto",
    compiler: str = "auto",
    progress: bool = True,
    init_values: Optional[dict] = None,
    init: Optional[str] = None,
    **kwargs: Any,
) -> NUTSResult:
    r"""Sample ``model(*args, **kwargs)``'s posterior with NUTS.

    Args:
        model: a Pyro model; discrete latent sites must be marked for enumeration
            (``config_enumerate``): NUTS sums them out, and each kept draw then gets a draw of
            them from their conditional posterior given its continuous values (Pyro's
            ``infer_discrete``), in ``samples`` and the InferenceData, with the log-likelihood
            computed given that draw. A subsampled ``pyro.plate`` runs over its full size here
            (NUTS needs the full data's density); ``ImproperUniform`` sites start uniformly in
            (-2, 2) on the unconstrained space, like every site without ``init_values``.
        num_samples, num_warmup: draws kept, and adaptation steps discarded, per chain.
        num_chains: independent chains (seeds ``seed, seed + 1, ...``).
        seed: an int in ``[0, 2**32 - 1]``.
        target_accept: target acceptance probability of step-size adaptation.
        dense_mass: adapt a dense (full) mass matrix instead of a diagonal one.
        max_tree_depth: at most :math:`2^{d}-1` leapfrog steps per draw.
        jit: compile the potential with ``torch.jit`` (Pyro's ``jit_compile``; ``pyro`` backend).
        chain_method: how the chains share the cores. ``"parallel"``: forked processes (the
            ``pyro`` backend: one per chain; the vectorized sampler: one batch of chains per
            core, :mod:`~vilab.inference.engine.processes.workers`); ``"sequential"``: this process only
            (one chain after another; the vectorized sampler: all chains as one batch); ``"auto"``:
            parallel where more than one core is available. The vectorized sampler's draws
            depend on the batches (``result.config["workers"]``).
        backend: ``"vectorized"`` advances all chains at once in one batched, traced program
            (:mod:`vilab.inference.nuts.sampler`); ``"pyro"`` runs Pyro's NUTS per chain; ``"auto"``
            uses the vectorized sampler when the model passes its batching checks and otherwise
            falls back to Pyro's NUTS with a warning.
        compiler: for the vectorized sampler, how its traced leapfrog leaf runs:
            ``"graph"`` (the traced graph as ``torch.fx`` code, no compilation), ``"vm"`` (a
            small virtual machine: milliseconds to translate, several times faster per leaf),
            ``"inductor"`` (one fused C++ kernel per leaf: about 4x faster per leaf, seconds to
            compile, needs ``g++``), or ``"auto"``: the virtual machine, switching to Inductor
            once the run's pace shows the compilation will pay for itself (compiled in a
            background process where a second core is free), or ``"eager"``: the engine off,
            plain eager PyTorch (also forced by the environment variable ``VILAB_ENGINE=off``).
            ``result.config["leaf_backend"]`` and ``["fuse_decision"]`` say what ran and why.
        init_values: where chains start: constrained values of some latent sites, each of the
            site's shape (all chains) or ``(num_chains, *site_shape)`` (one per chain), e.g. a
            fitted guide's ``median()``; the other sites start uniformly in (-2, 2) on the
            unconstrained space, as Stan's do.
        init: ``"pathfinder"`` starts the chains at multi-path Pathfinder draws and warmup's
            metric at its covariance (:mod:`~vilab.inference.vi.nuts_init`; the ``pyro``
            backend takes the starting points only); ``result.config["pathfinder"]`` holds its
            gradient evaluations and k-hat. Not with ``init_values``.

    Returns:
        A :class:`NUTSResult`; divergences are also reported with a warning.

    Raises:
        TypeError: a keyword that is neither an option here nor a parameter of the model.
        ValueError: bad options, or a model with ``pyro.param`` sites (NUTS would condition on
            whatever the param store holds: make them sample sites or pass them as data).

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> y = torch.linspace(2.0, 4.0, 20)  # posterior of mu: mean 3.0, sd 0.22
        >>> from vilab.inference import run_nuts
        >>> result = run_nuts(model, y, num_samples=200, num_warmup=200, num_chains=2,
        ...                   chain_method="sequential", progress=False)
        >>> tuple(result.samples["mu"].shape), round(float(result.samples["mu"].mean()), 1)
        ((2, 200), 3.0)
    """
    from vilab.inference.common.arguments import check_no_learned_params

    check_model_kwargs(model, kwargs, "run_nuts", keyword_options(run_nuts))
    config = check_nuts_options(
        num_samples=num_samples,
        num_warmup=num_warmup,
        num_chains=num_chains,
        seed=seed,
        target_accept=target_accept,
        max_tree_depth=max_tree_depth,
        chain_method=chain_method,
        backend=backend,
        compiler=compiler,
    )
    config.update(dense_mass=bool(dense_mass), jit=bool(jit))
    trace = check_model(model, args, kwargs, allow_enumerated=True)
    # NUTS needs the full data's density (a subsampled plate's would change at every step),
    # proper densities for the never-used elements of an obs_mask site, and ImproperUniform sites
    # placed (not sampled) where a trace needs a first value (model_handlers).
    adapted = for_inference(model, trace, full_data=True)
    if adapted is not model:
        model, trace = adapted, check_model(adapted, args, kwargs, allow_enumerated=True)
    check_no_learned_params(trace, "run_nuts")
    config["init_values"] = check_init_values(init_values, trace, num_chains)
    config["init_inverse_mass"] = _pathfinder_start(model, args, kwargs, config, init, init_values, trace)
    if backend in ("auto", "vectorized") and not jit:
        try:
            return _run_vectorized(model, args, kwargs, config, trace, progress)
        except VectorizationError as error:
            if backend == "vectorized":
                raise
            warnings.warn(
                f"run_nuts: the vectorized sampler cannot run this model ({error}); falling back to Pyro's "
                "NUTS, one chain per process, expected several to tens of times slower per draw (every leapfrog step runs "
                "the model through Pyro's tracing in Python). Pyro's jit_compile is not used: a traced "
                "potential would freeze one branch of Python control flow on latent values, the usual "
                "reason for this fallback. Write the branch with torch.where to get the fast path.",
                RuntimeWarning,
                stacklevel=2,
            )
    config["backend"] = "pyro"
    if config.pop("init_inverse_mass", None) is not None:
        warnings.warn(
            "run_nuts: the pyro backend starts from Pathfinder's draws but adapts its metric from the identity",
            RuntimeWarning,
            stacklevel=2,
        )
    start = time.perf_counter()
    parallel = config["chain_method"] == "parallel" or (
        config["chain_method"] == "auto" and num_chains > 1 and available_workers(num_chains) > 1
    )
    total = num_chains * (num_samples + num_warmup)
    results = run_chains(
        _chain_worker,
        (model, args, kwargs, config),
        num_chains,
        parallel=parallel,
        total=total,
        progress=progress,
        desc="NUTS",
    )
    wall_time = time.perf_counter() - start
    latent = {k: torch.as_tensor(np.stack([r[0][k] for r in results])) for k in results[0][0]}
    stats = {k: np.stack([r[1][k] for r in results]) for k in results[0][1]}
    config["warmup_leapfrog_steps"] = sum(r[2] for r in results)
    return _assemble(model, args, kwargs, latent, stats, wall_time, config, trace)


def _run_vectorized(model, args, kwargs, config, trace, progress) -> NUTSResult:
    start = time.perf_counter()
    workers = 1 if config["chain_method"] == "sequential" else available_workers(config["num_chains"])
    result = sample_vectorized_nuts(
        model,
        args,
        kwargs,
        num_samples=config["num_samples"],
        num_warmup=config["num_warmup"],
        num_chains=config["num_chains"],
        target_accept=config["target_accept"],
        dense_mass=config["dense_mass"],
        max_tree_depth=config["max_tree_depth"],
        seed=config["seed"],
        progress=progress,
        compiler=config["compiler"],
        init_values=config["init_values"],
        workers=workers,
        init_inverse_mass=config.get("init_inverse_mass"),
    )
    wall_time = time.perf_counter() - start
    latent = {k: v for k, v in result.samples.items() if k in trace.nodes and not trace.nodes[k]["is_observed"]}
    stats = {
        k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        for k, v in result.sample_stats.items()
    }
    config.update(
        backend="vectorized",
        leaf_backend=result.backend,
        fuse_decision=result.fuse_decision,
        workers=workers,
        batching=result.batching,
        warmup_leapfrog_steps=result.warmup_leapfrog_steps,
    )
    return _assemble(model, args, kwargs, latent, stats, wall_time, config, trace)


def _pathfinder_start(model, args, kwargs, config, init, init_values, trace):
    """With ``init="pathfinder"``: set ``config["init_values"]`` and ``["pathfinder"]``, and
    return the starting inverse mass matrix (``None`` without ``init``)."""
    if init is None:
        return None
    if init != "pathfinder":
        raise ValueError(f"init: expected None or 'pathfinder'; got {init!r}")
    if init_values is not None:
        raise ValueError("init: 'pathfinder' chooses the starting values; pass init_values or init, not both")
    from vilab.inference.vi.nuts_init import pathfinder_init

    start = pathfinder_init(
        model, args, kwargs, num_chains=config["num_chains"], dense_mass=config["dense_mass"], seed=config["seed"]
    )
    config["init_values"] = check_init_values(start.init_values, trace, config["num_chains"])
    config["pathfinder"] = start.info
    return start.inverse_mass


def check_nuts_options(
    *,
    num_samples=1000,
    num_warmup=1000,
    num_chains=4,
    seed=0,
    target_accept=0.8,
    max_tree_depth=10,
    chain_method="auto",
    backend="auto",
    compiler="auto",
    **_,
) -> dict:
    """Check :func:`run_nuts`'s option values (defaults for those not given); returns the
    sampler's configuration."""
    config = _validate(num_samples, num_warmup, num_chains, target_accept, max_tree_depth, chain_method)
    if backend not in ("auto", "vectorized", "pyro"):
        raise ValueError(f"backend: expected 'auto', 'vectorized' or 'pyro'; got {backend!r}")
    compiler = resolve_compiler(compiler, stacklevel=5)  # "eager" where VILAB_ENGINE=off
    return {**config, "seed": check_seed(seed), "compiler": compiler}


def _validate(num_samples, num_warmup, num_chains, target_accept, max_tree_depth, chain_method) -> dict:
    check_positive_int(num_samples, "num_samples")
    check_positive_int(num_warmup, "num_warmup", minimum=0)
    check_positive_int(num_chains, "num_chains")
    check_positive_int(max_tree_depth, "max_tree_depth")
    check_probability(target_accept, "target_accept")
    if chain_method not in ("auto", "parallel", "sequential"):
        raise ValueError(f"chain_method: expected 'auto', 'parallel' or 'sequential'; got {chain_method!r}")
    return dict(
        num_samples=num_samples,
        num_warmup=num_warmup,
        num_chains=num_chains,
        target_accept=target_accept,
        max_tree_depth=max_tree_depth,
        chain_method=chain_method,
    )


def _assemble(model, args, kwargs, latent, stats, wall_time, config, trace) -> NUTSResult:
    """Add deterministic sites and log-likelihoods, build InferenceData, report divergences.

    ``trace`` is the model's validation trace from :func:`run_nuts` (site kinds and shapes).
    """
    num_chains, num_draws = next(iter(latent.values())).shape[:2]
    flat = {
        k: v.reshape((num_chains * num_draws,) + v.shape[2:]).to(torch.get_default_dtype()) for k, v in latent.items()
    }
    # Enumerated sites get posterior draws; their marginal log joint is not needed here.
    evaluation = evaluate_draws(model, args, kwargs, flat, marginalize=False)
    keep = {n for n, s in trace.nodes.items() if is_posterior_site(s)}

    def unflatten(value):
        return value.reshape((num_chains, num_draws) + value.shape[1:])

    samples = {k: unflatten(v) for k, v in evaluation["values"].items() if k in keep}
    log_likelihood = {k: unflatten(v) for k, v in evaluation["log_likelihood"].items()}
    idata = to_inference_data(
        model, args, kwargs, samples, sample_stats=stats, log_likelihood=log_likelihood, inference="nuts"
    )
    num_divergences = int(stats["diverging"].sum())
    if num_divergences:
        warnings.warn(
            f"run_nuts: {num_divergences} divergent transitions after warmup "
            f"({num_divergences / stats['diverging'].size:.1%} of draws); the posterior has regions "
            "NUTS cannot explore. Raise target_accept or reparameterise (e.g. non-centred).",
            RuntimeWarning,
            stacklevel=3,
        )
    _warn_if_chains_disagree(idata)
    # The result's config stays plain data: it names the initialised sites.
    config = {**config, "init_values": sorted(config.get("init_values") or {})}
    # Potential gradients: one per leapfrog step, warmup and sampling, all chains.
    config["gradient_evaluations"] = int(stats["n_steps"].sum()) + int(config.pop("warmup_leapfrog_steps", 0))
    config.pop("init_inverse_mass", None)
    return NUTSResult(samples, stats, idata, wall_time, num_divergences, config)
