"""One sampler on one problem, cold, in its own process: the worker of ``benchmarks/nuts_peers.py``.

Usage (by ``nuts_peers.py``; the spec is JSON)::

    python benchmarks/peer_samplers.py '{"sampler": "vilab", "problem": "posteriordb/kidiq-kidscore_momiq",
        "num_chains": 4, "num_warmup": 1000, "num_samples": 1000, "seed": 0, "repeats": 1, "out": "/tmp/x"}'

Writes ``<out>.npz`` (site -> ``(chain, draw, *shape)`` draws of the last run) and ``<out>.json``
(seconds of each run, compile and sampling seconds where the sampler reports them apart, the path
vilab took, divergences, warnings, or the error). Every sampler starts each chain uniformly in
(-2, 2) on the unconstrained space (Stan's default), samples in float64, with a diagonal mass
matrix, target acceptance 0.8 and tree depth 10 (each peer's default). The parent sets
``XLA_FLAGS`` (host devices for NumPyro's ``parallel`` chains) and fresh cache directories in the
environment, so that each run is a user's first.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

__all__ = ["SAMPLERS", "run", "main"]

SAMPLERS = ("vilab", "numpyro_vectorized", "numpyro_parallel", "nutpie")


def describe_path(config: dict) -> str:
    """The path ``run_nuts`` took, from its ``result.config``: ``fast vectorized`` (the model
    broadcasts over a chain plate), ``vmap batching`` or ``Pyro fallback``."""
    if config.get("backend") == "pyro":
        return "Pyro fallback"
    if config.get("batching") == "vmap":
        return "vmap batching"
    return "fast vectorized"


def _run_vilab(problem, spec: dict) -> tuple[dict, dict]:
    import torch

    torch.set_default_dtype(torch.float64)
    from vilab.inference import run_nuts

    model, args, kwargs = problem.pyro()
    seconds, messages = [], []
    for repeat in range(spec["repeats"]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            result = run_nuts(
                model,
                *args,
                num_chains=spec["num_chains"],
                num_warmup=spec["num_warmup"],
                num_samples=spec["num_samples"],
                seed=spec["seed"],
                progress=False,
                **kwargs,
            )
            seconds.append(time.perf_counter() - start)
        messages += [str(w.message)[:400] for w in caught if "vilab" in w.filename or "run_nuts" in str(w.message)]
    config = {
        k: str(v)
        for k, v in result.config.items()
        if k in ("backend", "batching", "leaf_backend", "workers", "fuse_decision")
    }
    draws = {name: value.detach().cpu().numpy() for name, value in result.samples.items()}
    record = {"path": describe_path(result.config), "config": config, "divergences": int(result.num_divergences)}
    return draws, {**record, "seconds": seconds, "warnings": sorted(set(messages))}


def _run_numpyro(problem, spec: dict, chain_method: str) -> tuple[dict, dict]:
    import jax

    jax.config.update("jax_enable_x64", True)
    from numpyro.infer import MCMC, NUTS, init_to_uniform

    if chain_method == "parallel" and jax.local_device_count() < spec["num_chains"]:
        raise RuntimeError(
            f"chain_method='parallel': expected {spec['num_chains']} host devices; got {jax.local_device_count()} "
            "(XLA_FLAGS=--xla_force_host_platform_device_count must be set before jax is imported)"
        )
    model, kwargs = problem.numpyro()
    # The data are float64 already (``peer_problems`` converts tensors so, for every peer).
    kwargs = {
        key: jax.numpy.asarray(value) if isinstance(value, np.ndarray) else value for key, value in kwargs.items()
    }
    start = time.perf_counter()
    mcmc = MCMC(
        NUTS(model, init_strategy=init_to_uniform(radius=2.0)),
        num_warmup=spec["num_warmup"],
        num_samples=spec["num_samples"],
        num_chains=spec["num_chains"],
        chain_method=chain_method,
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(spec["seed"]), extra_fields=("diverging",), **kwargs)
    samples = jax.block_until_ready(mcmc.get_samples(group_by_chain=True))
    seconds = time.perf_counter() - start
    draws = {name: np.asarray(value, dtype=np.float64) for name, value in samples.items()}
    divergences = int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
    record = {"seconds": [seconds], "divergences": divergences, "devices": jax.local_device_count()}
    return draws, record


def _uniform_start(initial_point_fn):
    """PyMC's initial point function (seed -> transformed point) with every value replaced by
    uniform(-2, 2) draws: Stan's start, instead of PyMC's support point plus uniform(-1, 1)."""

    def start(seed):
        point = initial_point_fn(seed)
        rng = np.random.default_rng(seed)
        if isinstance(point, dict):
            return {name: rng.uniform(-2.0, 2.0, np.shape(value)) for name, value in point.items()}
        return rng.uniform(-2.0, 2.0, np.shape(point))

    return start


def _run_nutpie(problem, spec: dict) -> tuple[dict, dict]:
    import nutpie

    start = time.perf_counter()
    compiled = nutpie.compile_pymc_model(problem.pymc())
    compiled = dataclasses.replace(compiled, initial_point_func=_uniform_start(compiled.initial_point_func))
    compile_seconds = time.perf_counter() - start
    sampling_start = time.perf_counter()
    trace = nutpie.sample(
        compiled,
        draws=spec["num_samples"],
        tune=spec["num_warmup"],
        chains=spec["num_chains"],
        cores=spec["cores"],
        seed=spec["seed"],
        progress_bar=False,
    )
    sampling_seconds = time.perf_counter() - sampling_start
    draws = {name: np.asarray(trace.posterior[name].values, dtype=np.float64) for name in trace.posterior.data_vars}
    record = {
        "seconds": [compile_seconds + sampling_seconds],
        "compile_seconds": compile_seconds,
        "sampling_seconds": sampling_seconds,
        "divergences": int(trace.sample_stats["diverging"].values.sum()),
    }
    return draws, record


def run(spec: dict) -> tuple[dict, dict]:
    """Run ``spec["sampler"]`` on ``spec["problem"]``; returns (draws, record)."""
    from peer_problems import problems

    problem = problems()[spec["problem"]]
    sampler = spec["sampler"]
    if sampler == "vilab":
        return _run_vilab(problem, spec)
    if sampler.startswith("numpyro_"):
        return _run_numpyro(problem, spec, sampler.split("_", 1)[1])
    if sampler == "nutpie":
        return _run_nutpie(problem, spec)
    raise ValueError(f"sampler: expected one of {SAMPLERS}; got {sampler!r}")


def main(argv=None) -> int:
    spec = json.loads((argv or sys.argv[1:])[0])
    out = Path(spec["out"])
    try:
        draws, record = run(spec)
        np.savez(out.with_suffix(".npz"), **draws)
    except Exception as exception:  # noqa: BLE001 - the parent's table records every failure
        traceback.print_exc()
        message = " ".join(str(exception).split())
        if len(message) > 600:  # a chain's traceback: its start and the error at its end
            message = f"{message[:200]} ... {message[-400:]}"
        record = {"error": f"{type(exception).__name__}: {message}"}
    out.with_suffix(".json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
