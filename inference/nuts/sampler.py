r"""A No-U-Turn sampler whose trees grow for all chains at once.

Each transition doubles a trajectory per chain (multinomial sampling, Betancourt's generalised
U-turn criterion checked on every balanced sub-trajectory, as in Stan and NumPyro's iterative
NUTS; :mod:`~vilab.inference.nuts.tree`). All chains take their leapfrog steps together: chains
whose tree has stopped are masked, so Python and dispatch overhead is paid once per step for all
chains and the potential is one batched call (:class:`~vilab.inference.engine.api.BatchedPotential`).
Masked chains waste a little arithmetic but never change state, so each chain is an exact NUTS
chain. This module runs the warmup (Stan's windowed adaptation) and the draws, for one batch of
chains in this process or for one batch per core in forked processes
(:mod:`~vilab.inference.engine.processes.workers`).

References:
    The No-U-Turn Sampler: Adaptively Setting Path Lengths in Hamiltonian Monte Carlo,
    Hoffman and Gelman, 2014, arXiv:1111.4246.
    A Conceptual Introduction to Hamiltonian Monte Carlo, Betancourt, 2017, arXiv:1701.02434.
"""

from __future__ import annotations

import time
from typing import NamedTuple, Optional

import torch

from vilab.inference.common.progress import progress_bar
from vilab.types import Model

from vilab.inference.engine import api as engine
from vilab.inference.engine.api import COMPILERS, BatchedPotential, VectorizationError
from vilab.inference.nuts.adaptation import DualAveraging, Metric, Welford, adaptation_windows
from vilab.inference.nuts.tree import TREE_FIELDS, TreeBuilder, TreeState, find_reasonable_step_size, merge_fields

__all__ = [
    "VectorizedNutsResult",
    "VectorizationError",
    "sample_vectorized_nuts",
    "TreeState",
    "TREE_FIELDS",
    "TreeBuilder",
    "merge_fields",
    "find_reasonable_step_size",
    "NUTS_COMPILERS",
]

# The sampler's ``compiler`` choices: the engine's (:data:`~vilab.inference.engine.api.COMPILERS`).
NUTS_COMPILERS = COMPILERS


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
        backend: how the leapfrog leaf ran at the end: ``"eager"``, ``"graph"`` (the traced
            graph as fx code), ``"vm"`` (the virtual machine) or ``"inductor"`` (fused C++ kernel).
        fuse_decision: why the leaf was or was not fused (:class:`~vilab.inference.engine.policy.FusePolicy`).
        batching: how the chains were batched: ``"plate"`` (the model broadcast over an outer
            chain plate) or ``"vmap"`` (a one-chain model vectorised by ``torch.func.vmap``).
        warmup_leapfrog_steps: leapfrog steps (potential gradients) of all chains in warmup.
    """

    samples: dict[str, torch.Tensor]
    sample_stats: dict[str, torch.Tensor]
    warmup_time: float
    sampling_time: float
    inverse_mass_matrix: torch.Tensor
    compiled: bool
    backend: str = "eager"
    fuse_decision: str = ""
    batching: str = "plate"
    warmup_leapfrog_steps: int = 0


def _initial_states(
    potential: BatchedPotential,
    num_chains: int,
    generator: torch.Generator,
    init_values: Optional[dict] = None,
    max_tries: int = 100,
):
    """Stan's initialisation: uniform on (-2, 2) in unconstrained space, redrawn per chain until
    the potential and its gradient are finite; the sites in ``init_values`` (constrained,
    ``(num_chains, *site_shape)``) start at their given values instead."""
    dtype = torch.get_default_dtype()
    given = torch.zeros(potential.dim, dtype=torch.bool)
    fixed = torch.zeros(num_chains, potential.dim, dtype=dtype)
    for site in potential.sites:
        if site.name in (init_values or {}):
            value = init_values[site.name].to(dtype)
            fixed[:, site.offset : site.offset + site.size] = site.transform.inv(value).reshape(num_chains, -1)
            given[site.offset : site.offset + site.size] = True

    def draw():
        return torch.where(
            given, fixed, 4.0 * torch.rand(num_chains, potential.dim, generator=generator, dtype=dtype) - 2.0
        )

    z = draw()
    for _ in range(max_tries):
        value, grad = potential(z)
        bad = ~(torch.isfinite(value) & torch.isfinite(grad).all(-1))
        if not bool(bad.any()):
            return z, value, grad
        if bool(given.all()):  # nothing left to redraw
            raise ValueError(
                f"init_values: the log density or its gradient is not finite at the given "
                f"values (chains {bad.nonzero().flatten().tolist()})"
            )
        z = torch.where(bad.unsqueeze(-1), draw(), z)
    where = " around the given init_values" if bool(given.any()) else ""
    raise ValueError(f"model: no finite log density found in {max_tries} uniform(-2, 2) initialisations{where}")


class _Warmup:
    """Stan's windowed adaptation of step size and metric for all chains together."""

    def __init__(self, num_warmup, num_chains, dim, dense_mass, target_accept, dtype, init_inverse_mass=None):
        self.windows = adaptation_windows(num_warmup)
        self.window_ends = {end for start, end in self.windows[1:-1]}
        self.slow = {i for start, end in self.windows[1:-1] for i in range(start, end + 1)}
        self.dense, self.target_accept, self.dtype = dense_mass, target_accept, dtype
        self.num_chains, self.dim = num_chains, dim
        eye = torch.eye(dim, dtype=dtype).expand(num_chains, dim, dim).clone()
        self.metric = Metric(eye if dense_mass else torch.ones(num_chains, dim, dtype=dtype), dense_mass)
        if init_inverse_mass is not None:  # e.g. Pathfinder's covariance, shared by every chain
            start = init_inverse_mass.to(dtype)
            expected = (dim, dim) if dense_mass else (dim,)
            if tuple(start.shape) != expected:
                raise ValueError(f"init_inverse_mass: expected shape {expected}; got {tuple(start.shape)}")
            self.metric = Metric(start.expand(num_chains, *start.shape).clone(), dense_mass)
        self.welford = Welford(num_chains, dim, dense_mass, dtype)

    def restart_step_size(self, state, potential, generator):
        z, value, grad, step_size = state
        step_size = find_reasonable_step_size(
            z, value, grad, potential_fn=potential, metric=self.metric, step_size=step_size, generator=generator
        )
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
    """The draw's statistics, copied out of the tree (whose buffers a fused merge reuses)."""
    return {
        "diverging": tree.diverging.clone(),
        "energy": tree.energy_proposal.clone(),
        "tree_depth": tree.depth.clone(),
        "n_steps": tree.num_steps.clone(),
        "step_size": step_size,
        "acceptance_rate": tree.sum_accept / tree.num_steps.clamp(min=1),
        "lp": -tree.potential_proposal,
    }


