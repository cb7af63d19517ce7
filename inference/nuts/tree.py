r"""NUTS trajectories grown for all chains at once: the tree state, the doubling of each
chain's trajectory, and the merge of a sub-trajectory into its tree.

Each transition doubles a trajectory per chain (multinomial sampling, Betancourt's generalised
U-turn criterion checked on every balanced sub-trajectory, as in Stan and NumPyro's iterative
NUTS). All chains take their leapfrog steps together: chains whose tree has stopped are masked,
so Python and dispatch overhead is paid once per step for all chains. A leaf
(:func:`~vilab.inference.engine.api.leaf_step`) and a merge (:func:`merge_fields`, which also
picks the next sub-tree's direction and edge) each run as one traced or fused graph.

References:
    The No-U-Turn Sampler: Adaptively Setting Path Lengths in Hamiltonian Monte Carlo,
    Hoffman and Gelman, 2014, arXiv:1111.4246.
    A Conceptual Introduction to Hamiltonian Monte Carlo, Betancourt, 2017, arXiv:1701.02434.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from vilab.inference.nuts.adaptation import Metric
from vilab.inference.engine.api import (
    LEAF_FIELDS,
    BatchedPotential,
    NutsSteps,
    checkpoint_masks,
    is_turning,
    leaf_step,
    nuts_steps,
    select as _select,
)

__all__ = ["TreeState", "TREE_FIELDS", "TreeBuilder", "merge_fields", "find_reasonable_step_size"]


@dataclass
class TreeState:
    """Per-chain trajectory being built; every tensor has leading dimension ``C``."""

    z_left: torch.Tensor
    r_left: torch.Tensor
    grad_left: torch.Tensor
    z_right: torch.Tensor
    r_right: torch.Tensor
    grad_right: torch.Tensor
    z_proposal: torch.Tensor
    potential_proposal: torch.Tensor
    grad_proposal: torch.Tensor
    energy_proposal: torch.Tensor
    log_weight: torch.Tensor
    r_sum: torch.Tensor
    turning: torch.Tensor
    diverging: torch.Tensor
    sum_accept: torch.Tensor
    num_steps: torch.Tensor
    depth: torch.Tensor


TREE_FIELDS = tuple(field.name for field in dataclasses.fields(TreeState))
# The merge reads the sub-trajectory's fields up to ``turning``, not its checkpoints.
_MERGED_LEAF_FIELDS = LEAF_FIELDS.index("turning") + 1


class _Leapfrog:
    """Velocity Verlet step with per-chain signed step sizes ``(C, 1)``."""

    def __init__(self, potential, metric: Metric) -> None:
        self.potential, self.metric = potential, metric

    def __call__(self, z, r, grad, step):
        r_half = r - (0.5 * step) * grad
        z_new = z + step * self.metric.velocity(r_half)
        potential, grad_new = self.potential(z_new)
        r_new = r_half - (0.5 * step) * grad_new
        return z_new, r_new, grad_new, potential


class TreeBuilder:
    """Grows NUTS trajectories for a fixed batch of chains.

    Args:
        potential: batched potential (its eager path is the reference a traced leaf is checked
            against).
        num_chains: batch size ``C``.
        max_tree_depth: at most ``2**max_tree_depth - 1`` leapfrog steps per transition.
        generator: source of randomness.
        compile: run each leaf, and each merge of a sub-trajectory into its tree, as one traced
            graph (ignored with ``steps``).
        vm: run each traced graph on the virtual machine: ``"faster"`` where it is faster than
            the traced graph, ``"always"`` wherever it translates, ``None`` never (ignored with
            ``steps``).
        steps: the engine's leaf and merge steps and their schedule
            (:func:`~vilab.inference.engine.api.nuts_steps`); default: made from ``compile`` and
            ``vm``, never fused unless :meth:`fuse` is called.
    """

    def __init__(
        self,
        potential: BatchedPotential,
        num_chains: int,
        max_tree_depth: int,
        generator: torch.Generator,
        compile: bool = True,
        vm: str | None = None,
        steps: NutsSteps | None = None,
    ) -> None:
        self.potential, self.num_chains = potential, num_chains
        self.max_tree_depth, self.generator = max_tree_depth, generator
        self.steps = steps or nuts_steps(potential, merge_fields, len(TREE_FIELDS), compile=compile, vm=vm)
        self._masks = [checkpoint_masks(leaf, max_tree_depth) for leaf in range(2 ** (max_tree_depth - 1))]
        self._fresh_key, self._fresh_state = None, ()
        self._uniform_buffer, self._uniform_rows = None, None

    @property
    def compiled(self) -> bool:
        return self.steps.compiled

    @property
    def backend(self) -> str:
        """How the leaf runs: ``"eager"``, ``"graph"`` (fx code), ``"vm"`` (virtual machine) or
        ``"inductor"`` (fused kernel)."""
        return self.steps.backend

    def step_calls(self) -> list:
        """Each traced step with its calls so far (leaves, then merges)."""
        return self.steps.step_calls()

    def fuse(self, steps: list | None = None) -> None:
        """Run ``steps`` (default: every leaf and merge, now and from now on) as fused kernels."""
        self.steps.fuse(steps)

    def close(self) -> None:
        """Stop background compilations still running (the run is over)."""
        self.steps.close()

    def _subtree(self, start: tuple, potential_proposal, depth: int, active, energy, metric):
        """Take ``2**depth`` leapfrog steps from each chain's edge ``start = (z, r, grad,
        signed step (C, 1))``, stopping a chain at a U-turn inside the new sub-trajectory or a
        divergence."""
        z, r, grad, step = start
        no_weight, zero_sum, zero, no_steps, flags, checkpoints = self._fresh(z, energy, potential_proposal)
        state = (
            z,
            r,
            grad,
            z,
            potential_proposal,
            grad,
            energy,
            no_weight,
            zero_sum,
            zero,
            no_steps,
            flags,
            flags,
            active,
            checkpoints,
            checkpoints,
        )
        log_uniforms = self._log_uniforms(depth, z.dtype)
        stepper, inverse_mass = None, metric.inverse_mass
        for leaf, log_uniform in enumerate(log_uniforms):
            inputs = (*state, step, energy, inverse_mass, *self._masks[leaf], log_uniform)
            if stepper is None:  # the loop runs ~10^5 times per run: no per-leaf lookups
                stepper = self.steps.leaf(metric.dense, inputs).function
            try:
                *state, alive = stepper(*inputs)
            except torch.linalg.LinAlgError:  # a chain's point fails a factorisation: see the potential
                *state, alive = leaf_step(self.potential.eager_value_and_grad, *inputs)
            if not bool(alive):
                break
        self.steps.leaf_calls += leaf + 1
        return state

    def _log_uniforms(self, depth: int, dtype: torch.dtype) -> tuple:
        """One log-uniform per leaf of a depth-``depth`` sub-tree and chain, as rows of a buffer
        refilled in place: a leaf reads its row only while it runs, and slicing the rows once
        spares a sub-tree of 64 leaves about 60 µs of views. Logged once per sub-tree rather
        than exponentiated in every leaf."""
        if self._uniform_rows is None or self._uniform_rows[0].dtype != dtype:
            buffer = torch.empty(2 ** (self.max_tree_depth - 1), self.num_chains, dtype=dtype)
            self._uniform_buffer, self._uniform_rows = buffer, buffer.unbind(0)
        count = 2**depth
        torch.rand(
            count, self.num_chains, generator=self.generator, dtype=dtype, out=self._uniform_buffer[:count]
        ).log_()
        return self._uniform_rows[:count]

    def _fresh(self, z, energy, potential) -> tuple:
        """A new sub-trajectory's constant state: log-weight ``-inf``, zero sums and counts, no
        flags, empty checkpoints. Made once per shape and shared: no step writes its inputs."""
        key = (z.shape, z.dtype)
        if self._fresh_key != key:
            self._fresh_key = key
            self._fresh_state = (
                torch.full_like(energy, -math.inf),
                torch.zeros_like(z),
                torch.zeros_like(energy),
                torch.zeros(z.shape[0], dtype=torch.long),
                torch.zeros(z.shape[0], dtype=torch.bool),
                z.new_zeros(self.max_tree_depth, *z.shape),
            )
        return self._fresh_state

    def transition(self, z, potential, grad, metric: Metric, step_size) -> TreeState:
        """One NUTS transition for every chain from states ``(C, D)`` with potentials ``(C,)``
        and gradients ``(C, D)``; the returned tree's ``*_proposal`` fields hold the next state."""
        r = metric.sample_momentum(z.shape, self.generator)
        energy = potential + metric.kinetic(r)
        zero = torch.zeros_like(potential)
        flags = torch.zeros(z.shape[0], dtype=torch.bool)
        counts = torch.zeros(z.shape[0], dtype=torch.long)
        tree = TreeState(
            z, r, grad, z, r, grad, z, potential, grad, energy, zero, r, flags, flags, zero, counts, counts
        )
        going_right = torch.rand(z.shape[0], generator=self.generator) < 0.5
        start = (z, r, grad, torch.where(going_right, step_size, -step_size).unsqueeze(-1))
        active = ~flags
        for depth in range(self.max_tree_depth):
            sub = self._subtree(start, tree.potential_proposal, depth, active, energy, metric)
            # The merge also picks the next sub-tree's direction and edge: fewer small ops per
            # doubling, and inside the (possibly fused) merge graph.
            uniforms = torch.rand(2, z.shape[0], generator=self.generator, dtype=z.dtype)
            inputs = (
                *[getattr(tree, name) for name in TREE_FIELDS],
                *sub[:_MERGED_LEAF_FIELDS],
                active,
                going_right,
                metric.inverse_mass,
                uniforms,
                step_size,
            )
            *merged, z_edge, r_edge, grad_edge, step, active, going_right, any_active = self.steps.merge(
                metric.dense, inputs
            )(*inputs)
            tree = TreeState(*merged)
            self.steps.merge_calls += 1
            if not bool(any_active):
                break
            start = (z_edge, r_edge, grad_edge, step)
        return tree


