r"""Start a Gaussian-family guide at the Laplace approximation, and precondition its steps by it.

Let :math:`u \in \mathbb R^D` be the model's latent variables on the unconstrained space (each
site mapped by ``biject_to(support).inv``, in the guide's own order) and

.. math:: \log \tilde p(u) = \log p(x, T(u)) + \log |\det J_T(u)|

the density a guide on that space approximates. :func:`find_laplace_start` finds its mode
:math:`\hat u` with L-BFGS (scipy) and the Hessian :math:`H = -\nabla^2 \log \tilde p(\hat u)`;
:math:`\mathcal N(\hat u, H^{-1})` is the Laplace approximation. :func:`start_guide` writes it
into a guide before the first SVI step: the full covariance for ``fullrank``, its leading
eigenvectors for ``lowrank``, and :math:`\mathrm{diag}(H)^{-1/2}` (the KL-optimal mean-field
scale of a Gaussian posterior) for ``meanfield`` and the final affine map of a flow.

It also returns a per-element *step scale* for every guide parameter. Adam moves each
parameter by about ``lr`` per step whatever its gradient's size, so a location whose posterior
sd is :math:`10^{-3}` jumps ten sds per step at ``lr = 0.01``, and one with sd :math:`10^3`
barely moves. Scaling each location's step (and its gradient clip) by its Laplace sd, and each
positive scale's step so that it moves :math:`\log \sigma` by about ``lr``, makes the optimiser's
path the same in every parametrisation that differs by a per-coordinate affine map.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import autoguide
from scipy.optimize import minimize
from torch.distributions import biject_to, transform_to

from vilab.errors import LaplaceError
from vilab.guides.flows import AutoFlow, ElementwiseAffine
from vilab.inference.common.validation import check_positive_int

__all__ = [
    "LaplaceStart",
    "LaplaceError",
    "find_laplace_start",
    "start_guide",
    "prepare_guide",
    "window_size",
    "LAPLACE_FAMILIES",
    "LAPLACE_GUIDES",
    "MAX_LAPLACE_DIM",
]

#: Guide classes that :func:`start_guide` knows how to start at the Laplace approximation.
LAPLACE_FAMILIES = (
    autoguide.AutoNormal,
    autoguide.AutoMultivariateNormal,
    autoguide.AutoLowRankMultivariateNormal,
    autoguide.AutoLaplaceApproximation,
    AutoFlow,
)
#: Registry guides that start at the Laplace approximation under ``init="auto"``.
LAPLACE_GUIDES = ("meanfield", "fullrank", "lowrank", "laplace", "iaf", "nsf", "planar", "radial", "sylvester")
#: Above this many latent dimensions the dense Hessian (D backward passes, D^2 memory) is not
#: computed and guides keep their own initialisation.
MAX_LAPLACE_DIM = 1000


class LaplaceStart(NamedTuple):
    """The Laplace approximation on the unconstrained space, or why there is none.

    Attributes:
        loc: the mode :math:`\\hat u`, shape ``(D,)`` (``None`` on failure).
        covariance: :math:`H^{-1}`, shape ``(D, D)`` (``None`` on failure).
        log_density: :math:`\\log \\tilde p(\\hat u)`.
        num_gradient_evaluations: log-density gradients spent (L-BFGS plus ``D`` for the Hessian).
        message: ``""`` on success, else why no start was found.
    """

    loc: Optional[torch.Tensor]
    covariance: Optional[torch.Tensor]
    log_density: float
    num_gradient_evaluations: int
    message: str

    @property
    def ok(self) -> bool:
        return self.loc is not None


def _sites(guide) -> list[tuple[str, torch.Size, Callable]]:
    """``(name, unconstrained shape, transform)`` per latent site, in the guide's order."""
    out = []
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        transform = biject_to(site["fn"].support)
        out.append((name, transform.inv(site["value"].detach()).shape, transform))
    return out


