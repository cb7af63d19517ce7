r"""A No-U-Turn sampler whose trees grow for all chains at once.

Each transition doubles a trajectory per chain (multinomial sampling, Betancourt's generalised
U-turn criterion checked on every balanced sub-trajectory, as in Stan and NumPyro's iterative
NUTS). All chains take their leapfrog steps together: chains whose tree has stopped are masked,
so Python and dispatch overhead is paid once per step for all chains and the potential is one
batched call (:class:`~vilab.inference.vectorized.BatchedPotential`). Masked chains waste a little
arithmetic but never change state, so each chain is an exact NUTS chain.

References:
    The No-U-Turn Sampler: Adaptively Setting Path Lengths in Hamiltonian Monte Carlo,
    Hoffman and Gelman, 2014, arXiv:1111.4246.
    A Conceptual Introduction to Hamiltonian Monte Carlo, Betancourt, 2017, arXiv:1701.02434.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from vilab.types import Model

from .fast_adapt import DualAveraging, Metric, Welford, adaptation_windows
from .fast_inductor import COMPILERS, FusePolicy
from .fast_leaf import (LEAF_FIELDS, CompiledStep, _select, checkpoint_masks, is_turning, make_leaf_stepper,
                        threads_for)
from .vectorized import BatchedPotential, VectorizationError

__all__ = ["VectorizedNutsResult", "VectorizationError", "sample_vectorized_nuts", "TreeState",
           "TREE_FIELDS", "TreeBuilder", "merge_fields", "find_reasonable_step_size"]


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
        potential: batched potential (its traced graph is traced again into the leaf graph; its
            eager path is the reference the traced leaf is checked against).
        num_chains: batch size ``C``.
        max_tree_depth: at most ``2**max_tree_depth - 1`` leapfrog steps per transition.
        generator: source of randomness.
        compile: run each leaf, and each merge of a sub-trajectory into its tree, as one traced
            graph (:class:`~vilab.inference.fast_leaf.CompiledStep`).
    """

    def __init__(self, potential: BatchedPotential, num_chains: int, max_tree_depth: int,
                 generator: torch.Generator, compile: bool = True) -> None:
        self.potential, self.num_chains = potential, num_chains
        self.max_tree_depth, self.generator, self.compile = max_tree_depth, generator, compile
        self._masks = [checkpoint_masks(leaf, max_tree_depth) for leaf in range(2 ** (max_tree_depth - 1))]
        self._steppers: dict[bool, CompiledStep] = {}
        self._mergers: dict[bool, CompiledStep] = {}
        self._fuse, self.fuse_failure = False, ""
        self.leaf_calls = self.merge_calls = 0
        self._fresh_key, self._fresh_state = None, ()

    @property
    def compiled(self) -> bool:
        return any(stepper.compiled for stepper in self._steppers.values())

    @property
    def backend(self) -> str:
        """How the leaf runs: ``"eager"``, ``"torchscript"``, ``"static runtime"`` or
        ``"inductor"`` (fused kernel)."""
        return next((stepper.backend for stepper in self._steppers.values()), "eager")

    def step_calls(self) -> list[tuple[CompiledStep, int]]:
        """Each traced step with its calls so far (leaves, then merges)."""
        return [*((step, self.leaf_calls) for step in self._steppers.values() if step.compiled),
                *((step, self.merge_calls) for step in self._mergers.values() if step.compiled)]

    def fuse(self, steps: list[CompiledStep] | None = None) -> None:
        """Run ``steps`` (default: every leaf and merge, now and from now on) as fused kernels
        (:meth:`~vilab.inference.fast_leaf.CompiledStep.fuse`); a step that cannot be fused keeps
        its traced graph, with one warning."""
        if steps is None:
            self._fuse = True
            steps = [*self._steppers.values(), *self._mergers.values()]
        for step in steps:
            self._fuse_step(step)

    def _fuse_step(self, step: CompiledStep) -> None:
        if step.compiled and not step.fuse() and not self.fuse_failure:
            self.fuse_failure = step.fuse_failure
            warnings.warn(f"NUTS: no fused kernel ({step.fuse_failure}); the traced step keeps running",
                          RuntimeWarning, stacklevel=4)

    def _stepper(self, dense: bool, example: tuple) -> CompiledStep:
        if dense not in self._steppers:
            compile = self.compile and self.potential.compiled
            stepper = make_leaf_stepper(self.potential.eager_value_and_grad, example, compile=compile,
                                        trace_potential_fn=self.potential.graph_module)
            if compile and not stepper.compiled:
                warnings.warn(f"NUTS: the leapfrog leaf could not be compiled ({stepper.failure}); "
                              "it runs eagerly, correct but several times slower", RuntimeWarning,
                              stacklevel=4)
            self._steppers[dense] = stepper
            if self._fuse:
                self._fuse_step(stepper)
        return self._steppers[dense]

    def _merger(self, dense: bool, example: tuple) -> CompiledStep:
        if dense not in self._mergers:
            self._mergers[dense] = CompiledStep(merge_fields, example, compile=self.compile,
                                                num_state=len(TREE_FIELDS), name="merge")
            if self._fuse:
                self._fuse_step(self._mergers[dense])
        return self._mergers[dense]

    def _subtree(self, tree: TreeState, depth: int, active, going_right, step_size, energy, metric):
        """Take ``2**depth`` leapfrog steps from each chain's edge in its direction, stopping a
        chain at a U-turn inside the new sub-trajectory or a divergence."""
        z = _select(going_right, tree.z_right, tree.z_left)
        r = _select(going_right, tree.r_right, tree.r_left)
        grad = _select(going_right, tree.grad_right, tree.grad_left)
        step = torch.where(going_right, step_size, -step_size).unsqueeze(-1)
        no_weight, zero_sum, zero, no_steps, flags, checkpoints = self._fresh(z, energy, tree.num_steps)
        state = (z, r, grad, z, tree.potential_proposal, grad, energy, no_weight, zero_sum, zero, no_steps,
                 flags, flags, active, checkpoints, checkpoints)
        # Logged once per sub-tree rather than exponentiated in every leaf.
        log_uniforms = torch.rand(2 ** depth, self.num_chains, generator=self.generator, dtype=z.dtype).log().unbind(0)
        stepper, inverse_mass = None, metric.inverse_mass
        for leaf, log_uniform in enumerate(log_uniforms):
            inputs = (*state, step, energy, inverse_mass, *self._masks[leaf], log_uniform)
            if stepper is None:  # the loop runs ~10^5 times per run: no per-leaf lookups
                stepper = self._stepper(metric.dense, inputs).function
            *state, alive = stepper(*inputs)
            if not bool(alive):
                break
        self.leaf_calls += leaf + 1
        return state

    def _fresh(self, z, energy, num_steps) -> tuple:
        """A new sub-trajectory's constant state: log-weight ``-inf``, zero sums and counts, no
        flags, empty checkpoints. Made once per shape and shared: no step writes its inputs."""
        key = (z.shape, z.dtype)
        if self._fresh_key != key:
            self._fresh_key = key
            self._fresh_state = (torch.full_like(energy, -math.inf), torch.zeros_like(z), torch.zeros_like(energy),
                                 torch.zeros_like(num_steps), torch.zeros(z.shape[0], dtype=torch.bool),
                                 z.new_zeros(self.max_tree_depth, *z.shape))
        return self._fresh_state

    def transition(self, z, potential, grad, metric: Metric, step_size) -> TreeState:
        """One NUTS transition for every chain from states ``(C, D)`` with potentials ``(C,)``
        and gradients ``(C, D)``; the returned tree's ``*_proposal`` fields hold the next state."""
        r = metric.sample_momentum(z.shape, self.generator)
        energy = potential + metric.kinetic(r)
        zero = torch.zeros_like(potential)
        flags = torch.zeros(z.shape[0], dtype=torch.bool)
        counts = torch.zeros(z.shape[0], dtype=torch.long)
        tree = TreeState(z, r, grad, z, r, grad, z, potential, grad, energy, zero, r, flags, flags,
                         zero, counts, counts)
        for depth in range(self.max_tree_depth):
            active = ~tree.turning & ~tree.diverging
            if not bool(active.any()):
                break
            going_right = torch.rand(z.shape[0], generator=self.generator) < 0.5
            sub = self._subtree(tree, depth, active, going_right, step_size, energy, metric)
            uniform = torch.rand(z.shape[0], generator=self.generator, dtype=z.dtype)
            inputs = (*[getattr(tree, name) for name in TREE_FIELDS], *sub[:_MERGED_LEAF_FIELDS],
                      active, going_right, metric.inverse_mass, uniform)
            tree = TreeState(*self._merger(metric.dense, inputs)(*inputs))
            self.merge_calls += 1
        return tree


