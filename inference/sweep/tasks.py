"""What one sweep task does: a NUTS reference, or one method on one model scored by ``compare``.

Both functions are plain Python (the runner wraps them in ``ray.remote``) and deterministic given
the task: they set the default dtype (float64) and the torch threads (the task's CPUs) on entry,
and every random draw comes from the task's seed.
"""

from __future__ import annotations

import contextlib
import platform
import socket
import time
import warnings
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from vilab.inference.sweep.grid import NUTS, Task
from vilab.inference.sweep.problems import load_problem

__all__ = ["environment", "run_reference", "run_task"]

# compare's summary holds the methods' numbers; these come from the task itself.
GRADIENT_SCOPE_SVI = "optimisation steps x particles, start included (or the method's own count)"
GRADIENT_SCOPE_NUTS = "leapfrog steps of all chains, warmup included"
GRADIENT_SCOPES = {"vi": GRADIENT_SCOPE_SVI, "nuts": GRADIENT_SCOPE_NUTS}


@contextlib.contextmanager
def _prepared(num_cpus: int) -> Iterator[None]:
    """float64 and ``num_cpus`` torch threads while a task runs (restored after: a serial
    sweep runs its tasks in the caller's process)."""
    import torch

    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(num_cpus)
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)


def environment() -> dict[str, Any]:
    """Versions and host of the process running the task."""
    import pyro
    import torch

    import vilab

    try:
        import ray

        ray_version = ray.__version__
        on_ray = ray.is_initialized()
        node = ray.get_runtime_context().get_node_id() if on_ray else None
        node_ip = ray.util.get_node_ip_address() if on_ray else None
    except ImportError:
        ray_version, node, node_ip = None, None, None
    return {
        "vilab_version": vilab.__version__,
        "torch_version": torch.__version__,
        "pyro_version": pyro.__version__,
        "ray_version": ray_version,
        "python_version": platform.python_version(),
        "host": socket.gethostname(),
        "node_id": node,
        "node_ip": node_ip,
    }


def run_reference(
    model_name: str, posteriordb: Optional[str], options: Mapping[str, Any], num_cpus: int = 1
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """NUTS reference draws of a model without posteriordb draws.

    Returns:
        ``(draws, info)``: flat parameter name -> ``(num_chains * num_samples,)`` draws, and the
        run's diagnostics (R-hat max, bulk ESS min, divergences, seconds) to flag a reference
        that did not earn its place.
    """
    from vilab.inference.common.diagnostics import nuts_diagnostics
    from vilab.inference.nuts.api import run_nuts
    from vilab.samples import flatten_samples

    options = dict(options)
    seed = options.pop("seed")
    with _prepared(num_cpus), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # divergences are kept in the diagnostics, and shown
        problem = load_problem(model_name, posteriordb)
        result = run_nuts(problem.model, *problem.args, seed=seed, progress=False, **options, **problem.kwargs)
    latent = {name: value for name, value in result.samples.items() if name in result.inference_data.posterior}
    draws = {name: np.ascontiguousarray(value.reshape(-1)) for name, value in flatten_samples(latent, 2).items()}
    info = {"seconds": result.wall_time, **nuts_diagnostics(result.inference_data), **environment()}
    return draws, info


def run_task(
    task: Task, posteriordb: Optional[str], reference: Mapping[str, np.ndarray], num_cpus: int = 1
) -> dict[str, Any]:
    """Run ``task`` and return its store row (status ``"ok"`` or ``"failed"`` with the error
    for a method that ``compare`` reports as failed); any other error propagates."""
    from vilab.inference.comparison.api import compare

    options = task.options
    start = time.perf_counter()
    with _prepared(num_cpus), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problem = load_problem(task.model, posteriordb)
        if task.method == NUTS:
            report = compare(
                problem.model,
                *problem.args,
                guides=(),
                reference=dict(reference),
                include_nuts=True,
                seed=task.seed,
                nuts_options=options["nuts_options"],
                progress=False,
                **problem.kwargs,
            )
        else:
            report = compare(
                problem.model,
                *problem.args,
                guides=(task.method,),
                reference=dict(reference),
                seed=task.seed,
                num_draws=options["num_draws"],
                svi_options=options.get("svi_options"),
                guide_options={task.method: options["guide_options"]},
                progress=False,
                **problem.kwargs,
            )
    row: dict[str, Any] = {
        "task_seconds": time.perf_counter() - start,
        **environment(),
        "warnings": _warning_text(caught),
    }
    if task.method in report.failures:
        return {**row, "status": "failed", "error": report.failures[task.method]}
    method = report.methods[task.method]
    metrics = {key: _plain(value) for key, value in report.summary.loc[task.method].items()}
    return {**row, **metrics, **_gradient_evaluations(method), "status": "ok", "error": None}


def _gradient_evaluations(method) -> dict[str, Any]:
    """Gradient evaluations of log p, as every method records them in
    ``config["gradient_evaluations"]`` (SVI: steps x particles plus its Laplace start; NUTS:
    leapfrog steps of all chains, warmup included; the VI methods: their own count)."""
    config = getattr(method.result, "config", {}) or {}
    count = config.get("gradient_evaluations")
    if count is None:
        return {"num_gradient_evaluations": None, "gradient_evaluations_scope": "not reported by the method"}
    return {"num_gradient_evaluations": int(count), "gradient_evaluations_scope": GRADIENT_SCOPES[method.kind]}


def _plain(value: Any) -> Any:
    """A value SQLite stores: Python scalars; NaN and missing values as ``None``."""
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    if value is None or isinstance(value, (int, str)):
        return value
    return str(value)


def _warning_text(caught) -> Optional[str]:
    messages = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    return " | ".join(messages) if messages else None
