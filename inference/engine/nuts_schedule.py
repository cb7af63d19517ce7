r"""The NUTS leaf and merge steps of one batch of chains, and when they move to the virtual
machine or become fused kernels: the engine's scheduling for the sampler.

The tree builder (:class:`~vilab.inference.nuts.tree.TreeBuilder`) asks :class:`NutsSteps` for
a leaf step and a merge step per metric kind and calls them; everything about how they run
(traced or eager, on the virtual machine, fused now, fused in the background when
:class:`~vilab.inference.engine.policy.FusePolicy` says it pays) is decided here.
"""

from __future__ import annotations

import warnings
from typing import Callable

from vilab.inference.engine.policy import FusePolicy
from vilab.inference.engine.potential import BatchedPotential
from vilab.inference.engine.processes.server import BackgroundCompiles
from vilab.inference.engine.protocol import StepInfo
from vilab.inference.engine.step import CompiledStep, make_leaf_stepper

__all__ = ["NutsSteps", "PREPARE_ITERATIONS"]

# Runs this long (``compiler="auto"``) start the background compile server before tracing and
# send it their steps as soon as the first iteration has traced them: every model measured
# fused its leaf in such runs.
PREPARE_ITERATIONS = 1000


class NutsSteps:
    """The traced (or eager) leaf and merge steps of one batch and their fusion schedule.

    Args:
        potential: the batched potential (its traced graph is traced again into the leaf graph;
            its eager path is the reference the traced leaf is checked against).
        merge_fn: the merge of a sub-trajectory into its tree, a pure function of tensors.
        num_merge_state: how many of the merge's leading outputs are fed back as its inputs.
        compile: trace each leaf and merge (``False``: plain eager PyTorch).
        vm: run each traced step on the virtual machine: ``"faster"`` where it is faster than
            the traced graph, ``"always"`` wherever it translates, ``None`` never.
        policy: when to fuse (default: never, ``FusePolicy("graph")``).
    """

    def __init__(
        self,
        potential: BatchedPotential,
        merge_fn: Callable,
        num_merge_state: int,
        *,
        compile: bool = True,
        vm: str | None = None,
        policy: FusePolicy | None = None,
    ) -> None:
        self.potential, self.merge_fn, self.num_merge_state = potential, merge_fn, num_merge_state
        self.compile, self.vm = compile, vm
        self.policy = policy or FusePolicy("graph", 0)
        self.vm_notes: list[str] = []  # which steps run on the virtual machine, or why not
        self.fused_at: list[str] = []  # what became of background compilations, and when
        self._steppers: dict[bool, CompiledStep] = {}
        self._mergers: dict[bool, CompiledStep] = {}
        self._fuse, self.fuse_failure = False, ""
        self.leaf_calls = self.merge_calls = 0
        self._queue: list[CompiledStep] = []

    @classmethod
    def for_run(
        cls,
        potential: BatchedPotential,
        merge_fn: Callable,
        num_merge_state: int,
        *,
        compiler: str,
        total_iterations: int,
        background: bool,
        split: bool,
    ) -> "NutsSteps":
        """The steps of one run of ``total_iterations`` with ``compiler`` (one of
        :data:`~vilab.inference.engine.api.COMPILERS`), ``background`` compiles available and
        the chains ``split`` over processes."""
        # Split batches leave no core for a compile, and a blocking one paid in no run measured:
        # its saving, extrapolated from the deep trees of early warmup, was far too high (a
        # regression in float32: 7.8 s predicted, 3.6 s for the whole run on the VM).
        fuses = potential.compiled and compiler not in ("vm", "eager") and not (split and compiler == "auto")
        early = total_iterations >= PREPARE_ITERATIONS
        policy = FusePolicy(compiler if fuses else "graph", total_iterations, background=background, early=early)
        if compiler in ("vm", "eager"):
            policy.reason = f"compiler={compiler!r}"
        elif split and compiler == "auto":
            policy.reason = "not fused: the batches use every core (compiler='inductor' fuses at once)"
        # An explicit "vm" runs there even where it is slower (to compare it, or to test it).
        vm = {"auto": "faster", "vm": "always"}.get(compiler)
        return cls(potential, merge_fn, num_merge_state, compile=compiler != "eager", vm=vm, policy=policy)

    # ---- what the tree builder calls ---------------------------------------------------------

    @property
    def compiled(self) -> bool:
        return any(stepper.compiled for stepper in self._steppers.values())

    @property
    def backend(self) -> str:
        """How the leaf runs: ``"eager"``, ``"graph"`` (fx code), ``"vm"``
        (:mod:`~vilab.inference.engine.backends.vm`) or ``"inductor"`` (fused kernel)."""
        return next((stepper.backend for stepper in self._steppers.values()), "eager")

    @property
    def decision(self) -> str:
        """Why the steps run as they do: the policy's reason, the virtual machine's notes and
        what became of background compilations; a failed fusion's reason in parentheses."""
        decision = "; ".join(note for note in [self.policy.reason, *self.vm_notes, *self.fused_at] if note)
        return decision + (f" ({self.fuse_failure})" if self.fuse_failure else "")

    @property
    def info(self) -> StepInfo:
        """How the leaf runs and why."""
        return StepInfo(self.backend, self.backend == "inductor", self.decision)

    def leaf(self, dense: bool, example: tuple) -> CompiledStep:
        """The leaf step for a dense (or diagonal) metric, made at the first call."""
        if dense not in self._steppers:
            compile = self.compile and self.potential.compiled
            if self.compile and not self.potential.compiled:
                warnings.warn(
                    f"NUTS: the potential could not be traced ({self.potential.compile_failure or 'not requested'}); "
                    "the leapfrog leaf runs eagerly, correct but several times slower",
                    RuntimeWarning,
                    stacklevel=4,
                )
            stepper = make_leaf_stepper(
                self.potential.eager_value_and_grad,
                example,
                compile=compile,
                trace_potential_fn=self.potential.graph_module,
            )
            if compile and not stepper.compiled:
                warnings.warn(
                    f"NUTS: the leapfrog leaf could not be compiled ({stepper.failure}); "
                    "it runs eagerly, correct but several times slower",
                    RuntimeWarning,
                    stacklevel=4,
                )
            self._steppers[dense] = stepper
            self._install(stepper)
        return self._steppers[dense]

    def merge(self, dense: bool, example: tuple) -> CompiledStep:
        """The merge step for a dense (or diagonal) metric, made at the first call."""
        if dense not in self._mergers:
            # A merge's outputs are read by the next merge and the sub-tree between, and by the
            # sampler before the next transition's second merge (it copies what it keeps): a
            # fused merge may reuse its buffers.
            self._mergers[dense] = CompiledStep(
                self.merge_fn,
                example,
                compile=self.compile,
                num_state=self.num_merge_state,
                name="merge",
                recycle=True,
            )
            self._install(self._mergers[dense])
        return self._mergers[dense]

    def before_iteration(self, iteration: int) -> None:
        """Ask the policy whether to fuse now (until it has decided), or install the background
        kernels that are ready; cheap enough to call every iteration."""
        if not self.policy.decided:
            chosen = self.policy.choose(iteration, self.step_calls())
            if chosen and self.policy.background:
                self.fuse_in_background(chosen)
            elif chosen is None or chosen:
                self.fuse(chosen)
        elif self._queue:
            self.poll_fusion(iteration)

    # ---- fusion ------------------------------------------------------------------------------

    def step_calls(self) -> list[tuple[CompiledStep, int]]:
        """Each traced step with its calls so far (leaves, then merges)."""
        return [
            *((step, self.leaf_calls) for step in self._steppers.values() if step.compiled),
            *((step, self.merge_calls) for step in self._mergers.values() if step.compiled),
        ]

    def fuse(self, steps: list[CompiledStep] | None = None) -> None:
        """Run ``steps`` (default: every leaf and merge, now and from now on) as fused kernels
        (:meth:`~vilab.inference.engine.step.CompiledStep.fuse`); a step that cannot be fused keeps
        its traced graph, with one warning."""
        if steps is None:
            self._fuse = True
            steps = [*self._steppers.values(), *self._mergers.values()]
        for step in steps:
            self._fuse_step(step)

    def fuse_in_background(self, steps: list[CompiledStep]) -> None:
        """Compile ``steps`` one after another in the compile server
        (:class:`~vilab.inference.engine.processes.server.BackgroundCompiles`) while the traced steps keep
        running; :meth:`poll_fusion` installs each kernel when it is ready."""
        self._queue, jobs = [], []
        for step in steps:
            if not step.compiled or step.is_fused:
                continue
            if step.fuse_from_cache():
                self.fused_at.append(f"{step.name} loaded from the kernel cache")
                continue
            job = step.background_job()
            if job is None:
                self.fused_at.append(f"{step.name} not fused: {step.fuse_failure}")
                continue
            self._queue.append(step)
            jobs.append(job)
        if jobs:
            batch = BackgroundCompiles(jobs)
            for index, step in enumerate(self._queue):
                step.fuse_start(batch.ticket(index))

    @property
    def fusing(self) -> bool:
        """Whether a background compilation is under way or queued."""
        return bool(self._queue)

    def poll_fusion(self, iteration: int) -> None:
        """Install the background kernels that are ready (they arrive in the queue's order;
        ``iteration`` is recorded in :attr:`fused_at`)."""
        while self._queue:
            outcome = self._queue[0].fuse_poll()
            if outcome is None:
                return
            step = self._queue.pop(0)
            self.fused_at.append(
                f"{step.name} fused at iteration {iteration}"
                if outcome
                else f"{step.name} not fused: {step.fuse_failure}"
            )

    def close(self) -> None:
        """Stop background compilations still running (the run is over)."""
        for step in self._queue:
            step.fuse_cancel()
        self._queue = []

    def _install(self, step: CompiledStep) -> None:
        """A new step: to the virtual machine if asked, fused if every step is."""
        if self.vm and step.compiled:
            self.vm_notes.append(
                f"{step.name} on the virtual machine"
                if step.run_on_vm(self.vm == "faster")
                else f"{step.name} not on the virtual machine ({step.vm_failure})"
            )
        if self._fuse:
            self._fuse_step(step)

    def _fuse_step(self, step: CompiledStep) -> None:
        if step.compiled and not step.fuse() and not self.fuse_failure:
            self.fuse_failure = step.fuse_failure
            warnings.warn(
                f"NUTS: no fused kernel ({step.fuse_failure}); the traced step keeps running",
                RuntimeWarning,
                stacklevel=5,
            )
