r"""Pathfinder: the best Gaussian along an L-BFGS path, and its multi-path version.

Single-path Pathfinder runs L-BFGS on :math:`-\log p(z)` from a start, and at every iterate
:math:`z_l` forms the Gaussian :math:`q_l = \mathcal N(\mu_l, H_l)` with :math:`H_l` the
L-BFGS inverse-Hessian estimate (:mod:`~vilab.inference.vi.lbfgs_path`) and
:math:`\mu_l = z_l + H_l \nabla \log p(z_l)` (a Newton step). Each :math:`q_l` is scored by a
Monte Carlo ELBO with ``num_elbo_draws`` draws; the best is returned as a dense Gaussian guide.

Multi-path Pathfinder runs ``num_paths`` single paths from independent starts (uniform on
(-2, 2) in unconstrained space, as Stan's). Its guide is the equal-weight mixture of the
paths' Gaussians (:class:`~vilab.inference.vi.mixture.GaussianMixtureGuide`): importance
ratios against the mixture density are proper weights, so PSIS of the guide's draws gives
the method's :math:`\hat k`, and :func:`resample_draws` gives its draws as in the paper's
Algorithm 2 (PSIS-smoothed importance resampling of the pooled draws, with replacement).
Weighting by the mixture rather than by each draw's own path, as the paper does, keeps the
weights valid when paths overlap.

Gradient evaluations are counted as in the paper: one per L-BFGS objective call; the ELBO
draws need the density only and are counted apart (``config["density_evaluations"]``).

References:
    Pathfinder: Parallel quasi-Newton variational inference, Zhang, Carpenter, Gelman and
    Vehtari, 2022, JMLR 23(306), arXiv:2108.03782.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, NamedTuple, Optional

import numpy as np
import pyro
import torch

from vilab.inference.common.diagnostics import psis
from vilab.inference.svi.api import SVIResult
from vilab.inference.common.validation import check_positive_int
from vilab.inference.vi.density import LogDensity
from vilab.inference.vi.gaussian import gaussian_guide
from vilab.inference.vi.lbfgs_path import inverse_hessian_estimates, lbfgs_path
from vilab.inference.vi.mixture import GaussianMixtureGuide
from vilab.types import Model, Samples

__all__ = ["PathGaussian", "pathfinder_path", "fit_pathfinder", "fit_multipathfinder", "resample_draws"]


class PathGaussian(NamedTuple):
    """The best Gaussian of one path.

    Attributes:
        loc: ``(D,)``; scale_tril: ``(D, D)`` Cholesky factor of the covariance.
        elbo: its Monte Carlo ELBO; elbos: ``(L,)`` every iterate's (``-inf`` where no
            positive-definite estimate exists).
        best_iteration: the chosen iterate (1-based along the path).
        num_iterations: L-BFGS iterations :math:`L`; converged, message: L-BFGS's own verdict.
    """

    loc: torch.Tensor
    scale_tril: torch.Tensor
    elbo: float
    elbos: torch.Tensor
    best_iteration: int
    num_iterations: int
    converged: bool
    message: str


def _gaussian_elbo(density: LogDensity, loc, scale_tril, num_draws: int, generator) -> float:
    noise = torch.randn(num_draws, loc.shape[0], generator=generator, dtype=loc.dtype)
    z = loc + noise @ scale_tril.T
    log_q = torch.distributions.MultivariateNormal(loc, scale_tril=scale_tril).log_prob(z)
    log_p = density.log_density(z)
    elbo = float((log_p - log_q).mean())
    return elbo if math.isfinite(elbo) else -math.inf


def pathfinder_path(
    density: LogDensity,
    start: torch.Tensor,
    generator: torch.Generator,
    *,
    history_size: int = 6,
    max_iterations: int = 1000,
    num_elbo_draws: int = 25,
    relative_tolerance: float = 1e-10,
    gradient_tolerance: float = 1e-8,
) -> PathGaussian:
    """One Pathfinder path from ``start`` ``(D,)``: the Gaussian with the best ELBO.

    Raises:
        RuntimeError: no iterate gave a positive-definite estimate with a finite ELBO.
    """
    path = lbfgs_path(
        density,
        start,
        history_size=history_size,
        max_iterations=max_iterations,
        relative_tolerance=relative_tolerance,
        gradient_tolerance=gradient_tolerance,
    )
    best, elbos = None, []
    for index, H in enumerate(inverse_hessian_estimates(path, history_size), start=1):
        scale_tril, info = torch.linalg.cholesky_ex(H) if H is not None else (None, 1)
        if H is None or int(info) != 0:
            elbos.append(-math.inf)
            continue
        loc = path.positions[index] + H @ path.scores[index]
        elbo = _gaussian_elbo(density, loc, scale_tril, num_elbo_draws, generator)
        elbos.append(elbo)
        if math.isfinite(elbo) and (best is None or elbo > best[2]):
            best = (loc, scale_tril, elbo, index)
    num_iterations = path.positions.shape[0] - 1
    if best is None:
        raise RuntimeError(
            f"pathfinder: none of the {num_iterations} L-BFGS iterates gave a Gaussian with a finite "
            f"ELBO (L-BFGS: {path.message}); the log density may be improper or non-finite nearly "
            "everywhere"
        )
    loc, scale_tril, elbo, index = best
    return PathGaussian(loc, scale_tril, elbo, torch.tensor(elbos), index, num_iterations, path.converged, path.message)


def _options(history_size, max_iterations, num_elbo_draws, relative_tolerance, gradient_tolerance) -> dict:
    check_positive_int(history_size, "history_size")
    check_positive_int(max_iterations, "max_iterations")
    check_positive_int(num_elbo_draws, "num_elbo_draws", minimum=2)
    for name, value in (("relative_tolerance", relative_tolerance), ("gradient_tolerance", gradient_tolerance)):
        if not (isinstance(value, (int, float)) and value >= 0):
            raise ValueError(f"{name}: expected a number >= 0; got {value!r}")
    return dict(
        history_size=history_size,
        max_iterations=max_iterations,
        num_elbo_draws=num_elbo_draws,
        relative_tolerance=float(relative_tolerance),
        gradient_tolerance=float(gradient_tolerance),
    )


def _setup(model, args, kwargs, seed):
    if seed is not None:
        pyro.set_rng_seed(seed)
        pyro.clear_param_store()
    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    return LogDensity(model, args, kwargs, seed=0 if seed is None else seed), generator


def _first_good_path(
    density: LogDensity, generator, start: Optional[torch.Tensor], max_starts: int, options: dict
) -> tuple[PathGaussian, list[str]]:
    """The first path, over up to ``max_starts`` uniform starts (one if ``start`` is given),
    that gives a Gaussian; warns about the failed ones."""
    failures: list[str] = []
    for _ in range(1 if start is not None else max_starts):
        point = start if start is not None else density.initial_points(1, generator)[0]
        try:
            best = pathfinder_path(density, point, generator, **options)
        except RuntimeError as error:
            failures.append(str(error))
            continue
        if failures:
            warnings.warn(
                f"pathfinder: {len(failures)} start(s) failed and were replaced by fresh uniform starts "
                f"(first: {failures[0]})",
                RuntimeWarning,
                stacklevel=3,
            )
        return best, failures
    raise RuntimeError(f"pathfinder: every one of {len(failures)} start(s) failed: " + "; ".join(failures))


def fit_pathfinder(
    model: Model,
    *args: Any,
    seed: Optional[int] = 0,
    progress: bool = False,
    history_size: int = 6,
    max_iterations: int = 1000,
    num_elbo_draws: int = 25,
    relative_tolerance: float = 1e-10,
    gradient_tolerance: float = 1e-8,
    init: Optional[torch.Tensor] = None,
    max_starts: int = 4,
    **kwargs: Any,
) -> SVIResult:
    r"""Single-path Pathfinder on ``model(*args, **kwargs)``; ``fit_svi(model, "pathfinder")`` calls it.

    Args:
        model: a Pyro model with continuous latents; ``*args, **kwargs`` its data.
        seed: seeds the start and the ELBO draws (and clears Pyro's param store).
        progress: unused (a path takes seconds); accepted for ``fit_svi``'s signature.
        history_size: :math:`J`, curvature pairs kept (the paper's 6).
        max_iterations: L-BFGS iterations at most.
        num_elbo_draws: :math:`K`, draws per ELBO estimate along the path (Stan's 25).
        relative_tolerance, gradient_tolerance: L-BFGS's stopping rules (scipy's ``ftol``, ``gtol``).
        init: start ``(D,)`` on the flat unconstrained space; default uniform on (-2, 2).
        max_starts: uniform starts tried at most when ``init`` is None. A start on a plateau of
            the density can end L-BFGS before any iterate gives a Gaussian with a finite ELBO
            (seen on posteriordb's ``hmm_example``); the path is then rerun from a fresh start,
            with a ``RuntimeWarning`` naming the failures, and the gradient evaluations of the
            failed paths are counted. With ``init`` given, one start only.

    Raises:
        RuntimeError: every start failed (the reasons of each are in the message).

    Returns:
        An :class:`SVIResult` whose guide is the chosen Gaussian; ``losses`` are the negative
        ELBO estimates along the path (finite ones); ``converged`` is L-BFGS's own verdict;
        ``config`` holds ``gradient_evaluations``, ``density_evaluations``, ``elbo``,
        ``best_iteration``, ``lbfgs_iterations``, ``lbfgs_message`` and ``failed_starts``.
    """
    options = _options(history_size, max_iterations, num_elbo_draws, relative_tolerance, gradient_tolerance)
    check_positive_int(max_starts, "max_starts")
    start_time = time.perf_counter()
    density, generator = _setup(model, args, kwargs, seed)
    if init is not None:
        start = torch.as_tensor(init, dtype=torch.get_default_dtype())
        if start.shape != (density.dim,):
            raise ValueError(f"init: expected shape ({density.dim},); got {tuple(start.shape)}")
    best, failures = _first_good_path(density, generator, None if init is None else start, max_starts, options)
    guide = gaussian_guide(model, args, kwargs, best.loc, best.scale_tril, sites=density.potential.sites)
    config = {
        **options,
        "gradient_evaluations": density.gradient_evaluations,
        "density_evaluations": density.density_evaluations,
        "elbo": best.elbo,
        "best_iteration": best.best_iteration,
        "lbfgs_iterations": best.num_iterations,
        "lbfgs_message": best.message,
        "batched_density": density.batched,
        "failed_starts": len(failures),
    }
    losses = [-e for e in best.elbos.tolist() if math.isfinite(e)]
    return SVIResult(
        model,
        guide,
        args,
        kwargs,
        losses,
        time.perf_counter() - start_time,
        best.converged,
        "pathfinder",
        "pathfinder",
        config,
    )


def fit_multipathfinder(
    model: Model,
    *args: Any,
    seed: Optional[int] = 0,
    progress: bool = False,
    num_paths: int = 4,
    num_psis_draws: int = 1000,
    history_size: int = 6,
    max_iterations: int = 1000,
    num_elbo_draws: int = 25,
    relative_tolerance: float = 1e-10,
    gradient_tolerance: float = 1e-8,
    **kwargs: Any,
) -> SVIResult:
    r"""Multi-path Pathfinder: ``num_paths`` paths from independent starts, their Gaussians'
    mixture as the guide; ``fit_svi(model, "multipathfinder")`` calls it.

    Args:
        num_paths: :math:`P` (Stan's 4).
        num_psis_draws: draws per path pooled for the :math:`\hat k` in ``config`` (Stan's 1000).
        Others: as :func:`fit_pathfinder`.

    Returns:
        An :class:`SVIResult` with a :class:`GaussianMixtureGuide`; ``converged`` is true when
        every path's L-BFGS converged; ``config`` adds ``k_hat`` (PSIS of
        ``num_paths * num_psis_draws`` mixture draws), per-path ``path_elbos`` and
        ``paths_converged``. Paths that fail are left out (``config["failed_paths"]``).
    """
    options = _options(history_size, max_iterations, num_elbo_draws, relative_tolerance, gradient_tolerance)
    check_positive_int(num_paths, "num_paths")
    check_positive_int(num_psis_draws, "num_psis_draws", minimum=10)
    start_time = time.perf_counter()
    density, generator = _setup(model, args, kwargs, seed)
    starts = density.initial_points(num_paths, generator)
    paths, failures = [], []
    for start in starts:
        try:
            paths.append(pathfinder_path(density, start, generator, **options))
        except RuntimeError as error:  # one failed path leaves the others usable
            failures.append(str(error))
    if not paths:
        raise RuntimeError(f"multipathfinder: every path failed; first: {failures[0]}")
    locs = torch.stack([p.loc for p in paths])
    guide = GaussianMixtureGuide(model, args, kwargs, locs, torch.stack([p.scale_tril for p in paths]))
    k_hat = _mixture_k_hat(guide, density, num_paths * num_psis_draws)
    config = {
        **options,
        "num_paths": num_paths,
        "gradient_evaluations": density.gradient_evaluations,
        "density_evaluations": density.density_evaluations,
        "k_hat": k_hat,
        "path_elbos": [p.elbo for p in paths],
        "paths_converged": [p.converged for p in paths],
        "failed_paths": failures,
        "batched_density": density.batched,
    }
    losses = [-p.elbo for p in paths]
    converged = not failures and all(p.converged for p in paths)
    return SVIResult(
        model,
        guide,
        args,
        kwargs,
        losses,
        time.perf_counter() - start_time,
        converged,
        "multipathfinder",
        "pathfinder",
        config,
    )


@torch.no_grad()
def _mixture_k_hat(guide: GaussianMixtureGuide, density: LogDensity, num_draws: int) -> float:
    posterior = guide.get_posterior()
    z = posterior.sample((num_draws,))
    log_weights = density.log_density(z) - posterior.log_prob(z)
    return psis(log_weights.numpy()).k_hat


def resample_draws(
    result: SVIResult, num_samples: int = 1000, *, num_proposals: Optional[int] = None, seed: Optional[int] = None
) -> Samples:
    r"""Multi-path Pathfinder's draws: ``num_proposals`` guide draws (default
    ``4 * num_samples``) resampled with replacement by their Pareto-smoothed importance
    weights :math:`p(x, z)/q(z)` (the paper's Algorithm 2). Works for any fitted guide.

    Returns:
        site -> ``(num_samples, *site_shape)``.
    """
    check_positive_int(num_samples, "num_samples")
    num_proposals = 4 * num_samples if num_proposals is None else check_positive_int(num_proposals, "num_proposals", 10)
    draws = result.draws(num_proposals, seed=seed)
    smoothed = psis(draws.log_weights.numpy()).log_weights
    probabilities = np.exp(smoothed - np.logaddexp.reduce(smoothed))
    index = np.random.default_rng(seed).choice(num_proposals, size=num_samples, replace=True, p=probabilities)
    index = torch.as_tensor(index)
    return {name: value[index] for name, value in draws.samples.items()}