def _log_density_fn(model, args, kwargs, sites) -> Callable[[torch.Tensor], torch.Tensor]:
    def log_density(flat: torch.Tensor) -> torch.Tensor:
        values, jacobian, offset = {}, flat.new_zeros(()), 0
        for name, shape, transform in sites:
            size = math.prod(shape)
            unconstrained = flat[offset : offset + size].reshape(shape)
            offset += size
            values[name] = transform(unconstrained)
            jacobian = jacobian + transform.log_abs_det_jacobian(unconstrained, values[name]).sum()
        with pyro.validation_enabled(False):
            trace = poutine.trace(poutine.condition(model, values)).get_trace(*args, **kwargs)
        return trace.log_prob_sum() + jacobian

    return log_density


def find_laplace_start(model, guide, args: tuple, kwargs: dict, *, max_iterations: int = 2000) -> LaplaceStart:
    r"""The mode and Hessian of :math:`\log \tilde p(u)` in ``guide``'s latent order.

    The search starts at the guide's own initial point (``init_to_median``) and runs scipy's
    L-BFGS-B in float64, then at most five Newton steps with the exact Hessian to polish the
    mode. It fails (``ok`` false, ``message`` says why) when the optimiser does not converge
    (e.g. a posterior that is improper or unbounded along some direction), when the Hessian is
    not positive definite, or when ``D`` exceeds :data:`MAX_LAPLACE_DIM`.
    """
    sites = _sites(guide)
    dim = sum(math.prod(shape) for _, shape, _ in sites)
    if dim > MAX_LAPLACE_DIM:
        return LaplaceStart(None, None, math.nan, 0, f"{dim} latent dimensions > {MAX_LAPLACE_DIM}")
    log_density = _log_density_fn(model, args, kwargs, sites)
    start = torch.cat(
        [transform.inv(guide.prototype_trace.nodes[name]["value"].detach()).reshape(-1) for name, _, transform in sites]
    ).double()
    counter = [0]

    def negative(x: np.ndarray):
        counter[0] += 1
        point = torch.as_tensor(x, dtype=torch.float64).requires_grad_()
        value = -log_density(point)
        (grad,) = torch.autograd.grad(value, point)
        value, grad = float(value.detach()), grad.numpy()
        if not (math.isfinite(value) and np.isfinite(grad).all()):
            return math.inf, np.zeros_like(x)  # L-BFGS-B's line search backs off from inf
        return value, grad

    with torch.random.fork_rng():
        result = minimize(
            negative,
            start.numpy(),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": max_iterations, "maxfun": 2 * max_iterations},
        )
    if not result.success or not math.isfinite(result.fun):
        return LaplaceStart(
            None, None, math.nan, counter[0], f"L-BFGS found no mode ({result.message}; log density {-result.fun:.4g})"
        )
    return _polish(log_density, torch.as_tensor(result.x, dtype=torch.float64), counter[0], dim)


def _polish(log_density, loc: torch.Tensor, evaluations: int, dim: int) -> LaplaceStart:
    """Newton steps from ``loc`` with the exact Hessian; the Laplace covariance at the end."""
    for _ in range(5):
        hessian = -torch.autograd.functional.hessian(log_density, loc)
        point = loc.clone().requires_grad_()
        (grad,) = torch.autograd.grad(log_density(point), point)
        evaluations += dim + 1
        cholesky, info = torch.linalg.cholesky_ex(0.5 * (hessian + hessian.T))
        if int(info) != 0 or not torch.isfinite(hessian).all():
            return LaplaceStart(None, None, math.nan, evaluations, "the Hessian at the mode is not positive definite")
        step = torch.cholesky_solve(grad.unsqueeze(-1), cholesky).squeeze(-1)
        # Newton decrement: the predicted gain in log density, in nats.
        if float(grad @ step) < 1e-10:
            break
        loc = loc + step
    covariance = torch.cholesky_inverse(cholesky)
    return LaplaceStart(loc.detach(), covariance, float(log_density(loc)), evaluations, "")


def _inverse_softplus(value: torch.Tensor) -> torch.Tensor:
    return value + torch.log(-torch.expm1(-value))