def _draws_to_samples(potential: BatchedPotential, draws: torch.Tensor, chunk: int = 1024):
    num_chains, num_draws, dim = draws.shape
    flat = draws.reshape(-1, dim)
    values, _ = potential.constrain(flat)
    pieces = [potential.deterministic(flat[i : i + chunk]) for i in range(0, flat.shape[0], chunk)]
    for name in potential.deterministic_shapes:
        values[name] = torch.cat([piece[name] for piece in pieces])
    return {name: value.reshape(num_chains, num_draws, *value.shape[1:]).detach() for name, value in values.items()}


def sample_vectorized_nuts(
    model: Model,
    model_args: tuple,
    model_kwargs: dict,
    *,
    num_samples: int,
    num_warmup: int,
    num_chains: int,
    target_accept: float = 0.8,
    dense_mass: bool = False,
    max_tree_depth: int = 10,
    seed: int = 0,
    progress: bool = True,
    compiler: str = "auto",
    init_values: Optional[dict] = None,
    workers: Optional[int] = None,
    init_inverse_mass: Optional[torch.Tensor] = None,
) -> VectorizedNutsResult:
    r"""Sample a Pyro model with NUTS, all chains advancing together.

    Warmup follows Stan: a 75-iteration step-size buffer, doubling metric windows (diagonal or
    dense Welford estimates, shrunk towards :math:`10^{-3} I`), a 50-iteration terminal buffer,
    and dual averaging of the step size towards ``target_accept`` restarted after every metric
    update. Each chain keeps its own step size and metric.

    With more than one core the chains are split into one batch per core, each advancing in a
    forked process (:mod:`~vilab.inference.engine.processes.workers`): the leaf's arithmetic per process
    shrinks with its batch, and each core pays the per-step overhead for its own batch.

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
        seed: seed of initialisation and of every random choice of the sampler (the first
            batch's; the others' come from it, :func:`~vilab.inference.engine.processes.workers.batch_seed`).
            The draws depend on the batches (``workers``); with those fixed, they
            repeat exactly for ``compiler="graph"``, ``"vm"`` or ``"inductor"``; under ``"auto"`` the
            iteration where a fused kernel takes over depends on timing, and a kernel rounds
            differently from the traced step, so two runs agree in distribution, not bit for bit.
        progress: show a progress bar.
        compiler: how the traced leaf and merge run: ``"graph"`` (fx's generated Python code,
            nothing to compile), ``"vm"`` (a program of
            :mod:`~vilab.inference.engine.backends.vm`'s virtual machine: milliseconds to translate,
            several times faster per leaf than the fx graph on small models),
            ``"inductor"`` (one fused C++ kernel, several times faster per leaf, seconds to
            compile; needs ``g++``), or ``"auto"``: the virtual machine first where it is faster
            (the fx graph otherwise, or where a graph does not translate), switching
            to Inductor once the run's pace shows the compilation will pay for itself
            (:class:`~vilab.inference.engine.policy.FusePolicy`); with a second core the kernel
            compiles in a background process while the run goes on
            (:mod:`~vilab.inference.engine.processes.server`); or ``"eager"``: the engine off,
            nothing traced (also forced by ``VILAB_ENGINE=off``,
            :func:`~vilab.inference.engine.api.resolve_compiler`).
        init_values: constrained starting values ``{site: (num_chains, *site_shape)}`` of some
            latent sites (:func:`~vilab.inference.common.validation.check_init_values`); the other sites
            start uniformly in (-2, 2) on the unconstrained space.
        init_inverse_mass: the metric warmup starts from, ``(D,)`` (diagonal) or ``(D, D)``
            (dense, with ``dense_mass``), for every chain; default the identity.
        workers: processes the chains are split over, each running one batch of about
            :math:`C / \text{workers}` chains; ``None``: one per core this process may use, at
            most one per chain (:func:`~vilab.inference.engine.processes.workers.available_workers`; 1
            without ``fork``, where CUDA is initialised, or in a daemonic process). With ``workers > 1`` the batches run
            beside each other, so ``"auto"`` compiles no Inductor kernel, and
            ``warmup_time`` and ``sampling_time`` are the slowest batch's.

    Returns:
        :class:`VectorizedNutsResult`; with several batches, the chains in batch order.

    Raises:
        VectorizationError: the model cannot be evaluated for a batch of chains correctly (the
            caller should fall back to Pyro's NUTS).
        ValueError: an argument is out of range.
    """
    _check_arguments(num_samples, num_warmup, num_chains, target_accept, max_tree_depth)
    compiler = engine.resolve_compiler(compiler, stacklevel=4)
    workers = engine.resolve_workers(workers, num_chains)
    engine.warn_if_unfusable(compiler, stacklevel=3)  # said once, here
    with engine.frozen_heap():
        return _sample_batches(
            workers,
            progress=progress,
            num_chains=num_chains,
            seed=seed,
            model=model,
            model_args=model_args,
            model_kwargs=model_kwargs,
            num_samples=num_samples,
            num_warmup=num_warmup,
            target_accept=target_accept,
            dense_mass=dense_mass,
            max_tree_depth=max_tree_depth,
            compiler=compiler,
            init_values=init_values,
            init_inverse_mass=init_inverse_mass,
        )


