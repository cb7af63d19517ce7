r"""The engine's one interface: what NUTS and SVI call, and the switch that turns the engine off.

NUTS (:mod:`~vilab.inference.nuts`) and SVI (:mod:`~vilab.inference.svi`) import nothing else
from the engine (an import-linter contract in ``pyproject.toml`` enforces it). They hold the
algorithms; every decision about how a step runs (traced or eager, on the virtual machine, fused
now or in a background process, with how many threads) is the engine's, behind
:class:`NutsSteps` (the leaf and merge of a NUTS tree) and :class:`SVISchedule` (the SVI step).

A step is anything that satisfies :class:`Step`: called on flat tensors, it returns flat
tensors, and says how it runs (:class:`StepInfo`).

The engine off: ``compiler="eager"`` (or the environment variable ``VILAB_ENGINE=off``, read by
:func:`resolve_compiler` at ``run_nuts``, ``fit_svi`` and ``sample_vectorized_nuts``) runs every
step as plain eager PyTorch: no tracing, no virtual machine, no fused kernel, no compile server.
NUTS still batches its chains (and splits them over processes with ``workers``); SVI runs Pyro's
``SVI`` with the same preconditioned ``ClippedAdam``.
"""

from __future__ import annotations

import os

from vilab.inference.engine.backends import torch_internals
from vilab.inference.engine.backends.inductor import COMPILERS, fusion_unavailable, normalize_compiler
from vilab.inference.engine.nuts_schedule import PREPARE_ITERATIONS, NutsSteps
from vilab.inference.engine.potential import BatchedPotential, VectorizationError
from vilab.inference.engine.processes import server as _server
from vilab.inference.engine.protocol import Step, StepInfo
from vilab.inference.engine.processes.chains import run_chains
from vilab.inference.engine.processes.workers import (
    available_workers,
    batch_sizes,
    frozen_heap,
    resolve_workers,
    run_batches,
)
from vilab.inference.engine.step import (
    LEAF_FIELDS,
    checkpoint_masks,
    is_turning,
    leaf_step,
    threads_for,
)
from vilab.inference.engine.step import _select as select
from vilab.inference.engine.svi_schedule import SVISchedule
from vilab.inference.engine.svi_step import CompiledSVIError, CompiledSVIStep

__all__ = [
    "COMPILERS",
    "ENGINE_ENV",
    "Step",
    "StepInfo",
    "engine_off",
    "resolve_compiler",
    "warn_if_unfusable",
    # NUTS
    "BatchedPotential",
    "VectorizationError",
    "LEAF_FIELDS",
    "leaf_step",
    "select",
    "checkpoint_masks",
    "is_turning",
    "NutsSteps",
    "nuts_steps",
    "nuts_run_steps",
    "batched_potential",
    "threads_for",
    "available_workers",
    "resolve_workers",
    "batch_sizes",
    "run_batches",
    "frozen_heap",
    "run_chains",
    # SVI
    "CompiledSVIError",
    "CompiledSVIStep",
    "SVISchedule",
    "svi_step",
]

# The environment variable that switches the engine off (``VILAB_ENGINE=off``: every step eager).
ENGINE_ENV = "VILAB_ENGINE"


def engine_off() -> bool:
    """Whether ``VILAB_ENGINE=off`` (or ``0``, ``false``, ``eager``) switches the engine off.

    Raises:
        ValueError: the variable holds something else than on/off.
    """
    value = os.environ.get(ENGINE_ENV, "").strip().lower()
    if value in ("", "on", "1", "true", "auto"):
        return False
    if value in ("off", "0", "false", "eager"):
        return True
    raise ValueError(f"{ENGINE_ENV}: expected 'on' or 'off'; got {value!r}")


def resolve_compiler(compiler: str, stacklevel: int = 4) -> str:
    """``compiler`` checked and normalised, ``"eager"`` when the engine is switched off.

    Called once at each entry point; the deprecated ``"torchscript"`` reads as ``"graph"`` with
    a ``FutureWarning``.

    Args:
        compiler: one of :data:`COMPILERS`.
        stacklevel: where the ``FutureWarning`` points (the entry point's caller).

    Raises:
        ValueError: ``compiler`` is not one of :data:`COMPILERS`.
    """
    compiler = normalize_compiler(compiler, stacklevel=stacklevel)
    if compiler not in COMPILERS:
        raise ValueError(f"compiler: expected one of {COMPILERS}; got {compiler!r}")
    return "eager" if engine_off() else compiler