def merge_fields(*args):
    """:func:`_merge` on flat tensors: the :data:`TREE_FIELDS`, the first
    ``_MERGED_LEAF_FIELDS`` of :data:`LEAF_FIELDS`, ``active``, ``going_right``,
    ``inverse_mass`` and ``uniform``; returns the merged tree's fields."""
    num_tree = len(TREE_FIELDS)
    tree = TreeState(*args[:num_tree])
    sub = dict(zip(LEAF_FIELDS, args[num_tree:num_tree + _MERGED_LEAF_FIELDS]))
    active, going_right, inverse_mass, uniform = args[num_tree + _MERGED_LEAF_FIELDS:]
    merged = _merge(tree, sub, active, going_right, inverse_mass, uniform)
    return tuple(getattr(merged, name) for name in TREE_FIELDS)


def _merge(tree: TreeState, sub: dict, active: torch.Tensor, going_right: torch.Tensor,
           inverse_mass: torch.Tensor, uniform: torch.Tensor) -> TreeState:
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
        z_left, r_left, grad_left, z_right, r_right, grad_right,
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


def find_reasonable_step_size(z: torch.Tensor, potential: torch.Tensor, grad: torch.Tensor, *,
                              potential_fn, metric: Metric, step_size: torch.Tensor,
                              generator: torch.Generator, max_iterations: int = 100) -> torch.Tensor:
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
        step_size = torch.where(done, step_size, step_size * 2.0 ** direction)
        step_size = step_size.clamp(min=finfo.tiny ** 0.5, max=1e7)
    return step_size


