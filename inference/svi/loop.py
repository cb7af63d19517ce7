"""The SVI loop: steps, the convergence monitor, fusion of the compiled step on the way, and\nthe warning when the budget ends first."""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Iterator, Optional

import numpy as np

from vilab.inference.svi.convergence import ConvergenceCheck, IterateMonitor
from vilab.inference.engine.step import threads_for
from vilab.inference.engine.backends import torch_internals
from vilab.inference.engine.policy import FusePolicy
from vilab.inference.engine.svi_step import CompiledSVIStep
from vilab.inference.common.progress import progress_bar

__all__ = []


def _optimise(
    stepper,
    model,
    guide,
    args,
    kwargs,
    name,
    elbo,
    start,
    num_steps,
    window,
    min_steps,
    early_stop,
    progress,
    compiler,
    config,
    raise_non_finite,
    confirm=None,
):
    """The SVI loop; returns ``(losses, last ConvergenceCheck or None, averaged parameters)``.
    ``raise_non_finite`` raises the error of a non-finite loss (it builds the partial result);
    ``confirm`` (a :class:`~vilab.inference.svi.subsampling.FullDataCheck`, for a subsampled
    model) must agree before a passed test counts."""
    losses: list[float] = []
    check, average, monitor = None, None, None
    bar = progress_bar(range(num_steps), desc=f"SVI {name}", enabled=progress)
    compiled = isinstance(stepper, CompiledSVIStep)
    policy = FusePolicy(compiler if compiled else "graph", num_steps)
    fused_at, fuse_seconds = "", 0.0
    vm_note = _to_vm(stepper, compiler == "auto") if compiled and compiler in ("auto", "vm") else ""
    if compiled and compiler in ("auto", "inductor"):
        torch_internals.warn_unavailable(torch_internals.FALLBACK, stacklevel=3)
    with threads_for(stepper.numel), _cancelling(stepper):
        for step in bar:
            if not policy.decided:
                fuse_seconds += _maybe_fuse(policy, stepper, step)
                if getattr(stepper, "fused_from_cache", False):
                    fused_at = f"; loaded from the kernel cache at step {step}"
            elif policy.background and stepper.fusing:
                fused_at = _poll_fusion(stepper, step)
            loss = stepper.step()
            if not np.isfinite(loss):
                raise_non_finite(model, guide, args, kwargs, step, losses, start, name, elbo, stepper)
            losses.append(float(loss))
            flat = stepper.flat()
            monitor = monitor or IterateMonitor(flat.numel(), window, units=stepper.units())
            monitor.record(flat)
            if step % 50 == 0:
                bar.set_postfix(elbo=f"{-np.mean(losses[-50:]):.4g}")
            if monitor.ready and (step + 1 >= min_steps or step + 1 == num_steps):
                check, average = _check(monitor, losses, confirm, stepper)
                if early_stop and check.converged:
                    break
    bar.close()
    if check is None or check.step != len(losses):
        check, average = _check(monitor, losses, confirm, stepper) if monitor and monitor.ready else (check, average)
    config.update(
        fused=bool(getattr(stepper, "fused", False)),
        fuse_decision=policy.reason + fused_at + vm_note,
        fuse_seconds=fuse_seconds,
        step_runner=getattr(stepper, "runner", "eager"),
    )
    return losses, check, average


def _check(monitor: IterateMonitor, losses, confirm, stepper) -> tuple[ConvergenceCheck, object]:
    """The monitor's test on the last window and its average; a pass ``confirm`` rejects is
    reported as not converged, with its reason."""
    check, average = monitor.check(losses), monitor.average()
    if confirm is not None:
        confirm.record(len(losses), average)
    if confirm is not None and check.converged:
        reason = confirm.reason(stepper, len(losses), average)
        if reason:
            check = check._replace(converged=False, reason=reason)
    return check, average


def _warn_not_converged(
    name: str, num_steps: int, check: Optional[ConvergenceCheck], window: int, init_note: str
) -> None:
    why = (
        check.reason if check is not None else f"the run ({num_steps} steps) is shorter than one test window ({window})"
    )
    warnings.warn(
        f"fit_svi: guide {name!r} did not converge in {num_steps} steps: {why}. The fit is its last "
        f"iterate, not a converged optimum; raise num_steps, or check that the posterior is proper "
        f"(start: {init_note}).",
        RuntimeWarning,
        stacklevel=3,
    )


def _to_vm(stepper: CompiledSVIStep, require_faster: bool) -> str:
    """Move the traced step to the virtual machine (where it is faster than fx's code, with
    ``require_faster``); the note for ``fuse_decision``."""
    if stepper.run_on_vm(require_faster):
        return "; SVI step on the virtual machine"
    return f"; SVI step not on the virtual machine ({stepper.vm_failure})"


def _maybe_fuse(policy: FusePolicy, stepper, step: int) -> float:
    """Ask ``policy`` whether to fuse the compiled step before step ``step``; returns the
    seconds spent compiling (counted as setup, as a JIT's first call is; none for a
    compilation started in the background)."""
    chosen = policy.choose(step, [(stepper, step)])
    if chosen is not None and not chosen:
        return 0.0
    if chosen and policy.background:
        stepper.fuse_start()
        return 0.0
    start = time.perf_counter()
    if not stepper.fuse():
        warnings.warn(
            f"fit_svi: no fused kernel ({stepper.fuse_failure}); the traced step keeps running",
            RuntimeWarning,
            stacklevel=3,
        )
    return time.perf_counter() - start


def _poll_fusion(stepper, step: int) -> str:
    """What became of the stepper's background compilation once it is over (``""`` until then)."""
    outcome = stepper.fuse_poll()
    if outcome is None:
        return ""
    return f"; fused at step {step}" if outcome else f"; not fused: {stepper.fuse_failure}"


@contextlib.contextmanager
def _cancelling(stepper) -> Iterator[None]:
    """Stop the stepper's background compilation, if any, when the run ends."""
    try:
        yield
    finally:
        cancel = getattr(stepper, "fuse_cancel", None)
        if cancel is not None:
            cancel()
