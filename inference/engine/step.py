r"""One leaf of a NUTS sub-trajectory for all chains, as a single traced graph.

A leaf is a leapfrog step from each chain's trajectory edge followed by the bookkeeping of the
sub-trajectory: progressive multinomial sampling of the proposal, the running momentum sum,
acceptance statistics, the divergence test and the U-turn checks against the checkpointed
momenta of every balanced sub-tree that closes at this leaf (NumPyro's iterative scheme).
Which checkpoints are written and tested depends only on the leaf index, so it enters as two
mask tensors and the same graph serves every leaf. That graph, potential and gradient
included, is traced once with ``make_fx`` and shrunk (:mod:`~vilab.inference.engine.graph.simplify`);
the traced graph runs as ``torch.fx`` code (ATen ops without Pyro's bookkeeping), on the
virtual machine (:mod:`~vilab.inference.engine.backends.vm`: one C call for the whole leaf) or as a
fused Inductor kernel. The same machinery (:class:`CompiledStep`) runs the merge of a
sub-trajectory into its tree.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Iterator

import torch

from vilab.inference.engine.processes.server import BackgroundCompile, BackgroundTicket
from vilab.inference.engine.graph.simplify import simplify
from vilab.inference.engine.backends.inductor import compile_fused, load_cached, predicted_compile_seconds
from vilab.inference.engine.backends.vm import Unsupported, vm_step

from vilab.inference.engine.verify import _all_close as _all_close  # also imported from here
from vilab.inference.engine.verify import _call_time as _call_time
from vilab.inference.engine.verify import _describe

__all__ = ["LEAF_FIELDS", "leaf_step", "CompiledStep", "make_leaf_stepper", "checkpoint_masks", "threads_for"]

# Stan's threshold on the energy error that marks a divergent trajectory.
MAX_DELTA_ENERGY = 1000.0

LEAF_FIELDS = (
    "z_edge",
    "r_edge",
    "grad_edge",
    "z_proposal",
    "potential_proposal",
    "grad_proposal",
    "energy_proposal",
    "log_weight",
    "r_sum",
    "sum_accept",
    "num_steps",
    "diverging",
    "turning",
    "running",
    "r_checkpoints",
    "r_sum_checkpoints",
)


# A fused kernel replaces the traced step only if it is at least this much faster per call.
FUSED_MAX_TIME_RATIO = 0.8

# Below this many numbers in the largest tensor a compiled step runs on one intra-op thread.
SMALL_NUMEL = 1 << 15


@contextlib.contextmanager
def threads_for(numel: float) -> Iterator[None]:
    """One intra-op thread while the tensors are small (fewer than :data:`SMALL_NUMEL` numbers):
    splitting a few thousand numbers across threads costs more than it saves, and on a busy
    machine every parallel op waits for its slowest thread (a 4x slowdown of a NUTS leaf, and
    the square root of Adam's update 5x slower, measured on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    if numel < SMALL_NUMEL:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def velocity(inverse_mass: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """:math:`M^{-1} r` for a diagonal ``(C, D)`` or dense ``(C, D, D)`` inverse mass; ``r`` may
    carry extra leading dimensions."""
    if inverse_mass.dim() == 3:
        return (inverse_mass @ r.unsqueeze(-1)).squeeze(-1)
    return inverse_mass * r


def is_turning(inverse_mass, r_left, r_right, r_sum) -> torch.Tensor:
    """Betancourt's generalised criterion (2017, A.4.2) with the end momenta's half weights
    removed from the momentum sum."""
    rho = r_sum - 0.5 * (r_left + r_right)
    left = (velocity(inverse_mass, r_left) * rho).sum(-1)
    right = (velocity(inverse_mass, r_right) * rho).sum(-1)
    # (left <= 0) | (right <= 0) in two ops instead of three (comparisons are the slowest ops
    # of a leaf); fmin ignores a NaN, as the comparison of a NaN with 0 is False.
    return torch.fmin(left, right) <= 0


def _select(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(mask.shape + (1,) * (new.dim() - mask.dim())), new, old)


def leaf_step(
    potential_fn: Callable,
    z_edge,
    r_edge,
    grad_edge,
    z_proposal,
    potential_proposal,
    grad_proposal,
    energy_proposal,
    log_weight,
    r_sum,
    sum_accept,
    num_steps,
    diverging,
    turning,
    running,
    r_checkpoints,
    r_sum_checkpoints,
    step,
    energy_initial,
    inverse_mass,
    write_mask,
    check_mask,
    log_uniform,
):
    """Advance every running chain's sub-trajectory by one leaf; see :data:`LEAF_FIELDS` for the
    state, all with leading dimension ``C`` except the checkpoints ``(T, C, D)``.

    A fresh sub-trajectory starts with ``log_weight = -inf`` and zero sums, so that its first
    leaf is always taken as proposal. ``running`` marks the chains that take this leaf; the
    returned one marks those that take the next (not stopped by a U-turn or a divergence here),
    and the last output, a scalar bool, says whether any does (read once per leaf instead of
    computed by more dispatched ops). ``log_uniform`` is the log of a uniform draw per chain,
    for the progressive sampling of the proposal.
    """
    r_half = r_edge - (0.5 * step) * grad_edge
    z_new = z_edge + step * velocity(inverse_mass, r_half)
    potential, grad_new = potential_fn(z_new)
    r_new = r_half - (0.5 * step) * grad_new
    energy = potential + 0.5 * (r_new * velocity(inverse_mass, r_new)).sum(-1)
    delta = energy - energy_initial
    delta = torch.nan_to_num(delta, nan=math.inf, posinf=math.inf, neginf=-math.inf)
    accept = torch.clamp(torch.exp(-delta), max=1.0)
    new_log_weight = torch.logaddexp(log_weight, -delta)
    take = running & (log_uniform < -delta - new_log_weight)
    r_sum = _select(running, r_sum + r_new, r_sum)
    r_checkpoints = torch.where(write_mask, r_new.unsqueeze(0), r_checkpoints)
    r_sum_checkpoints = torch.where(write_mask, r_sum.unsqueeze(0), r_sum_checkpoints)
    subtree_r_sum = r_sum.unsqueeze(0) - r_sum_checkpoints + r_checkpoints
    turned = (is_turning(inverse_mass, r_checkpoints, r_new.unsqueeze(0), subtree_r_sum) & check_mask).any(0)
    diverging = torch.where(running, delta > MAX_DELTA_ENERGY, diverging)
    turning = torch.where(running, turned, turning)
    going_on = running & ~turning & ~diverging
    return (
        _select(running, z_new, z_edge),
        _select(running, r_new, r_edge),
        _select(running, grad_new, grad_edge),
        _select(take, z_new, z_proposal),
        torch.where(take, potential, potential_proposal),
        _select(take, grad_new, grad_proposal),
        torch.where(take, energy, energy_proposal),
        torch.where(running, new_log_weight, log_weight),
        r_sum,
        sum_accept + accept * running,
        num_steps + running.to(num_steps.dtype),
        diverging,
        turning,
        going_on,
        r_checkpoints,
        r_sum_checkpoints,
        going_on.any(),
    )


def checkpoint_masks(leaf: int, max_tree_depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Write and check masks ``(T, 1, 1)`` and ``(T, 1)`` for leaf ``leaf`` (0-based).

    Even leaves open balanced sub-trees and store their momentum at checkpoint
    ``popcount(leaf >> 1)``; a leaf whose index ends in ``k`` one-bits closes ``k`` sub-trees,
    tested against the ``k`` checkpoints below that index.
    """
    idx_max = bin(leaf >> 1).count("1")
    trailing = len(bin(leaf)) - len(bin(leaf).rstrip("1")) if leaf & 1 else 0
    idx_min = idx_max - trailing + 1
    write = torch.zeros(max_tree_depth, 1, 1, dtype=torch.bool)
    check = torch.zeros(max_tree_depth, 1, dtype=torch.bool)
    if leaf % 2 == 0:
        write[idx_max] = True
    check[max(idx_min, 0) : idx_max + 1] = True
    return write, check


class Fusable:
    """Replacing a traced step by Inductor's fused kernel, compiled in-process (:meth:`fuse`)
    or in a background process (:meth:`fuse_start`, then :meth:`fuse_poll`), or loaded from an
    earlier compilation's cache entry (:meth:`fuse_from_cache`, which both try first). Either
    way the kernel must reproduce the step's eager check values and be faster
    (:func:`fuse_checked`); a failure is kept in :attr:`fuse_failure` and the traced step
    stays. Subclasses provide ``_fn`` (the current implementation), :attr:`is_fused`,
    ``_fusion_inputs()`` (``(graph, example, checks)``, or ``None`` having set
    :attr:`fuse_failure`) and ``_install(fused)``."""

    recycle = False
    fuse_failure = ""
    fused_from_cache = False
    _pending: BackgroundTicket | None = None

    def fuse(self) -> bool:
        """Compile the fused kernel now (or load it from the cache, :meth:`fuse_from_cache`) and
        use it if it passes the checks; returns whether the step is fused."""
        if self.is_fused or self.fuse_from_cache():
            return True
        inputs = self._fusion_inputs()
        if inputs is None:
            return False
        graph, example, checks = inputs
        return self._take(*fuse_checked(graph, example, checks, self._fn, recycle=self.recycle))

    def fuse_start(self, pending: BackgroundTicket | None = None) -> bool:
        """Start compiling the fused kernel in a forked process
        (:class:`~vilab.inference.engine.processes.server.BackgroundCompile`), or take ``pending``, this
        step's graph in a batch already compiling (:meth:`background_job`), while the traced step
        keeps running; :meth:`fuse_poll` installs it. Returns whether a compilation is under way."""
        if self.is_fused or self._pending is not None or (pending is None and self.fuse_from_cache()):
            if pending is not None:
                pending.close()
            return False
        if pending is None:
            job = self.background_job()
            if job is None:
                return False
            pending = BackgroundCompile(*job)
        self._pending = pending
        return True

    def background_job(self) -> tuple | None:
        """``(graph, example, recycle)`` for
        :class:`~vilab.inference.engine.processes.server.BackgroundCompiles`, or ``None`` (with
        :attr:`fuse_failure` set) where the step cannot be fused."""
        inputs = self._fusion_inputs()
        return None if inputs is None else (inputs[0], inputs[1], self.recycle)

    @property
    def fusing(self) -> bool:
        """Whether a background compilation is under way."""
        return self._pending is not None

    def fuse_poll(self) -> bool | None:
        """``None`` while the background compilation runs; then whether the step is fused."""
        if self._pending is None:
            return self.is_fused
        outcome = self._pending.result()  # called every iteration: nothing else until it is ready
        if outcome is None:
            return None
        self._pending = None
        fused, why = outcome
        if fused is not None:
            _, example, checks = self._fusion_inputs()
            fused, why = check_fused(fused, example, checks, self._fn)
        return self._take(fused, why)

    def fuse_from_cache(self) -> bool:
        """Use the kernel an earlier compilation of this graph left in Inductor's cache directory
        (:func:`~vilab.inference.engine.backends.inductor.load_cached`: milliseconds, no compilation), if
        there is one and it passes the checks; returns whether the step is now fused from it."""
        if self.is_fused or self._pending is not None:
            return False
        inputs = self._fusion_inputs()
        if inputs is None:
            return False
        graph, example, checks = inputs
        loaded = load_cached(graph, example, recycle=self.recycle)
        if loaded is None:
            return False
        fused, _ = check_fused(loaded, example, checks, self._fn)
        if fused is None:
            return False
        self.fused_from_cache = True
        return self._take(fused, "")

    def _take(self, fused: Callable | None, why: str) -> bool:
        self.fuse_failure = why
        if fused is None:
            return False
        self._install(fused)
        return True

    def fuse_cancel(self) -> None:
        """Stop a background compilation that is still running."""
        if self._pending is not None:
            self._pending.close()
            self._pending = None


class CompiledStep(Fusable):
    """A pure tensor function for fixed input shapes, traced into an ATen graph when possible.

    The function is traced with ``make_fx`` and simplified
    (:func:`~vilab.inference.engine.graph.simplify.simplify`); the graph (``backend == "graph"``,
    fx's generated Python code) replaces the eager function only if it reproduces it on a second
    input (its first output state fed back); otherwise the eager function runs. The graph can
    then move to the virtual machine (:meth:`run_on_vm`) or a fused kernel (:meth:`fuse`).

    Args:
        eager_fn: the reference function of tensors, returning a tuple of tensors.
        example: example inputs.
        compile: try to trace at all.
        trace_fn: the same function built from cheaper-to-trace parts (e.g. an already traced
            potential); defaults to ``eager_fn``.
        num_state: how many leading outputs are fed back as the leading inputs of the check.
        name: what the step is, for messages.
        recycle: once fused, return tensors from buffers that are reused two calls later
            (:func:`~vilab.inference.engine.backends.recycle.recycled_call`); only for a caller that is done
            with a call's outputs when the call after next starts.
    """

    def __init__(
        self,
        eager_fn: Callable,
        example: tuple,
        compile: bool = True,
        trace_fn: Callable | None = None,
        num_state: int = 0,
        name: str = "step",
        recycle: bool = False,
    ) -> None:
        self.name, self.recycle = name, recycle
        self._eager, self._trace_fn = eager_fn, trace_fn or eager_fn
        self._fn, self.compiled, self._num_state = eager_fn, False, num_state
        self.failure = "" if compile else "compilation not requested"
        self.backend, self._check, self.fuse_failure, self.vm_failure = "eager", None, "", ""
        if compile:
            self._try_compile(example)

    def __call__(self, *args):
        return self._fn(*args)

    def run_on_vm(self, require_faster: bool = True) -> bool:
        """Run the traced step as a program of the virtual machine
        (:func:`~vilab.inference.engine.backends.vm.vm_step`: milliseconds to translate, no compiling) if
        it translates, reproduces the eager check values and (with ``require_faster``) is faster
        (:func:`check_fused`); returns whether it runs there. The step can still be fused by
        Inductor later; a reason for not running it is kept in :attr:`vm_failure`."""
        if self.backend in ("vm", "inductor") or self._check is None:
            return self.backend == "vm"
        graph, example, following, expected = self._check
        try:
            program = vm_step(graph, example, recycle=self.recycle)
        except Unsupported as error:
            self.vm_failure = f"not translated: {error}"
            return False
        program, why = check_fused(program, example, [(following, expected)], self._fn, require_faster)
        if program is None:
            self.vm_failure = why.replace("the fused kernel", "the program")
            return False
        self._fn, self.backend = program, "vm"
        return True

    def call_time(self) -> float:
        """Seconds per call of the current implementation, timed on the check input (0 once
        fused or where nothing was traced)."""
        return 0.0 if self._check is None else _call_time(self._fn, self._check[2])

    def compile_seconds(self) -> float:
        """Predicted seconds to fuse the step
        (:func:`~vilab.inference.engine.backends.inductor.predicted_compile_seconds`; 0 where nothing was
        traced)."""
        return 0.0 if self._check is None else predicted_compile_seconds(*self._check[:2])

    @property
    def recycled(self) -> bool:
        """Whether the fused kernel reuses its buffers (see ``recycle``)."""
        return bool(getattr(self._fn, "recycled", False))

    @property
    def function(self) -> Callable:
        """The current implementation (eager, traced or fused), for hot loops that call it
        directly; it changes when the step is fused."""
        return self._fn

    @property
    def is_fused(self) -> bool:
        return self.backend == "inductor"

    def _fusion_inputs(self):
        if self._check is None:
            self.fuse_failure = "the step was not traced"
            return None
        graph, example, following, expected = self._check
        return graph, example, [(following, expected)]

    def _install(self, fused: Callable) -> None:
        self._fn, self.backend, self._check = fused, "inductor", None

    def _check_values(self, graph, example: tuple, following: tuple) -> tuple:
        """``(graph's outputs, eager outputs, input)`` at ``following``, or, where the graph
        cannot evaluate it (a chain there has a covariance whose Cholesky fails: the graph raises
        as PyTorch does, the eager potential makes that chain a divergence, the virtual machine a
        NaN factor), at points between ``example`` and ``following``. Still a distinct input."""
        for weight in (1.0, 0.5, 0.1):
            point = tuple(
                a + weight * (b - a) if i < self._num_state and b.is_floating_point() else b
                for i, (a, b) in enumerate(zip(example, following))
            )
            try:
                return graph(*point), self._eager(*point), point
            except torch.linalg.LinAlgError:
                continue
        return graph(*example), self._eager(*example), example  # the traced point: it evaluated

    def _try_compile(self, example: tuple) -> None:
        from torch.fx.experimental.proxy_tensor import make_fx

        # Tracers identify inputs by object: aliased example inputs would be fused in the graph.
        example = tuple(tensor.clone() for tensor in example)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = simplify(make_fx(self._trace_fn)(*example))
            # Check on a second input whose state tensors are distinct and non-trivial.
            following = (*self._eager(*example)[: self._num_state], *example[self._num_state :])
            got, expected, following = self._check_values(graph, example, following)
            if not _all_close(got, expected):
                self.failure = "the traced graph disagrees with the eager function"
                return
        except (RuntimeError, TypeError, ValueError) as error:
            # A function that cannot be traced keeps the eager path: correct, only slower.
            self.failure = _describe(error)
            return
        self._fn, self.compiled, self.backend = graph, True, "graph"
        self._check = (graph, example, following, expected)


def make_leaf_stepper(
    eager_potential_fn: Callable, example: tuple, compile: bool = True, trace_potential_fn: Callable | None = None
) -> CompiledStep:
    """:func:`leaf_step` for a fixed batch shape as a :class:`CompiledStep`.

    Args:
        eager_potential_fn: batched potential and gradient, ``(C, D) -> ((C,), (C, D))``.
        example: example leaf inputs (state, then ``step``, ``energy_initial``,
            ``inverse_mass``, ``write_mask``, ``check_mask``, ``log_uniform``).
        compile: trace the leaf into an ATen graph (checked against the eager leaf).
        trace_potential_fn: the potential as an already traced graph, much faster to trace
            again than Pyro.
    """
    trace_fn = None if trace_potential_fn is None else (lambda *args: leaf_step(trace_potential_fn, *args))
    # The sampler's leaf loop feeds each leaf's outputs to the next leaf, and the last leaf's to
    # the merge, before the call after next: the fused leaf can reuse its buffers.
    return CompiledStep(
        lambda *args: leaf_step(eager_potential_fn, *args),
        example,
        compile=compile,
        trace_fn=trace_fn,
        num_state=len(LEAF_FIELDS),
        name="leaf",
        recycle=True,
    )


def fuse_checked(
    graph, example: tuple, checks: list[tuple[tuple, tuple]], current: Callable, recycle: bool = False
) -> tuple[Callable | None, str]:
    """``graph`` compiled by :func:`~vilab.inference.engine.backends.inductor.compile_fused` (with
    ``recycle``), kept only if it reproduces every ``(inputs, expected)`` of ``checks``, its
    outputs survive the next call (callers keep them), and it is at least
    ``1 / FUSED_MAX_TIME_RATIO`` times faster per call than ``current`` on the last check's
    inputs. Returns ``(fused, "")`` or ``(None, why not)``."""
    try:
        fused = compile_fused(graph, example, recycle=recycle)
    except (RuntimeError, AssertionError, OSError, TypeError, ValueError) as error:
        return None, _describe(error)
    return check_fused(fused, example, checks, current)


def check_fused(
    fused: Callable, example: tuple, checks: list[tuple[tuple, tuple]], current: Callable, require_faster: bool = True
) -> tuple[Callable | None, str]:
    """The checks of :func:`fuse_checked` on an already compiled ``fused`` (the speed check
    only with ``require_faster``)."""
    try:
        ok = True
        for inputs, expected in checks:
            got = fused(*inputs)
            kept = tuple(tensor.clone() for tensor in got)
            fused(*example)
            ok = ok and _all_close(got, expected) and _all_close(got, kept)
    except (RuntimeError, AssertionError, OSError, TypeError, ValueError) as error:
        return None, _describe(error)
    if not ok:
        return None, "the fused kernel disagrees with the eager step"
    if not require_faster:
        return fused, ""
    # Inductor inlines chains of elementwise ops; on a log-depth scan that recomputes each
    # round's inputs, and the fused kernel can be slower than the ops it replaces.
    timing_inputs = checks[-1][0]
    fused_time, traced_time = _call_time(fused, timing_inputs), _call_time(current, timing_inputs)
    if fused_time > FUSED_MAX_TIME_RATIO * traced_time:
        return None, (
            f"the fused kernel is slower ({fused_time * 1e6:.0f} µs per call against {traced_time * 1e6:.0f} µs traced)"
        )
    return fused, ""
