r"""When has stochastic optimisation of the ELBO converged? A stated test, and iterate averaging.

Stochastic gradient iterates with a (slowly decaying) step size do not settle at a point: once
the optimiser has reached the optimum's neighbourhood they fluctuate around it like a Markov
chain around its stationary distribution. :class:`IterateMonitor` keeps the last ``window``
iterates and calls the run converged when, over that window,

1. **no parameter is still moving**: for every monitored parameter, either the split
   :math:`\hat R` of its iterates (the window cut into ``num_splits`` consecutive pieces,
   treated as chains) is below ``rhat_threshold`` (1.1), as Dhaka et al. (2020) and Welandawe
   et al. (2022) propose, or its least-squares drift over the window is below
   ``drift_tolerance`` (0.1) of its natural unit (the posterior sd for a location started at
   the Laplace approximation, one log unit for a scale; a parameter with no known unit, such
   as a flow's network weight or any parameter without a Laplace start, has only the
   :math:`\hat R` arm, and where some parameters have units the others are left to the ELBO
   trend below: a flow's network weights drift along directions that leave :math:`q`
   unchanged, which their :math:`\hat R` cannot tell from progress). The second
   arm is needed because Adam's iterates at a small step size are an Ornstein-Uhlenbeck
   process whose correlation time (about ``1 / lr`` steps) can exceed the window: their
   :math:`\hat R` stays high while they wander a few hundredths of an sd around the optimum.
   A parameter still drifting (towards the optimum, or without bound on an improper
   posterior) fails both; and
2. **the ELBO has stopped rising**: the least-squares slope :math:`b` of the loss over the
   window, projected over one more window, :math:`-b\,W`, is at most ``z`` (2) of its Monte
   Carlo standard errors (batch means over 20 batches, so autocorrelated noise is counted) or
   below ``elbo_tolerance`` nats.

The fitted parameters are then the average of the window's iterates (Polyak-Ruppert
averaging), which removes most of the fluctuation that a single iterate carries.

:func:`has_converged` is the older loss-only rule, kept for callers outside SVI.

References:
    Dhaka et al., "Robust, Accurate Stochastic Optimization for Variational Inference", 2020,
    arXiv:2009.00666.
    Welandawe et al., "Robust, Automated, and Accurate Black-box Variational Inference", 2022,
    arXiv:2203.15945.
    Polyak & Juditsky, "Acceleration of Stochastic Approximation by Averaging", 1992.
"""

from __future__ import annotations

import collections
from typing import NamedTuple, Sequence

import numpy as np
import torch

__all__ = ["ConvergenceCheck", "IterateMonitor", "split_rhat", "loss_trend", "has_converged"]

RHAT_THRESHOLD = 1.1
TREND_Z = 2.0
NUM_TREND_BATCHES = 20


class ConvergenceCheck(NamedTuple):
    """One evaluation of the test. ``rhat``: the largest split :math:`\\hat R` over the
    parameters the test considers (those still moving, if any); ``elbo_gain``/``elbo_gain_se``: the ELBO gain projected over the next window
    and its standard error (nats); ``reason``: ``""`` when ``converged``, else what failed."""

    converged: bool
    step: int
    window: int
    rhat: float
    elbo_gain: float
    elbo_gain_se: float
    reason: str

    def as_dict(self) -> dict:
        return self._asdict()


def split_rhat(chains: np.ndarray) -> np.ndarray:
    r"""Potential scale reduction per column of ``chains`` ``(num_chains, num_draws, P)``.

    :math:`\hat R = \sqrt{\hat V / W}` with :math:`W` the mean within-chain variance and
    :math:`\hat V = \frac{n-1}{n} W + \frac1n B`, :math:`B/n` the variance of the chain means.
    Columns that never move (zero variance everywhere) get 1.
    """
    num_draws = chains.shape[1]
    within = chains.var(axis=1, ddof=1).mean(axis=0)
    between_over_n = chains.mean(axis=1).var(axis=0, ddof=1)
    pooled = (num_draws - 1) / num_draws * within + between_over_n
    with np.errstate(divide="ignore", invalid="ignore"):
        rhat = np.sqrt(pooled / within)
    return np.where(within > 0, rhat, np.where(between_over_n > 0, np.inf, 1.0))