def _positive_step_scale(value: torch.Tensor) -> torch.Tensor:
    r"""Step scale of a softplus-parametrised positive :math:`s = \mathrm{softplus}(r)`:
    :math:`d r = \epsilon\, s / \sigma(r)` moves :math:`\log s` by :math:`\epsilon`."""
    return value / torch.sigmoid(_inverse_softplus(value))


def _write(module, name: str, value: torch.Tensor) -> None:
    """Write the constrained ``value`` into the ``PyroParam`` ``name`` (or plain parameter)."""
    constraint = module._pyro_params[name][0] if name in getattr(module, "_pyro_params", {}) else None
    target = getattr(module, f"{name}_unconstrained") if constraint is not None else module._parameters[name]
    with torch.no_grad():
        unconstrained = transform_to(constraint).inv(value) if constraint is not None else value
        target.copy_(unconstrained.to(target.dtype).reshape(target.shape))


def start_guide(guide, start: LaplaceStart) -> dict[int, torch.Tensor]:
    """Write the Laplace approximation ``start`` into ``guide`` (already set up).

    Returns:
        ``id(parameter) -> step scale`` (same shape as the parameter's unconstrained tensor),
        which is also the parameter's natural unit for the convergence test: ones for
        dimensionless parameters (the unit Cholesky factor of ``fullrank``, the factor of
        ``lowrank``); flow layers' weights are left out (no natural unit).
    """
    scales: dict[int, torch.Tensor] = {}
    loc, cov = start.loc, start.covariance
    sd = cov.diagonal().sqrt()
    if isinstance(guide, autoguide.AutoNormal):
        _start_meanfield(guide, start, scales)
    elif isinstance(guide, autoguide.AutoMultivariateNormal):
        cholesky = torch.linalg.cholesky(cov)
        diagonal = cholesky.diagonal()
        _write(guide, "loc", loc)
        _write(guide, "scale", diagonal)
        _write(guide, "scale_tril", cholesky / diagonal.unsqueeze(-1))
        scales[id(guide.loc)] = sd.to(guide.loc.dtype)
        scales[id(guide.scale_unconstrained)] = _positive_step_scale(diagonal).to(guide.loc.dtype)
        # The unit Cholesky factor is dimensionless (correlation-like): unit 1, no rescaling.
        scales[id(guide.scale_tril_unconstrained)] = torch.ones_like(guide.scale_tril_unconstrained)
    elif isinstance(guide, autoguide.AutoLowRankMultivariateNormal):
        _start_lowrank(guide, loc, cov, scales)
    elif isinstance(guide, autoguide.AutoLaplaceApproximation):
        _write(guide, "loc", loc)
        scales[id(guide.loc)] = sd.to(guide.loc.dtype)
    elif isinstance(guide, AutoFlow):
        affine = [t for t in guide.transform.parts if isinstance(t, ElementwiseAffine)][-1]
        # sigma = diag(H)^(-1/2): the mean-field optimum of a Gaussian; the flow layers, at
        # identity, learn what the Gaussian cannot.
        scale = cov.inverse().diagonal().rsqrt()
        with torch.no_grad():
            affine.loc.copy_(loc)
            affine.raw_scale.copy_(_inverse_softplus(scale))
        scales[id(affine.loc)] = scale.to(affine.loc.dtype)
        scales[id(affine.raw_scale)] = _positive_step_scale(scale).to(affine.loc.dtype)
    return scales