def merge_fields(*args):
    """:func:`_merge` on flat tensors: the :data:`TREE_FIELDS`, the first
    ``_MERGED_LEAF_FIELDS`` of :data:`LEAF_FIELDS`, ``active``, ``going_right``,
    ``inverse_mass``, two uniforms per chain ``(2, C)`` (the proposal's acceptance, the next
    direction) and the step sizes ``(C,)``. Returns the merged tree's fields, then the next
    sub-tree's start (edge ``z``, ``r``, ``grad``, signed step ``(C, 1)``), which chains go on,
    its direction, and whether any chain goes on."""
    num_tree = len(TREE_FIELDS)
    tree = TreeState(*args[:num_tree])
    sub = dict(zip(LEAF_FIELDS, args[num_tree : num_tree + _MERGED_LEAF_FIELDS]))
    active, going_right, inverse_mass, uniforms, step_size = args[num_tree + _MERGED_LEAF_FIELDS :]
    merged = _merge(tree, sub, active, going_right, inverse_mass, uniforms[0])
    next_right = uniforms[1] < 0.5
    next_active = ~merged.turning & ~merged.diverging
    return (
        *(getattr(merged, name) for name in TREE_FIELDS),
        _select(next_right, merged.z_right, merged.z_left),
        _select(next_right, merged.r_right, merged.r_left),
        _select(next_right, merged.grad_right, merged.grad_left),
        torch.where(next_right, step_size, -step_size).unsqueeze(-1),
        next_active,
        next_right,
        next_active.any(),
    )