def loss_trend(losses: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of ``losses`` per step and its batch-means standard error."""
    y = np.asarray(losses, dtype=float)
    t = np.arange(len(y), dtype=float) - (len(y) - 1) / 2
    sxx = float(t @ t)
    slope = float(t @ (y - y.mean()) / sxx)
    residuals = y - y.mean() - slope * t
    size = len(y) // NUM_TREND_BATCHES
    batch_means = residuals[: size * NUM_TREND_BATCHES].reshape(NUM_TREND_BATCHES, size).mean(axis=1)
    # Var of a residual's contribution with autocorrelation: batch size x var(batch means).
    variance = max(size * batch_means.var(ddof=1), residuals.var(ddof=2))
    return slope, float(np.sqrt(variance / sxx))


class IterateMonitor:
    r"""Records optimiser iterates and runs the convergence test (see the module docstring).

    Args:
        num_params: length of the flat parameter vector recorded each step.
        window: iterates per test (and per average); a multiple of ``num_splits``.
        num_splits: pieces the window is cut into for split :math:`\\hat R`.
        max_monitored: at most this many coordinates (a fixed random subset) enter
            :math:`\\hat R`, so that a guide with many parameters is not kept step by step.
        elbo_tolerance: an ELBO gain per window below this many nats counts as flat.
        units: ``(num_params,)`` natural unit of each parameter; NaN (the default) where there
            is none, which leaves that parameter the :math:`\hat R` arm only.
        drift_tolerance: a drift per window below this many units counts as settled.
    """

    def __init__(
        self,
        num_params: int,
        window: int,
        *,
        num_splits: int = 4,
        max_monitored: int = 2000,
        elbo_tolerance: float = 0.05,
        rhat_threshold: float = RHAT_THRESHOLD,
        units: torch.Tensor | None = None,
        drift_tolerance: float = 0.1,
        seed: int = 0,
    ):
        if window < 2 * num_splits or window % num_splits:
            raise ValueError(
                f"window: expected a multiple of num_splits={num_splits} >= {2 * num_splits}; got {window}"
            )
        self.window, self.num_splits, self.block = window, num_splits, window // num_splits
        self.elbo_tolerance, self.rhat_threshold = elbo_tolerance, rhat_threshold
        generator = np.random.default_rng(seed)
        self.index = (
            None
            if num_params <= max_monitored
            else torch.as_tensor(np.sort(generator.choice(num_params, max_monitored, replace=False)))
        )
        self.monitored: collections.deque = collections.deque(maxlen=window)
        self.block_sums: collections.deque = collections.deque(maxlen=num_splits)
        self.current, self.count, self.num_recorded = None, 0, 0
        units = torch.full((num_params,), float("nan")) if units is None else units.detach().reshape(-1)
        self.units = (units if self.index is None else units[self.index]).double().numpy()
        self.drift_tolerance = drift_tolerance

    def record(self, flat: torch.Tensor) -> None:
        """Add one iterate (the flat parameter vector after a step)."""
        flat = flat.detach()
        values = flat if self.index is None else flat[self.index]
        self.monitored.append(values.double().numpy().copy())
        self.current = flat.double().clone() if self.current is None else self.current.add_(flat)
        self.count, self.num_recorded = self.count + 1, self.num_recorded + 1
        if self.count == self.block:
            self.block_sums.append(self.current)
            self.current, self.count = None, 0

    @property
    def ready(self) -> bool:
        """A full window has been recorded and the last block is complete."""
        return len(self.block_sums) == self.num_splits and self.count == 0

    def average(self) -> torch.Tensor:
        """Mean of the iterates of the last complete window."""
        return torch.stack(list(self.block_sums)).sum(0) / self.window

    def check(self, losses: Sequence[float]) -> ConvergenceCheck:
        """Run the test on the last window (call when :attr:`ready`)."""
        iterates = np.stack(list(self.monitored))
        rhats = split_rhat(iterates.reshape(self.num_splits, self.block, -1))
        with np.errstate(invalid="ignore"):
            drifts = np.abs(_slopes(iterates)) * self.window / self.units
            moving = ~((rhats < self.rhat_threshold) | (drifts < self.drift_tolerance))
        if np.isfinite(self.units).any():
            # Parameters without a unit beside ones with (a flow's network weights beside its
            # Laplace-started affine map) are left to the ELBO trend: their R-hat also sees
            # drift along directions that do not change q (the networks' symmetries).
            moving &= np.isfinite(self.units)
        considered = np.isfinite(self.units) if np.isfinite(self.units).any() else np.ones_like(moving)
        rhat = float(np.max(rhats[moving if moving.any() else considered], initial=1.0))
        slope, slope_se = loss_trend(losses[-self.window :])
        gain, gain_se = -slope * self.window, slope_se * self.window
        reasons = []
        if moving.any():
            known = drifts[moving][np.isfinite(drifts[moving])]
            drift = (
                (
                    f", drift up to {float(known.max()):.3g} of its unit per {self.window} steps >= "
                    f"{self.drift_tolerance}"
                )
                if known.size
                else ""
            )
            reasons.append(
                f"{int(moving.sum())} parameter(s) still moving (split R-hat up to {rhat:.3g} >= "
                f"{self.rhat_threshold}{drift})"
            )
        if gain > max(TREND_Z * gain_se, self.elbo_tolerance):
            reasons.append(f"the ELBO is still rising ({gain:.3g} +- {gain_se:.2g} nats per {self.window} steps)")
        return ConvergenceCheck(not reasons, len(losses), self.window, rhat, gain, gain_se, "; ".join(reasons))


def _slopes(iterates: np.ndarray) -> np.ndarray:
    """Least-squares slope per column of ``iterates`` ``(steps, P)``, per step."""
    t = np.arange(len(iterates), dtype=float) - (len(iterates) - 1) / 2
    return t @ (iterates - iterates.mean(axis=0)) / float(t @ t)


def has_converged(losses: Sequence[float], window: int = 100, rtol: float = 1e-4, z: float = 1.0) -> bool:
    r"""Loss-only rule: the mean loss of the last ``window`` steps improved on the window before by
    less than both ``rtol`` times the loss scale and ``z`` standard errors of the difference.
    Blind to parameters that drift without moving the loss; :class:`IterateMonitor` is the test
    ``fit_svi`` uses."""
    if len(losses) < 2 * window:
        return False
    last = np.asarray(losses[-window:], dtype=float)
    previous = np.asarray(losses[-2 * window : -window], dtype=float)
    improvement = previous.mean() - last.mean()
    noise = np.sqrt((last.var() + previous.var()) / window)
    scale = max(abs(last.mean()), 1.0)
    return bool(improvement < max(rtol * scale, z * noise))
