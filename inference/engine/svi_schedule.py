r"""When an SVI run's compiled step moves to the virtual machine or becomes a fused kernel: the
engine's scheduling for ``fit_svi``'s loop.

The loop (:mod:`~vilab.inference.svi.loop`) enters one :class:`SVISchedule` per run, calls
:meth:`SVISchedule.before_step` before each step and reads :meth:`SVISchedule.report` at the
end; the stepper itself is either the engine's compiled step
(:class:`~vilab.inference.engine.svi_step.CompiledSVIStep`) or Pyro's ``SVI``, which the
schedule leaves alone.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Iterator

from vilab.inference.engine.backends import torch_internals
from vilab.inference.engine.policy import FusePolicy
from vilab.inference.engine.protocol import StepInfo
from vilab.inference.engine.step import threads_for
from vilab.inference.engine.svi_step import CompiledSVIStep

__all__ = ["SVISchedule"]


class SVISchedule:
    """The fusion schedule of one SVI run.

    Args:
        stepper: the run's stepper (a :class:`CompiledSVIStep` or Pyro's stepper, which has
            nothing to schedule).
        compiler: one of :data:`~vilab.inference.engine.api.COMPILERS`.
        num_steps: the run's step budget (only long runs fuse).
    """

    def __init__(self, stepper: Any, compiler: str, num_steps: int) -> None:
        self.stepper = stepper
        self.compiled = isinstance(stepper, CompiledSVIStep)
        self.policy = FusePolicy(compiler if self.compiled else "graph", num_steps)
        self.fused_at, self.fuse_seconds = "", 0.0
        self.vm_note = self._to_vm(compiler == "auto") if self.compiled and compiler in ("auto", "vm") else ""
        if self.compiled and compiler in ("auto", "inductor"):
            torch_internals.warn_unavailable(torch_internals.FALLBACK, stacklevel=4)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """The run's thread setting (:func:`~vilab.inference.engine.step.threads_for`); stops the
        stepper's background compilation, if any, when the run ends."""
        with threads_for(self.stepper.numel):
            try:
                yield
            finally:
                cancel = getattr(self.stepper, "fuse_cancel", None)
                if cancel is not None:
                    cancel()

    def before_step(self, step: int) -> None:
        """Ask the policy whether to fuse before step ``step`` (until it has decided), or
        collect a background compilation's outcome."""
        if not self.policy.decided:
            self.fuse_seconds += self._maybe_fuse(step)
            if getattr(self.stepper, "fused_from_cache", False):
                self.fused_at = f"; loaded from the kernel cache at step {step}"
        elif self.policy.background and self.stepper.fusing:
            self.fused_at = self._poll_fusion(step)

    @property
    def info(self) -> StepInfo:
        """How the step runs (``"eager"`` for Pyro's ``SVI``) and why."""
        report = self.report()
        return StepInfo(report["step_runner"], report["fused"], report["fuse_decision"])

    def report(self) -> dict:
        """``fused``, ``fuse_decision``, ``fuse_seconds`` and ``step_runner`` for the result's
        ``config``."""
        return dict(
            fused=bool(getattr(self.stepper, "fused", False)),
            fuse_decision=self.policy.reason + self.fused_at + self.vm_note,
            fuse_seconds=self.fuse_seconds,
            step_runner=getattr(self.stepper, "runner", "eager"),
        )

    def _to_vm(self, require_faster: bool) -> str:
        """Move the traced step to the virtual machine (where it is faster than fx's code, with
        ``require_faster``); the note for ``fuse_decision``."""
        if self.stepper.run_on_vm(require_faster):
            return "; SVI step on the virtual machine"
        return f"; SVI step not on the virtual machine ({self.stepper.vm_failure})"

    def _maybe_fuse(self, step: int) -> float:
        """Ask the policy whether to fuse the compiled step before step ``step``; returns the
        seconds spent compiling (counted as setup, as a JIT's first call is; none for a
        compilation started in the background)."""
        chosen = self.policy.choose(step, [(self.stepper, step)])
        if chosen is not None and not chosen:
            return 0.0
        if chosen and self.policy.background:
            self.stepper.fuse_start()
            return 0.0
        start = time.perf_counter()
        if not self.stepper.fuse():
            warnings.warn(
                f"fit_svi: no fused kernel ({self.stepper.fuse_failure}); the traced step keeps running",
                RuntimeWarning,
                stacklevel=4,
            )
        return time.perf_counter() - start

    def _poll_fusion(self, step: int) -> str:
        """What became of the stepper's background compilation once it is over (``""`` until then)."""
        outcome = self.stepper.fuse_poll()
        if outcome is None:
            return ""
        return f"; fused at step {step}" if outcome else f"; not fused: {self.stepper.fuse_failure}"
