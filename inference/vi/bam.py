r"""Batch-and-match (BaM) and Gaussian score matching (GSM): full-covariance Gaussian VI by
closed-form score matching (:func:`fit_bam`, :func:`fit_gsm`).

Each iteration draws a batch :math:`z_1..z_B \sim q_t = \mathcal N(\mu_t, \Sigma_t)` on the
unconstrained space, evaluates the scores :math:`g_b = \nabla \log p(z_b)`, and moves to the
Gaussian that minimises the batch's covariance-weighted score divergence plus
:math:`\tfrac{1}{\lambda_t}\mathrm{KL}(q_t \,\|\, q)`, which is closed form:

.. math::
    U = \lambda_t \Gamma + \tfrac{\lambda_t}{1+\lambda_t} \bar g \bar g^\top, \quad
    V = \Sigma_t + \lambda_t C + \tfrac{\lambda_t}{1+\lambda_t} (\mu_t - \bar z)(\mu_t - \bar z)^\top,

    \Sigma_{t+1} = 2 V \big(I + (I + 4 U V)^{1/2}\big)^{-1}, \quad
    \mu_{t+1} = \tfrac{1}{1+\lambda_t} \mu_t + \tfrac{\lambda_t}{1+\lambda_t} (\Sigma_{t+1} \bar g + \bar z),

with :math:`\bar z, C` the batch mean and covariance of the draws and :math:`\bar g, \Gamma`
those of the scores. With :math:`V = L L^\top`,
:math:`(I + 4UV)^{1/2} = L^{-\top} (I + 4 L^\top U L)^{1/2} L^\top`, so
:math:`\Sigma_{t+1} = 2 L (I + M)^{-1} L^\top` with :math:`M = (I + 4 L^\top U L)^{1/2}`
symmetric: the update stays symmetric positive definite without a general matrix square root.
For a Gaussian target the exact posterior is a fixed point for any batch.

BaM from a far start (uniform on (-2, 2), :math:`\Sigma_0 = I`) can stall: on an AR(5) posterior
it stayed thousands of nats below the mode with a collapsed covariance while its divergence
estimate stopped decreasing. The default start is therefore the authors' other option, L-BFGS:
:math:`\mu_0` at the mode L-BFGS finds from a uniform start, :math:`\Sigma_0` its
inverse-Hessian estimate there (:mod:`~vilab.inference.vi.lbfgs_path`); its gradient
evaluations are counted. ``init="uniform"`` gives the plain start.

The learning rate is the paper's :math:`\lambda_t = B D / (t + 1)` unless a constant is
given. Each batch also estimates the divergence BaM minimises,
:math:`\mathbb E_q \lVert \nabla \log q - \nabla \log p \rVert^2_{\Sigma}` at :math:`q_t`
(``losses``). The run has converged when that estimate no longer decreases beyond its Monte
Carlo noise (:func:`~vilab.inference.svi.convergence.has_converged` over windows of ``window``
iterations, the test SVI uses on its loss) and the mean has stopped moving: the mean of
:math:`\mu_t` over the last window differs from that over the window before by less than
``0.1`` in root-mean-square Mahalanobis units of :math:`\Sigma_t`
(:math:`\sqrt{\Delta^\top \Sigma_t^{-1} \Delta / D} < 0.1`). A stalled run drifts and fails
the second test.

References:
    Batch and match: black-box variational inference with a score-based divergence, Cai,
    Modi, Pillaud-Vivien, Margossian, Gower, Blei and Saul, ICML 2024, arXiv:2402.14758
    (Algorithm 1). The update follows the authors' ``gsmvi/bam.py`` (github.com/modichirag/GSM-VI).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import pyro
import torch

from vilab.inference.svi.convergence import has_converged
from vilab.inference.svi.api import SVIResult
from vilab.inference.common.validation import check_positive_int
from vilab.inference.vi.density import LogDensity
from vilab.inference.vi.gaussian import gaussian_guide
from vilab.inference.vi.lbfgs_path import inverse_hessian_estimates, lbfgs_path
from vilab.types import Model

__all__ = ["bam_update", "gsm_update", "fit_bam", "fit_gsm"]

INITS = ("lbfgs", "uniform")
# Root-mean-square shift of the window-mean location, in q's sds, below which the mean has
# stopped moving (the batch noise of a 25-iteration window mean is far below it).
LOCATION_TOLERANCE = 0.1


def bam_update(
    loc: torch.Tensor, covariance: torch.Tensor, draws: torch.Tensor, scores: torch.Tensor, learning_rate: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One BaM step from :math:`(\mu_t, \Sigma_t)` (``(D,)``, ``(D, D)``) with the batch's
    ``draws`` and ``scores`` (``(B, D)`` each) and :math:`\lambda_t`; returns
    :math:`(\mu_{t+1}, \Sigma_{t+1})`."""
    lam = learning_rate
    z_bar, g_bar = draws.mean(0), scores.mean(0)
    z_centred, g_centred = draws - z_bar, scores - g_bar
    C = z_centred.T @ z_centred / draws.shape[0]
    Gamma = g_centred.T @ g_centred / draws.shape[0]
    U = lam * Gamma + lam / (1 + lam) * torch.outer(g_bar, g_bar)
    V = covariance + lam * C + lam / (1 + lam) * torch.outer(loc - z_bar, loc - z_bar)
    L = torch.linalg.cholesky((V + V.T) / 2)
    inner = L.T @ U @ L
    eigenvalues, eigenvectors = torch.linalg.eigh((inner + inner.T) / 2)
    M = eigenvectors @ torch.diag((1 + 4 * eigenvalues.clamp(min=0)).sqrt()) @ eigenvectors.T
    eye = torch.eye(M.shape[0], dtype=M.dtype)
    new_covariance = 2 * L @ torch.linalg.solve(eye + M, L.T)
    new_covariance = (new_covariance + new_covariance.T) / 2
    new_loc = loc / (1 + lam) + lam / (1 + lam) * (new_covariance @ g_bar + z_bar)
    return new_loc, new_covariance