class VectorizedNutsResult(NamedTuple):
    """Draws and diagnostics of :func:`sample_vectorized_nuts`.

    Attributes:
        samples: constrained values ``(chain, draw, *site_shape)`` of every latent and
            ``pyro.deterministic`` site.
        sample_stats: per draw ``(chain, draw)``: ``diverging`` (bool), ``energy`` (Hamiltonian
            at the draw), ``tree_depth``, ``n_steps`` (leapfrog steps), ``step_size``,
            ``acceptance_rate`` (mean over the trajectory) and ``lp`` (log joint density in
            unconstrained space, Jacobian included, as Stan's ``lp__``).
        warmup_time: seconds spent in warmup, potential tracing and checks included.
        sampling_time: seconds spent drawing.
        inverse_mass_matrix: adapted metric, ``(chain, D)`` or ``(chain, D, D)``.
        compiled: whether the potential ran as a traced graph.
        backend: how the leapfrog leaf ran at the end: ``"eager"``, ``"torchscript"``,
            ``"static runtime"`` or ``"inductor"`` (fused C++ kernel).
        fuse_decision: why the leaf was or was not fused (:class:`~vilab.inference.fast_inductor.FusePolicy`).
    """

    samples: dict[str, torch.Tensor]
    sample_stats: dict[str, torch.Tensor]
    warmup_time: float
    sampling_time: float
    inverse_mass_matrix: torch.Tensor
    compiled: bool
    backend: str = "eager"
    fuse_decision: str = ""


def _initial_states(potential: BatchedPotential, num_chains: int, generator: torch.Generator,
                    max_tries: int = 100):
    """Stan's initialisation: uniform on (-2, 2) in unconstrained space, redrawn per chain until
    the potential and its gradient are finite."""
    dtype = torch.get_default_dtype()
    z = 4.0 * torch.rand(num_chains, potential.dim, generator=generator, dtype=dtype) - 2.0
    for _ in range(max_tries):
        value, grad = potential(z)
        bad = ~(torch.isfinite(value) & torch.isfinite(grad).all(-1))
        if not bool(bad.any()):
            return z, value, grad
        fresh = 4.0 * torch.rand(num_chains, potential.dim, generator=generator, dtype=dtype) - 2.0
        z = torch.where(bad.unsqueeze(-1), fresh, z)
    raise ValueError(f"model: no finite log density found in {max_tries} uniform(-2, 2) initialisations")