def warn_if_unfusable(compiler: str, stacklevel: int = 3) -> None:
    """One ``RuntimeWarning`` where ``compiler`` asks for fused kernels and PyTorch's internals
    they need are unavailable (what the run does instead)."""
    if compiler in ("auto", "inductor"):
        torch_internals.warn_unavailable(torch_internals.FALLBACK, stacklevel=stacklevel)


def nuts_steps(potential: BatchedPotential, merge_fn, num_merge_state: int, *, compile: bool, vm) -> NutsSteps:
    """A batch's leaf and merge steps, traced (``compile``) or eager, never fused unless asked
    (:meth:`NutsSteps.fuse`); ``vm``: ``"faster"``, ``"always"`` or ``None``."""
    return NutsSteps(potential, merge_fn, num_merge_state, compile=compile, vm=vm)


def nuts_run_steps(
    potential: BatchedPotential,
    merge_fn,
    num_merge_state: int,
    *,
    compiler: str,
    total_iterations: int,
    background: bool,
    split: bool,
) -> NutsSteps:
    """A run's leaf and merge steps with their fusion schedule (:meth:`NutsSteps.for_run`)."""
    return NutsSteps.for_run(
        potential,
        merge_fn,
        num_merge_state,
        compiler=compiler,
        total_iterations=total_iterations,
        background=background,
        split=split,
    )


def batched_potential(
    model, model_args: tuple, model_kwargs: dict, *, num_chains: int, seed: int, compiler: str, total: int, split: bool
) -> tuple[BatchedPotential, bool]:
    """The batch's potential (traced unless ``compiler="eager"``), and whether its steps may
    compile in the background (``compiler="auto"``, one batch, a free core); a long run
    (``total`` iterations) starts the compile server first so that Inductor's import overlaps
    the tracing."""
    background = not split and compiler == "auto" and _server.background_available()
    if background and total >= PREPARE_ITERATIONS and not fusion_unavailable():
        _server.prepare()
    with threads_for(0):  # tracing and checking work on a few chains' values
        potential = BatchedPotential(
            model, model_args, model_kwargs, num_chains=num_chains, seed=seed, compile=compiler != "eager"
        )
    return potential, background


def svi_step(
    backend: str,
    compiler: str,
    model,
    guide,
    args: tuple,
    kwargs: dict,
    *,
    objective: str,
    num_particles: int,
    vectorize: bool,
    lr: float,
    lr_decay_per_step: float,
    clip: float,
    step_scales: dict | None,
) -> tuple[CompiledSVIStep | None, str]:
    """The engine's SVI step, or ``None`` and why not (the caller runs Pyro's ``SVI``).

    ``backend`` is ``fit_svi``'s: ``"pyro"`` asks for no compiled step, ``"compiled"`` for one or
    an error, ``"auto"`` for one where it can run. With the engine off (``compiler="eager"``)
    there is none; the reason is then ``""`` (nothing to warn about).

    Raises:
        ValueError: ``backend="compiled"`` with the engine off.
        CompiledSVIError: ``backend="compiled"`` and the step cannot be compiled.
    """
    if backend == "compiled" and compiler == "eager":
        raise ValueError(
            "backend: expected 'auto' or 'pyro' with the engine off (compiler='eager' or VILAB_ENGINE=off: "
            "nothing is traced); got 'compiled'"
        )
    if backend == "pyro" or compiler == "eager":
        return None, ""
    try:
        if num_particles > 1 and not vectorize:
            raise CompiledSVIError("vectorize_particles=False asks for one particle at a time")
        step = CompiledSVIStep(
            model,
            guide,
            args,
            kwargs,
            objective=objective,
            num_particles=num_particles,
            lr=lr,
            lr_decay_per_step=lr_decay_per_step,
            clip=clip,
            step_scales=step_scales,
        )
    except CompiledSVIError as error:
        if backend == "compiled":
            raise
        return None, str(error)
    return step, ""