def _start_meanfield(guide, start: LaplaceStart, scales: dict) -> None:
    # The KL(q || p)-optimal diagonal Gaussian of N(m, H^-1) has variances 1 / diag(H).
    scale = start.covariance.inverse().diagonal().rsqrt()
    offset = 0
    for name, shape, _ in _sites(guide):
        piece = slice(offset, offset + math.prod(shape))
        offset += math.prod(shape)
        *path, leaf = name.split(".")  # AutoNormal nests a dotted site name as submodules
        loc_module, scale_module = guide.locs, guide.scales
        for part in path:
            loc_module, scale_module = getattr(loc_module, part), getattr(scale_module, part)
        _write(loc_module, leaf, start.loc[piece])
        _write(scale_module, leaf, scale[piece])
        loc_param = getattr(loc_module, f"{leaf}_unconstrained")
        scale_param = getattr(scale_module, f"{leaf}_unconstrained")
        scales[id(loc_param)] = scale[piece].reshape(loc_param.shape).to(loc_param.dtype)
        scales[id(scale_param)] = _positive_step_scale(scale[piece]).reshape(scale_param.shape).to(loc_param.dtype)


def _start_lowrank(guide, loc: torch.Tensor, cov: torch.Tensor, scales: dict) -> None:
    r"""Pyro's low-rank family is :math:`\Sigma = \mathrm{diag}(s) (W W^\top + I) \mathrm{diag}(s)`.
    With :math:`R = D^{-1/2} \Sigma D^{-1/2}` (:math:`D = \mathrm{diag}(\Sigma)`) and its top
    ``rank`` eigenpairs :math:`(\lambda_k, v_k)`, take :math:`s^2 = \delta D` with :math:`\delta`
    the mean of the remaining eigenvalues (at most 1) and :math:`W = [v_k \sqrt{\lambda_k/\delta - 1}]`."""
    sd = cov.diagonal().sqrt()
    correlation = cov / sd.unsqueeze(-1) / sd
    values, vectors = torch.linalg.eigh(correlation)
    rank = guide.rank
    top, rest = values[-rank:], values[:-rank]
    delta = float(rest.mean().clamp(1e-3, 1.0)) if len(rest) else 1.0
    factor = vectors[:, -rank:] * (top / delta - 1).clamp(min=0).sqrt()
    _write(guide, "loc", loc)
    _write(guide, "scale", sd * math.sqrt(delta))
    _write(guide, "cov_factor", factor)
    scales[id(guide.loc)] = sd.to(guide.loc.dtype)
    scales[id(guide.scale_unconstrained)] = _positive_step_scale(sd * math.sqrt(delta)).to(guide.loc.dtype)
    # W is relative to the scales (dimensionless): unit 1, no rescaling.
    scales[id(guide.cov_factor)] = torch.ones_like(guide.cov_factor)


def window_size(num_steps: int, window: Optional[int]) -> int:
    """The convergence test's window: ``num_steps / 4`` clamped to 40-1000, a multiple of 4."""
    if window is None:
        return min(1000, max(40, num_steps // 16 * 4))
    check_positive_int(window, "window")
    if window % 4 or window < 8:
        raise ValueError(f"window: expected a multiple of 4 and >= 8; got {window}")
    return window


def prepare_guide(guide, name: str, init: str, model, args, kwargs):
    """Set ``guide`` up and start it at the Laplace approximation where ``init`` asks for it.

    Returns ``(guide, LaplaceStart or None, step scales, a note for config["init"])``."""
    if (
        init == "guide"
        or not isinstance(guide, LAPLACE_FAMILIES)
        or (not isinstance(name, str) or name not in LAPLACE_GUIDES)
    ):
        if init == "laplace":
            raise LaplaceError(
                f"fit_svi: init='laplace' needs a registry guide of {sorted(LAPLACE_GUIDES)}; got {name!r}"
            )
        return guide, None, {}, "the guide's own initialisation"
    with torch.random.fork_rng(), pyro.validation_enabled(False):
        guide(*args, **kwargs)  # sets the guide up: its prototype trace and parameters
    laplace = find_laplace_start(model, guide, args, kwargs)
    if not laplace.ok:
        if init == "laplace":
            raise LaplaceError(f"fit_svi: init='laplace' found no Laplace start: {laplace.message}")
        return guide, laplace, {}, f"the guide's own initialisation (no Laplace start: {laplace.message})"
    return guide, laplace, start_guide(guide, laplace), "Laplace approximation (L-BFGS mode, exact Hessian)"