def _sample_batches(workers, *, progress, num_chains, seed, **options) -> VectorizedNutsResult:
    """All chains in this process (``workers == 1``) or split into batches over processes."""
    num_warmup, num_samples = options["num_warmup"], options["num_samples"]
    if workers == 1:
        bar = progress_bar(total=num_warmup + num_samples, enabled=progress, desc="vectorized NUTS")
        try:
            return _sample_batch(**options, num_chains=num_chains, seed=seed, report=bar, split=False)
        finally:
            bar.close()
    start = time.perf_counter()
    sizes = engine.batch_sizes(num_chains, workers)
    results = engine.run_batches(
        _batch_worker, sizes, seed, options, progress=progress, total=workers * (num_warmup + num_samples)
    )
    return _merge_batches(results, sizes, time.perf_counter() - start)


def _sample_batch(
    *, model, model_args, model_kwargs, num_chains, seed, compiler, num_samples, num_warmup, report, split, **options
) -> VectorizedNutsResult:
    """One batch of chains in this process, or one of several (``split``) in a forked one;
    ``report.update(1)`` after each iteration."""
    start = time.perf_counter()
    potential, background = engine.batched_potential(
        model,
        model_args,
        model_kwargs,
        num_chains=num_chains,
        seed=seed,
        compiler=compiler,
        total=num_warmup + num_samples,
        split=split,
    )
    with engine.threads_for(num_chains * potential.site_numel):
        return _sample(
            potential,
            start,
            num_samples=num_samples,
            num_warmup=num_warmup,
            num_chains=num_chains,
            seed=seed,
            compiler=compiler,
            report=report,
            background=background,
            split=split,
            **options,
        )


def _batch_worker(*, report, **options) -> VectorizedNutsResult:
    """A batch in a forked process."""
    try:
        return _sample_batch(**options, report=report, split=True)
    finally:
        report.close()