class _Warmup:
    """Stan's windowed adaptation of step size and metric for all chains together."""

    def __init__(self, num_warmup, num_chains, dim, dense_mass, target_accept, dtype):
        self.windows = adaptation_windows(num_warmup)
        self.window_ends = {end for start, end in self.windows[1:-1]}
        self.slow = {i for start, end in self.windows[1:-1] for i in range(start, end + 1)}
        self.dense, self.target_accept, self.dtype = dense_mass, target_accept, dtype
        self.num_chains, self.dim = num_chains, dim
        eye = torch.eye(dim, dtype=dtype).expand(num_chains, dim, dim).clone()
        self.metric = Metric(eye if dense_mass else torch.ones(num_chains, dim, dtype=dtype), dense_mass)
        self.welford = Welford(num_chains, dim, dense_mass, dtype)

    def restart_step_size(self, state, potential, generator):
        z, value, grad, step_size = state
        step_size = find_reasonable_step_size(z, value, grad, potential_fn=potential, metric=self.metric,
                                              step_size=step_size, generator=generator)
        self.averaging = DualAveraging(step_size, self.target_accept)
        return step_size

    def update(self, iteration, tree, state, potential, generator):
        """Adapt after warmup iteration ``iteration``; return the next step sizes."""
        z = state[0]
        step_size = self.averaging.update(tree.sum_accept / tree.num_steps.clamp(min=1))
        if iteration in self.slow:
            self.welford.update(z)
        if iteration in self.window_ends:
            self.metric = Metric(self.welford.regularized(), self.dense)
            self.welford = Welford(self.num_chains, self.dim, self.dense, self.dtype)
            step_size = self.restart_step_size((*state[:3], step_size), potential, generator)
        return step_size


def _stats_row(tree: TreeState, step_size: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "diverging": tree.diverging.clone(),
        "energy": tree.energy_proposal,
        "tree_depth": tree.depth,
        "n_steps": tree.num_steps,
        "step_size": step_size,
        "acceptance_rate": tree.sum_accept / tree.num_steps.clamp(min=1),
        "lp": -tree.potential_proposal,
    }


def _draws_to_samples(potential: BatchedPotential, draws: torch.Tensor, chunk: int = 1024):
    num_chains, num_draws, dim = draws.shape
    flat = draws.reshape(-1, dim)
    values, _ = potential.constrain(flat)
    pieces = [potential.deterministic(flat[i:i + chunk]) for i in range(0, flat.shape[0], chunk)]
    for name in potential.deterministic_shapes:
        values[name] = torch.cat([piece[name] for piece in pieces])
    return {name: value.reshape(num_chains, num_draws, *value.shape[1:]).detach() for name, value in values.items()}


