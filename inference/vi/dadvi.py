r"""DADVI: mean-field ADVI with a fixed set of draws, optimised to an exact optimum.

Giordano, Ingram & Broderick replace ADVI's stochastic gradients by a sample-average
approximation. Draw :math:`z_1, \dots, z_M \sim \mathcal N(0, I_D)` once; with
:math:`\eta = (\mu, \lambda)`, :math:`\sigma = e^{\lambda}`, minimise the deterministic objective

.. math::
    F(\eta) = -\frac1M \sum_{m=1}^M \log p\big(x, \mu + \sigma \odot z_m\big)
              - \sum_{d=1}^D \lambda_d - \tfrac D2 (1 + \log 2\pi),

the negative ELBO of :math:`q_\eta = \mathcal N(\mu, \mathrm{diag}\,\sigma^2)` on the model's
unconstrained space (Jacobian included) with its expectation replaced by the average over the
fixed draws. :math:`F` is smooth and deterministic, so a second-order trust-region method
(scipy's ``trust-ncg`` with Hessian-vector products from autograd), polished by Newton steps
with the full Hessian, reaches its optimum :math:`\hat\eta` to a tolerance on the Newton
decrement :math:`\sqrt{\nabla F^\top H^{-1} \nabla F}` (the distance to the optimum in the
metric of :math:`H`, whatever the parameters' scales): the answer depends on the draws, not on
a learning rate or a stopping heuristic.

Linear response (LRVB) covariance. Mean-field VI under-states variances and drops
correlations; the sensitivity of :math:`\hat\mu` to a perturbation of the log density gives
the covariance

.. math:: \Sigma_{\mathrm{LR}} = \big[H^{-1}\big]_{\mu\mu}, \qquad
          H = \nabla^2_{\eta} F(\hat\eta) \in \mathbb R^{2D \times 2D},

which is exact for a Gaussian posterior as :math:`M \to \infty`.

Antithetic draws (the default here; a departure from the paper, whose draws are i.i.d.). For a
Gaussian posterior :math:`\mathcal N(m, P^{-1})` the stationarity condition in :math:`\mu` reads
:math:`P(\mu - m + \sigma \odot \bar z) = 0`, so i.i.d. draws put :math:`\hat\mu` off by
:math:`\sigma \odot \bar z`, about :math:`0.18\,\sigma` per coordinate for :math:`M = 30`, and
give :math:`H` a cross block :math:`P\,\mathrm{diag}(\sigma \odot \bar z)` that biases
:math:`\Sigma_{\mathrm{LR}}`. Drawing :math:`M/2` points and using them with their negatives
makes :math:`\bar z = 0` (all odd moments vanish): :math:`\hat\mu = m` and
:math:`\Sigma_{\mathrm{LR}} = P^{-1}` exactly for any draws, and for a non-Gaussian posterior the
draws' error enters only through even moments. ``antithetic=False`` gives the paper's draws.

Counting. ``config["gradient_evaluations"]`` counts log-density gradients at single points:
one objective evaluation is :math:`M` of them; a Hessian-vector product (a second backward
pass through the same graph) counts :math:`2M`; the LRVB Hessian is :math:`2D` such products.

References:
    Giordano, Ingram & Broderick, "Black Box Variational Inference with a Deterministic
    Objective: Faster, More Accurate, and Even More Black Box", JMLR 2024, arXiv:2304.05527.
    Giordano, Broderick & Jordan, "Covariances, Robustness, and Variational Bayes", JMLR 2018,
    arXiv:1709.02536.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Optional

import numpy as np
import pyro
import scipy.optimize
import torch
from tqdm.auto import tqdm

from vilab.samples import flatten_samples
from vilab.inference.svi.api import SVIResult
from vilab.inference.common.validation import check_positive_int
from vilab.inference.engine.potential import VectorizationError
from vilab.inference.vi.gaussian import gaussian_guide
from vilab.inference.vi.potential import LoopedPotential, unconstrained_potential

__all__ = ["OPTIMIZERS", "fit_dadvi", "DADVIObjective"]

OPTIMIZERS = ("trust-ncg", "trust-krylov", "trust-exact")


class DADVIObjective:
    r"""The DADVI objective :math:`F(\eta)` on a fixed ``(M, D)`` draw matrix, with its gradient
    and Hessian-vector products, on NumPy vectors :math:`\eta = (\mu, \log\sigma)` of length
    :math:`2D` (scipy's interface).

    Args:
        log_density: maps a ``(B, D)`` tensor of unconstrained points to ``(B,)`` log densities,
            twice differentiable.
        draws: the fixed standard-normal draws, shape ``(M, D)``.
    """

    def __init__(self, log_density, draws: torch.Tensor) -> None:
        self.log_density, self.draws = log_density, draws
        self.num_draws, self.dim = draws.shape
        self.constant = 0.5 * self.dim * (1.0 + math.log(2 * math.pi))
        self.gradient_evaluations = 0
        self._cached: Optional[tuple[bytes, torch.Tensor, torch.Tensor, torch.Tensor]] = None

    def _graph(self, x: np.ndarray):
        key = x.tobytes()
        if self._cached is None or self._cached[0] != key:
            eta = torch.tensor(x, dtype=self.draws.dtype, requires_grad=True)
            with torch.enable_grad():
                loc, log_scale = eta[: self.dim], eta[self.dim :]
                points = loc + log_scale.exp() * self.draws
                value = -self.log_density(points).mean() - log_scale.sum() - self.constant
                (grad,) = torch.autograd.grad(value, eta, create_graph=True)
            self.gradient_evaluations += self.num_draws
            self._cached = (key, eta, value, grad)
        return self._cached[1:]

    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        r""":math:`F` and :math:`\nabla F` at ``x``; ``(inf, 0)`` where :math:`F` is not finite,
        so that a trust-region step there is rejected and the region shrinks."""
        _, value, grad = self._graph(x)
        value, grad = float(value.detach()), grad.detach().numpy().copy()
        if not np.isfinite(value) or not np.isfinite(grad).all():
            return math.inf, np.zeros_like(x)
        return value, grad

    def hessp(self, x: np.ndarray, vector: np.ndarray) -> np.ndarray:
        r""":math:`H(x) v` by a second backward pass through the graph of :math:`\nabla F(x)`."""
        eta, _, grad = self._graph(x)
        direction = torch.as_tensor(vector, dtype=grad.dtype)
        (product,) = torch.autograd.grad(grad, eta, grad_outputs=direction, retain_graph=True)
        self.gradient_evaluations += 2 * self.num_draws
        return product.detach().numpy().copy()

    def hessian(self, x: np.ndarray) -> np.ndarray:
        """The full ``(2D, 2D)`` Hessian, column by column, symmetrised."""
        basis = np.eye(2 * self.dim)
        hessian = np.stack([self.hessp(x, basis[i]) for i in range(2 * self.dim)], axis=1)
        return 0.5 * (hessian + hessian.T)


def fit_dadvi(
    model,
    *args: Any,
    seed: Optional[int] = 0,
    progress: bool = True,
    num_draws: int = 30,
    antithetic: bool = True,
    draws: Optional[torch.Tensor] = None,
    optimizer: str = "trust-ncg",
    gtol: float = 1e-8,
    tolerance: float = 1e-5,
    max_iterations: int = 1000,
    num_lrvb_samples: int = 4000,
    **kwargs: Any,
) -> SVIResult:
    r"""Fit a mean-field Gaussian to ``model(*args, **kwargs)`` by DADVI, with its LRVB covariance.

    Args:
        model: a Pyro model with continuous latent sites; ``*args, **kwargs`` are its data.
        seed: seeds the draws (and Pyro's RNG, clearing the param store); ``None`` draws from
            torch's global RNG and leaves the param store alone.
        num_draws: :math:`M`, the number of fixed draws (the paper's default is 30).
        antithetic: draw :math:`M/2` standard normals and use them with their negatives (``M``
            must be even); ``False`` draws :math:`M` i.i.d. as the paper does.
        draws: the fixed draws themselves, shape ``(M, D)``, instead of drawing them (e.g.
            antithetic pairs ``torch.cat([z, -z])``, whose mean is zero).
        optimizer: ``"trust-ncg"`` (default, Hessian-vector products), ``"trust-krylov"`` or
            ``"trust-exact"`` (full Hessian each step); scipy's trust-region methods.
        gtol: scipy's stopping rule, :math:`\|\nabla F\|_2 <` ``gtol``; the optimiser also stops
            where rounding leaves it no predicted decrease.
        tolerance: convergence test on the Newton decrement
            :math:`\delta = \sqrt{\nabla F^\top H^{-1} \nabla F}`, the distance to the optimum in the
            metric of :math:`H` (for the means, in units of the LRVB sd; invariant to the scale of
            the parameters, unlike a gradient norm). Full-Hessian Newton steps polish the
            optimiser's answer until :math:`\delta <` ``tolerance``.
        max_iterations: the optimiser's iteration limit.
        num_lrvb_samples: draws of :math:`\mathcal N(\hat\mu, \Sigma_{\mathrm{LR}})` pushed to the
            constrained space to give each parameter's LRVB sd.

    Returns:
        An :class:`SVIResult` whose ``guide`` is the fitted mean-field Gaussian (an
        ``AutoMultivariateNormal`` with a diagonal scale), ``losses`` the objective :math:`F`
        (a negative ELBO estimate) at each iteration, ``converged`` whether the Newton decrement
        fell below ``tolerance`` at a point whose Hessian is positive definite, and ``config``
        holding ``gradient_evaluations``, ``lrvb_covariance`` (unconstrained, ``(D, D)``),
        ``lrvb_sd`` (flat parameter name -> sd in the constrained space, sampled),
        ``lrvb_error`` (why there is none, if so) and the optimiser's record.

    Raises:
        ValueError: bad options or draws (before any work), or a model with discrete latents.
    """
    _check_options(
        num_draws, antithetic and draws is None, optimizer, gtol, tolerance, max_iterations, num_lrvb_samples
    )
    if seed is not None:
        pyro.set_rng_seed(seed)
        pyro.clear_param_store()
    if torch.get_default_dtype() != torch.float64:
        # Rounding in float32 leaves a Newton decrement near 1e-3: the test of 1e-5 then fails.
        warnings.warn(
            "fit_dadvi: the default dtype is not float64, so the objective's rounding may stop the "
            "Newton decrement above `tolerance` (converged=False although the answer is close); "
            "call torch.set_default_dtype(torch.float64) before building the data",
            RuntimeWarning,
            stacklevel=2,
        )
    start = time.perf_counter()
    potential = _potential(model, args, kwargs, num_draws if draws is None else len(draws), seed)
    draws = _draws(draws, num_draws, antithetic, potential.dim, seed)
    objective = DADVIObjective(potential.log_density, draws)
    losses: list[float] = []
    solution = _minimize(objective, np.zeros(2 * potential.dim), optimizer, gtol, max_iterations, losses, progress)
    if solution.fallback:
        warnings.warn(f"fit_dadvi: {solution.fallback}", RuntimeWarning, stacklevel=2)
    x, hessian, decrement, newton_steps = _newton_polish(objective, solution.x, tolerance, losses)
    lrvb_covariance, lrvb_error = _lrvb(hessian, potential.dim)
    loc = torch.as_tensor(x[: potential.dim], dtype=draws.dtype)
    scale = torch.as_tensor(x[potential.dim :], dtype=draws.dtype).exp()
    config = {
        "method": "dadvi",
        "num_draws": len(draws),
        "antithetic": bool(antithetic),
        "optimizer": optimizer,
        "iterations": int(solution.nit),
        "optimizer_message": str(solution.message),
        "optimizer_fallback": solution.fallback,
        "newton_steps": newton_steps,
        "newton_decrement": decrement,
        "tolerance": tolerance,
        "gradient_norm": float(np.linalg.norm(objective.value_and_grad(x)[1])),
        "vectorized": not isinstance(potential, LoopedPotential),
        "gradient_evaluations": objective.gradient_evaluations,
        "lrvb_covariance": None,
        "lrvb_sd": None,
        "lrvb_error": lrvb_error,
    }
    if lrvb_covariance is not None:
        config["lrvb_covariance"] = lrvb_covariance.tolist()
        config["lrvb_sd"] = _constrained_sd(potential, loc, lrvb_covariance, num_lrvb_samples, seed)
    else:
        warnings.warn(f"fit_dadvi: no LRVB covariance ({lrvb_error})", RuntimeWarning, stacklevel=2)
    converged = decrement < tolerance and lrvb_error is None
    guide = gaussian_guide(model, args, kwargs, loc, scale, sites=potential.sites)
    return SVIResult(
        model,
        guide,
        args,
        kwargs,
        losses or [float(solution.fun)],
        time.perf_counter() - start,
        converged,
        "dadvi",
        "dadvi",
        config,
    )


def _check_options(num_draws, antithetic, optimizer, gtol, tolerance, max_iterations, num_lrvb_samples) -> None:
    check_positive_int(num_draws, "num_draws")
    if antithetic and num_draws % 2:
        raise ValueError(f"num_draws: expected an even number with antithetic=True (pairs z, -z); got {num_draws}")
    check_positive_int(max_iterations, "max_iterations")
    check_positive_int(num_lrvb_samples, "num_lrvb_samples", minimum=2)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}; got {optimizer!r}")
    for value, name in ((gtol, "gtol"), (tolerance, "tolerance")):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name}: expected a positive number; got {value!r}")


def _potential(model, args, kwargs, batch_size: int, seed: Optional[int]):
    try:
        return unconstrained_potential(model, args, kwargs, batch_size=batch_size, seed=seed or 0)
    except VectorizationError as error:
        raise ValueError(f"model: DADVI needs continuous latent sites; {error}") from error


def _draws(draws, num_draws: int, antithetic: bool, dim: int, seed: Optional[int]) -> torch.Tensor:
    dtype = torch.get_default_dtype()
    if draws is None:
        # seed=None: the global RNG, which the caller controls.
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        if not antithetic:
            return torch.randn(num_draws, dim, generator=generator, dtype=dtype)
        half = torch.randn(num_draws // 2, dim, generator=generator, dtype=dtype)
        return torch.cat([half, -half])
    draws = torch.as_tensor(draws, dtype=dtype)
    if draws.dim() != 2 or draws.shape[1] != dim or draws.shape[0] < 1:
        raise ValueError(
            f"draws: expected shape (M, {dim}) (the model has {dim} unconstrained dimensions); got {tuple(draws.shape)}"
        )
    if not bool(torch.isfinite(draws).all()):
        raise ValueError("draws: expected finite values; got NaN or inf")
    return draws


class _StalledConjugateGradient(Exception):
    """scipy's ``trust-ncg`` inner loop has no iteration limit: with a non-finite Hessian-vector
    product (overflow in a very curved region) it never ends."""


def _guarded_hessp(objective: DADVIObjective, calls: list[int]):
    # In exact arithmetic conjugate gradients ends within 2D products; allow ample slack.
    limit = 10 * (2 * objective.dim + 1)

    def hessp(x: np.ndarray, vector: np.ndarray) -> np.ndarray:
        calls[0] += 1
        product = objective.hessp(x, vector)
        if calls[0] > limit or not np.isfinite(product).all():
            raise _StalledConjugateGradient(
                "non-finite Hessian-vector product" if calls[0] <= limit else f"{limit} products in one step"
            )
        return product

    return hessp


def _minimize(objective: DADVIObjective, x0, optimizer, gtol, max_iterations, losses, progress):
    """scipy's trust-region ``optimizer``; where ``trust-ncg``'s conjugate gradients stall, the
    run goes on from the last iterate with ``trust-exact`` (whose Hessian is made finite), and
    ``result.fallback`` says why."""
    bar = tqdm(total=max_iterations, desc="DADVI", disable=not progress, leave=False)
    calls, last = [0], [np.asarray(x0, dtype=float)]

    def callback(intermediate_result):
        calls[0] = 0
        last[0] = np.array(intermediate_result.x, dtype=float)
        losses.append(float(intermediate_result.fun))
        bar.update(1)
        bar.set_postfix(objective=f"{intermediate_result.fun:.6g}")

    def run(method, start, iterations):
        exact = method == "trust-exact"
        return scipy.optimize.minimize(
            objective.value_and_grad,
            start,
            jac=True,
            hess=_finite_hessian(objective) if exact else None,
            hessp=None if exact else _guarded_hessp(objective, calls),
            method=method,
            callback=callback,
            options={"gtol": gtol, "maxiter": iterations},
        )

    try:
        try:
            result = run(optimizer, x0, max_iterations)
            result.fallback = ""
        except _StalledConjugateGradient as stall:
            done = len(losses)
            result = run("trust-exact", last[0], max(max_iterations - done, 1))
            result.nit += done
            result.fallback = f"{optimizer} stalled after {done} iterations ({stall}); went on with trust-exact"
        return result
    finally:
        bar.close()


def _finite_hessian(objective: DADVIObjective):
    r"""``objective.hessian`` for scipy's ``trust-exact``, which builds the Hessian at every proposed
    point: where it is not finite (where :math:`F = \infty`, a step the trust region rejects)
    the identity stands in, so that the rejection can happen."""

    def hessian(x: np.ndarray) -> np.ndarray:
        value = objective.hessian(x)
        return value if np.isfinite(value).all() else np.eye(len(x))

    return hessian


def _newton_polish(
    objective: DADVIObjective, x: np.ndarray, tolerance: float, losses: list[float], max_steps: int = 20
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Newton steps with the full Hessian (a direct solve, so ill-conditioning that stalls
    conjugate gradients does no harm) from ``x`` until the Newton decrement is below
    ``tolerance``; returns the point, its Hessian, its decrement and the number of steps."""
    for step in range(max_steps + 1):
        value, grad = objective.value_and_grad(x)
        hessian = objective.hessian(x)
        try:
            cholesky = np.linalg.cholesky(hessian)
            direction = np.linalg.solve(cholesky.T, np.linalg.solve(cholesky, grad))
        except np.linalg.LinAlgError:  # not a strict minimum: _lrvb says so, and converged stays False
            return x, hessian, math.inf, step
        decrement = float(np.sqrt(max(grad @ direction, 0.0)))
        if decrement < tolerance or step == max_steps or not np.isfinite(value):
            return x, hessian, decrement, step
        x = _backtrack(objective, x, direction, value, decrement)
        losses.append(objective.value_and_grad(x)[0])
    raise AssertionError("unreachable")


def _backtrack(
    objective: DADVIObjective, x: np.ndarray, direction: np.ndarray, value: float, decrement: float
) -> np.ndarray:
    r"""The first of the steps :math:`x - 2^{-k} d` whose objective is not above ``value`` plus
    rounding (near the optimum the predicted decrease :math:`\delta^2/2` is below it)."""
    slack = 1e-12 * max(abs(value), 1.0)
    for halving in range(30):
        candidate = x - 0.5**halving * direction
        if objective.value_and_grad(candidate)[0] <= value - 0.25 * 0.5**halving * decrement**2 + slack:
            return candidate
    return x


def _lrvb(hessian: np.ndarray, dim: int) -> tuple[Optional[np.ndarray], Optional[str]]:
    r""":math:`[H^{-1}]_{\mu\mu}`, or ``None`` and the reason when :math:`H` is not positive
    definite (the optimum is not a strict minimum) or not finite."""
    if not np.isfinite(hessian).all():
        return None, "the Hessian of the objective at the optimum is not finite"
    try:
        cholesky = np.linalg.cholesky(hessian)
    except np.linalg.LinAlgError:
        smallest = float(np.linalg.eigvalsh(hessian)[0])
        return None, (
            f"the Hessian of the objective at the optimum is not positive definite (smallest "
            f"eigenvalue {smallest:.3g}): the optimiser stopped at no strict minimum"
        )
    inverse = np.linalg.solve(cholesky.T, np.linalg.solve(cholesky, np.eye(len(hessian))))
    covariance = inverse[:dim, :dim]
    return 0.5 * (covariance + covariance.T), None


def _constrained_sd(potential, loc, covariance, num_samples, seed, chunk: int = 500) -> dict[str, float]:
    r"""Per flat parameter (latent and deterministic sites, as ``compare`` names them), the sd of
    :math:`T^{-1}(z)` for :math:`z \sim \mathcal N(\hat\mu, \Sigma_{\mathrm{LR}})`."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    covariance = torch.as_tensor(covariance, dtype=loc.dtype)
    # eigh, not Cholesky: a covariance that is PSD up to rounding still has a square root.
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    root = eigenvectors * eigenvalues.clamp(min=0).sqrt()
    z = loc + torch.randn(num_samples, len(loc), generator=generator, dtype=loc.dtype) @ root.T
    parts = []
    with torch.no_grad():
        for block in z.split(chunk):  # chunks bound the memory of deterministic sites
            values, _ = potential.constrain(block)
            parts.append({**values, **potential.deterministic(block)})
    samples = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    return {name: float(np.std(value, ddof=1)) for name, value in flatten_samples(samples, 1).items()}