def _merge(
    tree: TreeState,
    sub: dict,
    active: torch.Tensor,
    going_right: torch.Tensor,
    inverse_mass: torch.Tensor,
    uniform: torch.Tensor,
) -> TreeState:
    """Append a sub-trajectory to the tree; the proposal moves to it with probability
    ``min(1, w_sub / w_tree)`` (biased progressive sampling), never from a stopped sub-tree."""
    z_edge, r_edge, grad_edge = sub["z_edge"], sub["r_edge"], sub["grad_edge"]
    right, left = active & going_right, active & ~going_right
    z_right, r_right = _select(right, z_edge, tree.z_right), _select(right, r_edge, tree.r_right)
    z_left, r_left = _select(left, z_edge, tree.z_left), _select(left, r_edge, tree.r_left)
    grad_right = _select(right, grad_edge, tree.grad_right)
    grad_left = _select(left, grad_edge, tree.grad_left)
    r_sum = _select(active, tree.r_sum + sub["r_sum"], tree.r_sum)
    stopped = sub["turning"] | sub["diverging"]
    accept_prob = torch.clamp(torch.exp(sub["log_weight"] - tree.log_weight), max=1.0)
    take = active & ~stopped & (uniform < accept_prob)
    turning = sub["turning"] | is_turning(inverse_mass, r_left, r_right, r_sum)
    return TreeState(
        z_left,
        r_left,
        grad_left,
        z_right,
        r_right,
        grad_right,
        _select(take, sub["z_proposal"], tree.z_proposal),
        torch.where(take, sub["potential_proposal"], tree.potential_proposal),
        _select(take, sub["grad_proposal"], tree.grad_proposal),
        torch.where(take, sub["energy_proposal"], tree.energy_proposal),
        torch.where(active, torch.logaddexp(tree.log_weight, sub["log_weight"]), tree.log_weight),
        r_sum,
        torch.where(active, turning, tree.turning),
        torch.where(active, sub["diverging"], tree.diverging),
        tree.sum_accept + torch.where(active, sub["sum_accept"], torch.zeros_like(tree.sum_accept)),
        tree.num_steps + torch.where(active, sub["num_steps"], torch.zeros_like(tree.num_steps)),
        tree.depth + active.long(),
    )