def _merge_batches(results: list, sizes: list[int], wall: float) -> VectorizedNutsResult:
    """One result of the batches' results, chains in batch order."""

    def cat(key):
        return {name: torch.cat([getattr(r, key)[name] for r in results]) for name in getattr(results[0], key)}

    sampling = max(r.sampling_time for r in results)
    backends = sorted({r.backend for r in results})
    decisions = [r.fuse_decision for r in results]
    split = f"chains split over {len(sizes)} processes ({' + '.join(map(str, sizes))})"
    if len(set(decisions)) == 1:
        decision = "; ".join(note for note in (split, decisions[0]) if note)
    else:
        decision = "; ".join([split, *(f"batch {index}: {note}" for index, note in enumerate(decisions))])
    return VectorizedNutsResult(
        cat("samples"),
        cat("sample_stats"),
        wall - sampling,
        sampling,
        torch.cat([r.inverse_mass_matrix for r in results]),
        all(r.compiled for r in results),
        ", ".join(backends),
        decision,
        results[0].batching,
        sum(r.warmup_leapfrog_steps for r in results),
    )


def _sample(
    potential,
    start,
    *,
    num_samples,
    num_warmup,
    num_chains,
    target_accept,
    dense_mass,
    max_tree_depth,
    seed,
    compiler,
    init_values,
    report,
    background,
    split,
    init_inverse_mass=None,
) -> VectorizedNutsResult:
    generator = torch.Generator().manual_seed(seed)
    z, value, grad = _initial_states(potential, num_chains, generator, init_values)
    dtype = z.dtype
    warmup = _Warmup(num_warmup, num_chains, potential.dim, dense_mass, target_accept, dtype, init_inverse_mass)
    step_size = warmup.restart_step_size((z, value, grad, torch.ones(num_chains, dtype=dtype)), potential, generator)
    steps = engine.nuts_run_steps(  # the engine's: traced or eager, VM, when to fuse
        potential,
        merge_fields,
        len(TREE_FIELDS),
        compiler=compiler,
        total_iterations=num_warmup + num_samples,
        background=background,
        split=split,
    )
    builder = TreeBuilder(potential, num_chains, max_tree_depth, generator, steps=steps)
    try:
        draws, stats, sampling_start, warmup_steps = _iterate(
            potential, builder, warmup, report, z, value, grad, step_size, num_warmup, num_samples, generator
        )
    finally:
        builder.close()
    end = time.perf_counter()
    samples = _draws_to_samples(potential, torch.stack(draws, dim=1))
    sample_stats = {key: torch.stack([row[key] for row in stats], dim=1) for key in stats[0]}
    return VectorizedNutsResult(
        samples,
        sample_stats,
        sampling_start - start,
        end - sampling_start,
        warmup.metric.inverse_mass,
        builder.compiled,
        steps.info.backend,
        steps.info.decision,
        potential.mode,
        warmup_steps,
    )


def _iterate(potential, builder, warmup, report, z, value, grad, step_size, num_warmup, num_samples, generator):
    """The warmup and sampling iterations; returns the draws, their statistics, when sampling
    started and the warmup's leapfrog steps (all chains)."""
    draws, stats, sampling_start, warmup_steps = [], [], time.perf_counter(), 0
    for iteration in range(num_warmup + num_samples):
        builder.steps.before_iteration(iteration)
        if iteration == num_warmup:
            step_size = warmup.averaging.final_step_size() if num_warmup > 0 else step_size
            sampling_start = time.perf_counter()
        tree = builder.transition(z, value, grad, warmup.metric, step_size)
        z, value, grad = tree.z_proposal, tree.potential_proposal, tree.grad_proposal
        if iteration < num_warmup:
            warmup_steps += int(tree.num_steps.sum())
            step_size = warmup.update(iteration, tree, (z, value, grad), potential, generator)
        else:
            draws.append(z.clone())  # the merge's buffers are reused two merges later
            stats.append(_stats_row(tree, step_size))
        report.update(1)
    return draws, stats, sampling_start, warmup_steps


def _check_arguments(num_samples, num_warmup, num_chains, target_accept, max_tree_depth) -> None:
    for name, number, low in (
        ("num_samples", num_samples, 1),
        ("num_warmup", num_warmup, 0),
        ("num_chains", num_chains, 1),
        ("max_tree_depth", max_tree_depth, 1),
    ):
        if not isinstance(number, int) or number < low:
            raise ValueError(f"{name}: expected an integer >= {low}; got {number!r}")
    if not 0.0 < target_accept < 1.0:
        raise ValueError(f"target_accept: expected a probability in (0, 1); got {target_accept!r}")
