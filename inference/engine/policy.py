r"""When to replace a sampler's traced steps by fused kernels: the fusion policy.

Compiling a step with Inductor costs seconds (:func:`~vilab.inference.engine.backends.inductor.predicted_compile_seconds`),
so :class:`FusePolicy` times the traced steps over the first iterations and compiles a step only
when its remaining calls will pay for the compilation; where a second core is free the
compilation runs in the background (:mod:`~vilab.inference.engine.processes.server`). Both NUTS
(:mod:`~vilab.inference.nuts.sampler`) and SVI (``fit_svi``) consult one policy per run.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

from vilab.inference.engine.processes import server as fast_background
from vilab.inference.engine.backends import inductor as fast_inductor

__all__ = ["FusePolicy"]


class FusePolicy:
    """Which of a sampler's traced steps to replace by fused kernels, and when.

    ``"inductor"`` fuses every step from the start, ``"graph"``, ``"vm"`` and ``"eager"`` none. ``"auto"`` counts
    each step's calls over the iterations after the first (which traces the steps); once those
    have taken :attr:`check_after` seconds (:attr:`check_after_background` where the compilation
    would run in the background) it extrapolates each step's remaining calls and
    the saving of a fused step: remaining calls x traced time per call x ``1 - 1 / speedup``
    (:data:`VM_SPEEDUP` for a step on the virtual machine, :data:`RECYCLED_SPEEDUP` for a
    traced step that reuses its buffers, :data:`EXPECTED_SPEEDUP` otherwise). Its compile time
    is the step's own prediction (:func:`predicted_compile_seconds`).

    With ``background`` (a second core and ``fork``:
    :func:`~vilab.inference.engine.processes.server.background_available`), the chosen steps compile
    one after another in a forked compile server while the traced steps keep running, so a step is
    fused when its saving after its kernel is ready exceeds :data:`BACKGROUND_MARGIN` times its
    compile time (the other core's time). Otherwise the compilation blocks the run, and the
    whole saving must exceed :data:`~vilab.inference.engine.backends.inductor.MARGIN` times the compile time. Short runs (tests, quick
    looks) compile nothing.

    With ``early`` as well, ``"auto"`` sends every step to the compile server as soon as the
    first iteration has traced them, without timing them first: for a run the caller knows to be
    long (thousands of NUTS iterations), fusing pays on every model measured, and each second of
    waiting is a second more of the traced steps.

    Args:
        compiler: one of :data:`COMPILERS`.
        total_iterations: iterations of the whole run.
        background: compile ``"auto"``'s steps beside the run (default: where available).
        early: with ``background``, compile every traced step after the first iteration.
    """

    # Seconds of timed iterations before deciding: spent on the slower traced step. A
    # background compilation costs the run nothing, so it starts on a shorter look.
    check_after = 0.5
    check_after_background = 0.2

    def __init__(
        self, compiler: str, total_iterations: int, background: Optional[bool] = None, early: bool = False
    ) -> None:
        if compiler not in fast_inductor.COMPILERS:
            raise ValueError(f"compiler: expected one of {fast_inductor.COMPILERS}; got {compiler!r}")
        self.compiler, self.total = compiler, total_iterations
        self.decided = compiler in ("graph", "vm", "eager")
        self.reason = f"compiler={compiler!r}" if self.decided else ""
        if background is None:
            background = compiler == "auto" and fast_background.background_available()
        self.background, self.early = background, early
        self._mark: Optional[tuple[int, float, list[int]]] = None

    def choose(self, done: int, steps: Sequence[tuple[object, int]]) -> Optional[list]:
        """The steps to fuse after ``done`` iterations: ``[]`` (none, or not yet), a list of
        steps (in the order to compile them; in the background if :attr:`background`), or
        ``None`` for every step, now and later. ``steps`` pairs each traced step (with ``name``,
        ``call_time()`` and ``compile_seconds()``) with its calls so far. Decides once."""
        if self.decided:
            return []
        if self.compiler == "inductor":
            self.decided, self.reason = True, "compiler='inductor'"
            return None
        if done == 0 or not steps:
            return []
        if self.early and self.background:
            return self._early(steps) if self._available() else []
        if self._mark is None:
            self._mark = (done, time.perf_counter(), [calls for _, calls in steps])
            return []
        elapsed = time.perf_counter() - self._mark[1]
        wait = self.check_after_background if self.background else self.check_after
        if elapsed < wait or len(steps) != len(self._mark[2]):
            return []
        return self._profitable(done, steps, elapsed) if self._available() else []

    def _available(self) -> bool:
        """Decide now; whether fused kernels can be built here (if not, :attr:`reason` says why)."""
        self.decided = True
        unavailable = fast_inductor.fusion_unavailable()
        if unavailable:
            self.reason = f"not fused: {unavailable}"
        return not unavailable

    def _early(self, steps: Sequence[tuple[object, int]]) -> list:
        self.reason = "; ".join(
            f"{step.name} fused in the background (sent when traced: a run of {self.total} iterations)"
            for step, _ in steps
        )
        return [step for step, _ in steps]

    def _profitable(self, done: int, steps: Sequence[tuple[object, int]], elapsed: float) -> list:
        mark_done, _, mark_calls = self._mark
        remaining_iterations = self.total - done
        seconds_per_iteration = elapsed / (done - mark_done)
        setup = 0.0 if fast_inductor._setup_done else fast_inductor.SETUP_SECONDS
        background_setup = 0.0 if fast_background.server_ready() else fast_inductor.SETUP_SECONDS
        chosen, notes, ready_after = [], [], 0.0
        for (step, calls), calls_at_mark in zip(steps, mark_calls):
            remaining_calls = (calls - calls_at_mark) / (done - mark_done) * remaining_iterations
            if getattr(step, "runner", getattr(step, "backend", "")) == "vm":
                speedup = fast_inductor.VM_SPEEDUP
            else:
                speedup = (
                    fast_inductor.RECYCLED_SPEEDUP
                    if getattr(step, "recycle", False)
                    else fast_inductor.EXPECTED_SPEEDUP
                )
            per_call = step.call_time() * (1.0 - 1.0 / speedup)
            compile_seconds = step.compile_seconds()
            if self.background:
                # The compile server pays Inductor's setup once per process and compiles the
                # chosen graphs in order; each waits for the ones before it while the traced
                # step runs.
                cost = compile_seconds + (0.0 if chosen else background_setup)
                waiting = (ready_after + cost) / (seconds_per_iteration * max(remaining_iterations, 1))
                saving = remaining_calls * max(0.0, 1.0 - waiting) * per_call
                fuse = saving > fast_inductor.BACKGROUND_MARGIN * cost
            else:
                cost = compile_seconds + setup
                saving = remaining_calls * per_call
                fuse = saving > fast_inductor.MARGIN * cost
            if fuse:
                chosen.append(step)
                setup, ready_after = 0.0, ready_after + cost
            how = "fused in the background" if self.background else "fused"
            notes.append(
                f"{step.name} {how if fuse else 'not fused'} (saves ~{saving:.1f} s, compiles in ~{cost:.1f} s)"
            )
        self.reason = "; ".join(notes)
        return chosen