def find_reasonable_step_size(
    z: torch.Tensor,
    potential: torch.Tensor,
    grad: torch.Tensor,
    *,
    potential_fn,
    metric: Metric,
    step_size: torch.Tensor,
    generator: torch.Generator,
    max_iterations: int = 100,
) -> torch.Tensor:
    """Hoffman and Gelman's heuristic (Algorithm 4), per chain: double or halve the step size
    until the one-step acceptance probability crosses 0.8."""
    leapfrog = _Leapfrog(potential_fn, metric)
    log_target = math.log(0.8)
    direction, done = None, torch.zeros(z.shape[0], dtype=torch.bool)
    finfo = torch.finfo(z.dtype)
    for _ in range(max_iterations):
        r = metric.sample_momentum(z.shape, generator)
        energy = potential + metric.kinetic(r)
        _, r_new, _, potential_new = leapfrog(z, r, grad, step_size.unsqueeze(-1))
        delta = potential_new + metric.kinetic(r_new) - energy
        delta = torch.where(torch.isnan(delta), torch.full_like(delta, math.inf), delta)
        step_direction = torch.where(-delta > log_target, 1.0, -1.0).to(z.dtype)
        if direction is None:
            direction = step_direction
        done = done | (step_direction != direction)
        if bool(done.all()):
            break
        step_size = torch.where(done, step_size, step_size * 2.0**direction)
        step_size = step_size.clamp(min=finfo.tiny**0.5, max=1e7)
    return step_size
