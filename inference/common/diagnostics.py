r"""Diagnostics through ArviZ: NUTS convergence checks and PSIS for variational guides.

For a guide :math:`q`, the importance ratios :math:`w_s = p(x, z_s) / q(z_s)` of its draws tell
how well it covers the posterior. Pareto-smoothed importance sampling fits a generalised Pareto
tail to the largest ratios; its shape :math:`\hat k` is the diagnostic: below 0.5 the guide is
good, up to 0.7 usable after reweighting, above 0.7 its estimates are unreliable.

References:
    Yao et al., "Yes, but Did It Work?: Evaluating Variational Inference", 2018, arXiv:1802.02538.
    Vehtari et al., "Pareto Smoothed Importance Sampling", 2015 (rev. 2024), arXiv:1507.02646.
    Vehtari et al., "Rank-normalization, folding, and localization: an improved R-hat", 2021,
    arXiv:1903.08008.
"""

from __future__ import annotations

import warnings
from typing import Mapping, NamedTuple

import arviz as az
import numpy as np

__all__ = ["PSISResult", "psis", "k_hat_verdict", "nuts_diagnostics", "weighted_moments"]


class PSISResult(NamedTuple):
    """``k_hat``; normalised smoothed log weights ``(S,)``; the weights' effective sample size."""

    k_hat: float
    log_weights: np.ndarray
    ess: float


# Relative spread of log weights below which they are equal up to float64 round-off.
ROUND_OFF = 1e-10


def psis(log_weights: np.ndarray) -> PSISResult:
    """Pareto-smooth ``log_weights`` (``(S,)``: :math:`\\log p(x,z_s) - \\log q(z_s)`).

    A guide whose draws all have the same weight (a point estimate) gets ``k_hat = nan``; one
    whose weights differ by round-off only (an exact guide: :math:`q = p(z \\mid x)`) gets
    ``k_hat = -inf`` (bounded weights), since fitting a Pareto tail to round-off is meaningless.

    Example:
        >>> import numpy as np
        >>> from vilab.inference import k_hat_verdict, psis
        >>> result = psis(np.random.default_rng(0).normal(size=2000))  # mild weights
        >>> round(result.k_hat, 2), k_hat_verdict(result.k_hat)
        (0.17, 'good')
    """
    log_weights = np.asarray(log_weights, dtype=float).reshape(-1)
    uniform = np.full(log_weights.size, -np.log(max(log_weights.size, 1)))
    if log_weights.size < 2 or np.ptp(log_weights) == 0 or not np.isfinite(log_weights).any():
        return PSISResult(float("nan"), uniform, float(log_weights.size))
    if np.isfinite(log_weights).all() and np.ptp(log_weights) < ROUND_OFF * max(1.0, np.abs(log_weights).max()):
        return PSISResult(float("-inf"), uniform, float(log_weights.size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ warns on k > 0.7; the verdict says it in words
        smoothed, k_hat = az.psislw(log_weights.copy())
    weights = np.exp(smoothed - np.logaddexp.reduce(smoothed))
    return PSISResult(float(k_hat), smoothed, float(1.0 / np.sum(weights**2)))


def k_hat_verdict(k_hat: float) -> str:
    """The reading of a Pareto :math:`\\hat k` (Yao et al. 2018 thresholds)."""
    if k_hat == -np.inf:
        return "good (equal weights: exact up to round-off)"
    if not np.isfinite(k_hat):
        return "n/a (point estimate)"
    if k_hat < 0.5:
        return "good"
    if k_hat < 0.7:
        return "ok after PSIS reweighting"
    return "unreliable: this guide's estimates cannot be trusted"


def weighted_moments(draws: Mapping[str, np.ndarray], log_weights: np.ndarray) -> dict[str, tuple[float, float]]:
    """Self-normalised importance-weighted mean and sd of each flat parameter ``(S,)``."""
    weights = np.exp(log_weights - np.logaddexp.reduce(log_weights))
    moments = {}
    for name, values in draws.items():
        values = np.asarray(values, dtype=float).reshape(-1)
        mean = float(np.sum(weights * values))
        moments[name] = (mean, float(np.sqrt(max(np.sum(weights * (values - mean) ** 2), 0.0))))
    return moments


def nuts_diagnostics(idata: az.InferenceData) -> dict[str, float]:
    """Worst-case convergence numbers: R-hat max, bulk/tail ESS min, E-BFMI min, divergences."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = az.summary(idata, kind="diagnostics")
        bfmi = az.bfmi(idata) if "energy" in idata.sample_stats else np.array([np.nan])
    diverging = idata.sample_stats["diverging"].values if "diverging" in idata.sample_stats else np.zeros(1)
    return {
        "r_hat_max": float(summary["r_hat"].max()),
        "ess_bulk_min": float(summary["ess_bulk"].min()),
        "ess_tail_min": float(summary["ess_tail"].min()),
        "mcse_mean_max": float(summary["mcse_mean"].max()),
        "bfmi_min": float(np.min(bfmi)),
        "num_divergences": int(np.sum(diverging)),
    }