def sample_vectorized_nuts(model: Model, model_args: tuple, model_kwargs: dict, *, num_samples: int,
                           num_warmup: int, num_chains: int, target_accept: float = 0.8,
                           dense_mass: bool = False, max_tree_depth: int = 10, seed: int = 0,
                           progress: bool = True, compiler: str = "auto") -> VectorizedNutsResult:
    r"""Sample a Pyro model with NUTS, all chains advancing together.

    Warmup follows Stan: a 75-iteration step-size buffer, doubling metric windows (diagonal or
    dense Welford estimates, shrunk towards :math:`10^{-3} I`), a 50-iteration terminal buffer,
    and dual averaging of the step size towards ``target_accept`` restarted after every metric
    update. Each chain keeps its own step size and metric.

    Args:
        model: Pyro model with continuous latent sites only.
        model_args: positional arguments of ``model``.
        model_kwargs: keyword arguments of ``model``.
        num_samples: draws kept per chain.
        num_warmup: adaptation iterations per chain (discarded).
        num_chains: chains :math:`C`, run as one batch.
        target_accept: target mean acceptance probability in (0, 1).
        dense_mass: adapt a dense rather than diagonal inverse mass matrix.
        max_tree_depth: at most :math:`2^{\text{max\_tree\_depth}} - 1` leapfrog steps per draw.
        seed: seed of initialisation and of every random choice of the sampler.
        progress: show a progress bar.
        compiler: how the traced leaf runs: ``"torchscript"`` (Static Runtime, compiles in a
            fraction of a second), ``"inductor"`` (one fused C++ kernel, several times faster
            per leaf, seconds to compile; needs ``g++``), or ``"auto"``: Static Runtime first,
            switching to Inductor once the run's pace shows the compilation will pay for itself
            (:class:`~vilab.inference.fast_inductor.FusePolicy`).

    Returns:
        :class:`VectorizedNutsResult`.

    Raises:
        VectorizationError: the model cannot be evaluated for a batch of chains correctly (the
            caller should fall back to Pyro's NUTS).
        ValueError: an argument is out of range.
    """
    _check_arguments(num_samples, num_warmup, num_chains, target_accept, max_tree_depth)
    if compiler not in COMPILERS:
        raise ValueError(f"compiler: expected one of {COMPILERS}; got {compiler!r}")
    start = time.perf_counter()
    with threads_for(0):  # tracing and checking work on a few chains' values
        potential = BatchedPotential(model, model_args, model_kwargs, num_chains=num_chains, seed=seed)
    with threads_for(num_chains * potential.site_numel):
        return _sample(potential, start, num_samples, num_warmup, num_chains, target_accept, dense_mass,
                       max_tree_depth, seed, progress, compiler)


def _sample(potential, start, num_samples, num_warmup, num_chains, target_accept, dense_mass,
            max_tree_depth, seed, progress, compiler) -> VectorizedNutsResult:
    generator = torch.Generator().manual_seed(seed)
    z, value, grad = _initial_states(potential, num_chains, generator)
    dtype = z.dtype
    warmup = _Warmup(num_warmup, num_chains, potential.dim, dense_mass, target_accept, dtype)
    step_size = warmup.restart_step_size((z, value, grad, torch.ones(num_chains, dtype=dtype)), potential, generator)
    builder = TreeBuilder(potential, num_chains, max_tree_depth, generator)
    bar = tqdm(total=num_warmup + num_samples, disable=not progress, desc="vectorized NUTS")
    draws, stats = [], []
    policy = FusePolicy(compiler if potential.compiled else "torchscript", num_warmup + num_samples)
    for iteration in range(num_warmup + num_samples):
        if not policy.decided:
            chosen = policy.choose(iteration, builder.step_calls())
            if chosen is None or chosen:
                builder.fuse(chosen)
        if iteration == num_warmup:
            step_size = warmup.averaging.final_step_size() if num_warmup > 0 else step_size
            sampling_start = time.perf_counter()
        tree = builder.transition(z, value, grad, warmup.metric, step_size)
        z, value, grad = tree.z_proposal, tree.potential_proposal, tree.grad_proposal
        if iteration < num_warmup:
            step_size = warmup.update(iteration, tree, (z, value, grad), potential, generator)
        else:
            draws.append(z)
            stats.append(_stats_row(tree, step_size))
        bar.update(1)
    bar.close()
    end = time.perf_counter()
    samples = _draws_to_samples(potential, torch.stack(draws, dim=1))
    sample_stats = {key: torch.stack([row[key] for row in stats], dim=1) for key in stats[0]}
    return VectorizedNutsResult(samples, sample_stats, sampling_start - start, end - sampling_start,
                                warmup.metric.inverse_mass, builder.compiled, builder.backend,
                                policy.reason + (f" ({builder.fuse_failure})" if builder.fuse_failure else ""))


def _check_arguments(num_samples, num_warmup, num_chains, target_accept, max_tree_depth) -> None:
    for name, number, low in (("num_samples", num_samples, 1), ("num_warmup", num_warmup, 0),
                              ("num_chains", num_chains, 1), ("max_tree_depth", max_tree_depth, 1)):
        if not isinstance(number, int) or number < low:
            raise ValueError(f"{name}: expected an integer >= {low}; got {number!r}")
    if not 0.0 < target_accept < 1.0:
        raise ValueError(f"target_accept: expected a probability in (0, 1); got {target_accept!r}")
