"""The SVI loop: steps, the convergence monitor and the warning when the budget ends first;\nthe engine schedules the compiled step's fusion (:class:`~vilab.inference.engine.api.SVISchedule`)."""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np

from vilab.inference.svi.convergence import ConvergenceCheck, IterateMonitor
from vilab.inference.engine.api import SVISchedule
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
    schedule = SVISchedule(stepper, compiler, num_steps)  # the engine's: fusion, threads
    with schedule.running():
        for step in bar:
            schedule.before_step(step)
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
    config.update(schedule.report())
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
