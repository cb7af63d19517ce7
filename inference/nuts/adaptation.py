r"""Warmup adaptation for the multi-chain NUTS: Stan's windows, dual averaging and Welford.

Every quantity is held per chain (leading dimension ``C``), as Stan and NumPyro adapt each chain
on its own, so that R-hat still compares independently tuned chains.

References:
    The No-U-Turn Sampler: Adaptively Setting Path Lengths in Hamiltonian Monte Carlo,
    Hoffman and Gelman, 2014, arXiv:1111.4246 (dual averaging, Algorithm 5).
    Stan Reference Manual, "HMC algorithm parameters" (windowed mass-matrix adaptation).
"""

from __future__ import annotations

import math

import torch

__all__ = ["adaptation_windows", "DualAveraging", "Welford", "Metric"]

# Stan's defaults: a fast initial buffer for step size only, slow windows for the metric that
# double in length, and a fast terminal buffer that retunes the step size for the final metric.
_INIT_BUFFER, _TERM_BUFFER, _BASE_WINDOW = 75, 50, 25


def adaptation_windows(num_warmup: int) -> list[tuple[int, int]]:
    """Stan's warmup schedule as inclusive ``(start, end)`` iteration ranges.

    The first and last ranges adapt only the step size; the ones between also collect draws
    for the mass matrix, which is updated at each of their ends.
    """
    if num_warmup < 20:
        return [(0, num_warmup - 1)] if num_warmup > 0 else []
    init_buffer, term_buffer, base_window = _INIT_BUFFER, _TERM_BUFFER, _BASE_WINDOW
    if init_buffer + base_window + term_buffer > num_warmup:
        init_buffer, term_buffer = int(0.15 * num_warmup), int(0.1 * num_warmup)
        base_window = num_warmup - init_buffer - term_buffer
    windows = [(0, init_buffer - 1)]
    end_slow = num_warmup - term_buffer
    start, size = init_buffer, base_window
    while start < end_slow:
        # The last slow window absorbs the remainder when another doubling would not fit.
        if 3 * size <= end_slow - start:
            next_size = 2 * size
        else:
            size, next_size = end_slow - start, size
        windows.append((start, start + size - 1))
        start, size = start + size, next_size
    windows.append((end_slow, num_warmup - 1))
    return windows


class DualAveraging:
    r"""Nesterov dual averaging of :math:`\log \epsilon` towards a target acceptance rate.

    Args:
        step_size: initial step sizes ``(C,)``; the iterates shrink towards ``log(10 * step_size)``.
        target_accept: target mean acceptance probability :math:`\delta`.
    """

    # Hoffman and Gelman's recommended constants.
    gamma, t0, kappa = 0.05, 10.0, 0.75

    def __init__(self, step_size: torch.Tensor, target_accept: float) -> None:
        self.target_accept = target_accept
        self.mu = torch.log(10.0 * step_size)
        self.log_step = torch.log(step_size)
        self.log_step_avg = torch.zeros_like(step_size)
        self.gradient_avg = torch.zeros_like(step_size)
        self.count = 0

    def update(self, accept_prob: torch.Tensor) -> torch.Tensor:
        """Take one step with the chains' mean acceptance ``(C,)``; return the next step sizes."""
        self.count += 1
        t = self.count
        weight = 1.0 / (t + self.t0)
        self.gradient_avg = (1 - weight) * self.gradient_avg + weight * (self.target_accept - accept_prob)
        self.log_step = self.mu - math.sqrt(t) / self.gamma * self.gradient_avg
        eta = t ** (-self.kappa)
        self.log_step_avg = eta * self.log_step + (1 - eta) * self.log_step_avg
        return torch.exp(self.log_step)

    def final_step_size(self) -> torch.Tensor:
        """The averaged iterate, used once adaptation stops."""
        return torch.exp(self.log_step_avg)


class Welford:
    """Running mean and (co)variance of unconstrained draws ``(C, D)``, per chain."""

    def __init__(self, num_chains: int, dim: int, dense: bool, dtype: torch.dtype) -> None:
        self.dense, self.count = dense, 0
        self.mean = torch.zeros(num_chains, dim, dtype=dtype)
        self.m2 = torch.zeros(num_chains, dim, dim, dtype=dtype) if dense else torch.zeros(num_chains, dim, dtype=dtype)

    def update(self, z: torch.Tensor) -> None:
        self.count += 1
        delta = z - self.mean
        self.mean = self.mean + delta / self.count
        delta_after = z - self.mean
        if self.dense:
            self.m2 = self.m2 + delta.unsqueeze(-1) * delta_after.unsqueeze(-2)
        else:
            self.m2 = self.m2 + delta * delta_after

    def regularized(self) -> torch.Tensor:
        """Stan's shrunk estimate: ``n/(n+5) * cov + 1e-3 * 5/(n+5) * I``."""
        n = self.count
        covariance = self.m2 / max(n - 1, 1)
        shrink = 1e-3 * 5.0 / (n + 5.0)
        if self.dense:
            eye = torch.eye(covariance.shape[-1], dtype=covariance.dtype)
            return (n / (n + 5.0)) * covariance + shrink * eye
        return (n / (n + 5.0)) * covariance + shrink


class Metric:
    r"""Euclidean metric: inverse mass matrix :math:`M^{-1}` (diagonal ``(C, D)`` or dense ``(C, D, D)``).

    Kinetic energy :math:`K(r) = \tfrac12 r^\top M^{-1} r`, velocity :math:`M^{-1} r`, and momenta
    drawn from :math:`\mathcal N(0, M)`.
    """

    def __init__(self, inverse_mass: torch.Tensor, dense: bool) -> None:
        self.dense = dense
        self.inverse_mass = inverse_mass
        if dense:
            # r = L^{-T} eps with L L^T = M^{-1} has covariance M.
            self._cholesky_inverse_mass = torch.linalg.cholesky(inverse_mass)
        else:
            self._momentum_scale = inverse_mass.rsqrt()

    def velocity(self, r: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return (self.inverse_mass @ r.unsqueeze(-1)).squeeze(-1)
        return self.inverse_mass * r

    def kinetic(self, r: torch.Tensor) -> torch.Tensor:
        return 0.5 * (r * self.velocity(r)).sum(-1)

    def sample_momentum(self, shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(shape, generator=generator, dtype=self.inverse_mass.dtype)
        if self.dense:
            lower_t = self._cholesky_inverse_mass.transpose(-1, -2)
            return torch.linalg.solve_triangular(lower_t, noise.unsqueeze(-1), upper=True).squeeze(-1)
        return self._momentum_scale * noise