def _score_divergence(loc, covariance, draws, scores) -> float:
    r""":math:`\frac1B\sum_b \lVert \Sigma^{-1}(z_b - \mu) + g_b \rVert^2_\Sigma`, the batch's
    estimate of the covariance-weighted score divergence of :math:`q` from :math:`p`."""
    residual = torch.linalg.solve(covariance, (draws - loc).T).T + scores
    return float((residual * (residual @ covariance)).sum(-1).mean())


def _start(density: LogDensity, generator: torch.Generator, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    start = density.initial_points(1, generator)[0]
    eye = torch.eye(density.dim, dtype=start.dtype)
    if init == "uniform":
        return start, eye
    path = lbfgs_path(
        density, start, history_size=6, max_iterations=1000, relative_tolerance=1e-10, gradient_tolerance=1e-8
    )
    estimates = inverse_hessian_estimates(path, 6)
    last = estimates[-1] if estimates else None
    if last is None or int(torch.linalg.cholesky_ex(last).info) != 0:
        last = eye
    return path.positions[-1], last


def _location_settled(locs: list[torch.Tensor], covariance: torch.Tensor, window: int) -> bool:
    if len(locs) < 2 * window:
        return False
    shift = torch.stack(locs[-window:]).mean(0) - torch.stack(locs[-2 * window : -window]).mean(0)
    squared = float(shift @ torch.linalg.solve(covariance, shift)) / shift.shape[0]
    return squared**0.5 < LOCATION_TOLERANCE


def _check(batch_size, max_iterations, min_iterations, window, learning_rate, init):
    if init not in INITS:
        raise ValueError(f"init: expected one of {INITS}; got {init!r}")
    check_positive_int(batch_size, "batch_size", minimum=1)
    check_positive_int(max_iterations, "max_iterations")
    check_positive_int(min_iterations, "min_iterations", minimum=0)
    check_positive_int(window, "window", minimum=2)
    if learning_rate is not None and not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
        raise ValueError(f"learning_rate: expected a number > 0 or None (the paper's B*D/(t+1)); got {learning_rate!r}")


def gsm_update(
    loc: torch.Tensor,
    covariance: torch.Tensor,
    draws: torch.Tensor,
    scores: torch.Tensor,
    learning_rate: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One GSM step: for each draw :math:`z` with score :math:`g`, the smallest change (in KL)
        of :math:`(\mu, \Sigma)` after which :math:`
    abla \log q(z) = g`, averaged over the batch
        (Modi et al. 2023, Algorithm 1); ``learning_rate`` is unused (GSM has none)."""
    eye = torch.eye(loc.shape[0], dtype=loc.dtype)
    loc_steps, covariance_steps = [], []
    for z, g in zip(draws, scores):
        sigma_g = covariance @ g
        offset = loc - z
        offset_g = offset @ g
        rho = 0.5 * torch.sqrt(1 + 4 * (g @ sigma_g + offset_g**2)) - 0.5
        step = (eye - torch.outer(offset, g) / (1 + rho + offset_g)) @ (sigma_g - offset) / (1 + rho)
        moved = loc + step - z
        loc_steps.append(step)
        covariance_steps.append(torch.outer(offset, offset) - torch.outer(moved, moved))
    new_covariance = covariance + torch.stack(covariance_steps).mean(0)
    return loc + torch.stack(loc_steps).mean(0), (new_covariance + new_covariance.T) / 2


def fit_bam(
    model: Model,
    *args: Any,
    seed: Optional[int] = 0,
    progress: bool = False,
    batch_size: int = 16,
    max_iterations: int = 500,
    min_iterations: int = 50,
    window: int = 25,
    learning_rate: Optional[float] = None,
    init: str = "lbfgs",
    **kwargs: Any,
) -> SVIResult:
    r"""Batch-and-match VI on ``model(*args, **kwargs)``; ``fit_svi(model, "bam")`` calls it.

    Args:
        model: a Pyro model with continuous latents; ``*args, **kwargs`` its data.
        seed: seeds the start and the batches (and clears Pyro's param store).
        progress: unused; accepted for ``fit_svi``'s signature.
        batch_size: :math:`B`, draws (score evaluations) per iteration.
        max_iterations: iterations at most; min_iterations: none stops earlier.
        window: iterations per window of the convergence test.
        learning_rate: a constant :math:`\lambda`; ``None``: :math:`\lambda_t = BD/(t+1)`.
        init: ``"lbfgs"`` (:math:`\mu_0` the L-BFGS mode from a uniform start, :math:`\Sigma_0`
            its inverse-Hessian estimate) or ``"uniform"`` (:math:`\mu_0` uniform on (-2, 2)
            with a finite density, as Stan's starts, :math:`\Sigma_0 = I`).

    Returns:
        An :class:`SVIResult` with the final Gaussian as guide; ``losses`` are the per-batch
        score-divergence estimates; ``config["gradient_evaluations"]`` counts score calls;
        ``config["dropped_draws"]`` counts draws left out of a batch for a non-finite score.
    """
    _check(batch_size, max_iterations, min_iterations, window, learning_rate, init)

    def rate(t: int, dim: int) -> float:
        return learning_rate if learning_rate is not None else batch_size * dim / (t + 1)

    return _fit(
        model,
        args,
        kwargs,
        "bam",
        bam_update,
        rate,
        seed=seed,
        batch_size=batch_size,
        max_iterations=max_iterations,
        min_iterations=min_iterations,
        window=window,
        init=init,
        config={"learning_rate": learning_rate},
    )


def fit_gsm(
    model: Model,
    *args: Any,
    seed: Optional[int] = 0,
    progress: bool = False,
    batch_size: int = 2,
    max_iterations: int = 1000,
    min_iterations: int = 50,
    window: int = 25,
    init: str = "lbfgs",
    **kwargs: Any,
) -> SVIResult:
    r"""Gaussian score matching VI on ``model(*args, **kwargs)``; ``fit_svi(model, "gsm")`` calls it.

    Each iteration moves :math:`(\mu, \Sigma)` by the batch average of the per-draw closed-form
    updates that make :math:`q`'s score match :math:`p`'s at the draw (:func:`gsm_update`); no
    learning rate. Start, convergence test, arguments and result as :func:`fit_bam` (default
    ``batch_size`` 2, the authors' example).

    References:
        Variational inference with Gaussian score matching, Modi, Margossian, Yao, Gower, Blei
        and Saul, NeurIPS 2023, arXiv:2307.07849 (Algorithm 1; the update follows the
        authors' ``gsmvi/gsm.py``).
    """
    _check(batch_size, max_iterations, min_iterations, window, None, init)
    return _fit(
        model,
        args,
        kwargs,
        "gsm",
        gsm_update,
        lambda t, dim: None,
        seed=seed,
        batch_size=batch_size,
        max_iterations=max_iterations,
        min_iterations=min_iterations,
        window=window,
        init=init,
        config={},
    )


def _fit(
    model, args, kwargs, name, update, rate, *, seed, batch_size, max_iterations, min_iterations, window, init, config
) -> SVIResult:
    """The loop BaM and GSM share: draw a batch from q_t, take its scores, update."""
    start_time = time.perf_counter()
    if seed is not None:
        pyro.set_rng_seed(seed)
        pyro.clear_param_store()
    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    density = LogDensity(model, args, kwargs, seed=0 if seed is None else seed)
    dim = density.dim
    loc, covariance = _start(density, generator, init)
    losses, locs, dropped, rejected, converged = [], [], 0, 0, False
    for t in range(max_iterations):
        scale_tril = torch.linalg.cholesky(covariance)
        draws = loc + torch.randn(batch_size, dim, generator=generator, dtype=loc.dtype) @ scale_tril.T
        _, scores = density.value_and_score(draws)
        finite = torch.isfinite(scores).all(-1)
        dropped += int((~finite).sum())
        if int(finite.sum()) < min(2, batch_size):
            raise RuntimeError(
                f"{name}: the score is not finite at {int((~finite).sum())} of {batch_size} draws of "
                f"iteration {t}; the model's density is not differentiable where q puts its mass"
            )
        draws, scores = draws[finite], scores[finite]
        losses.append(_score_divergence(loc, covariance, draws, scores))
        new_loc, new_covariance = update(loc, covariance, draws, scores, rate(t, dim))
        if int(torch.linalg.cholesky_ex(new_covariance).info) == 0 and bool(torch.isfinite(new_loc).all()):
            loc, covariance = new_loc, new_covariance
        else:  # round-off broke positive definiteness: keep q_t, as the authors' code does
            rejected += 1
        locs.append(loc)
        if (
            t + 1 >= min_iterations
            and (t + 1) % window == 0
            and has_converged(losses, window=window, rtol=1e-3)
            and _location_settled(locs, covariance, window)
        ):
            converged = True
            break
    guide = gaussian_guide(model, args, kwargs, loc, torch.linalg.cholesky(covariance), sites=density.potential.sites)
    config = {
        "batch_size": batch_size,
        "max_iterations": max_iterations,
        **config,
        "iterations": len(losses),
        "gradient_evaluations": density.gradient_evaluations,
        "density_evaluations": density.density_evaluations,
        "dropped_draws": dropped,
        "rejected_updates": rejected,
        "init": init,
        "batched_density": density.batched,
    }
    return SVIResult(
        model,
        guide,
        args,
        kwargs,
        losses,
        time.perf_counter() - start_time,
        converged,
        name,
        "score divergence",
        config,
    )
