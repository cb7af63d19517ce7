"""Checks shared by the zoo's tests and its table script: statistics of vilab's draws and their
distance from the reference in Monte Carlo standard errors."""

from __future__ import annotations

import arviz as az
import numpy as np
from scipy import stats as scipy_stats

__all__ = ["tensor_draws", "z_threshold", "nuts_z_scores", "weighted_z_scores", "FAILURE_BUDGET"]

# Chance that a correct sampler fails one model's check: split over its statistics (Bonferroni).
FAILURE_BUDGET = 1e-3


def tensor_draws(samples: dict, batch_dims: int) -> dict:
    """Site -> ``(n, *shape)`` NumPy arrays from vilab's samples with ``batch_dims`` leading dims."""
    out = {}
    for name, value in samples.items():
        array = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value, dtype=float)
        out[name] = array.reshape((-1,) + array.shape[batch_dims:])
    return out


def z_threshold(num_statistics: int, budget: float = FAILURE_BUDGET) -> float:
    """Two-sided normal quantile for ``budget`` shared by ``num_statistics`` checks."""
    return float(scipy_stats.norm.isf(budget / (2 * max(num_statistics, 1))))


def nuts_z_scores(entry, samples: dict, reference: dict, weights=None) -> dict:
    """Per reference statistic: (vilab mean - reference mean) / combined Monte Carlo error.

    ``samples`` are vilab's NUTS samples, site -> ``(chain, draw, *shape)``. The error combines
    vilab's ``sd / sqrt(ESS)`` (bulk ESS over chains) with the reference's. ``weights`` (one per
    draw, chain-major, summing to 1; see ``modes.py``) give weighted means and sds, the ESS scaled
    by Kish's efficiency of the weights.
    """
    num_chains, num_draws = next(iter(samples.values())).shape[:2]
    statistics = entry.stats(tensor_draws(samples, 2))
    kish = 1.0 if weights is None else 1.0 / np.sum(weights**2) / weights.size
    scores = {}
    for name, ref in reference["summary"].items():
        values = np.asarray(statistics[name], dtype=float).reshape(num_chains, num_draws)
        ess = max(float(az.ess(values)) * kish, 1.0) if np.ptp(values) > 0 else 1.0
        mean, var = values.mean(), values.var(ddof=1)
        if weights is not None:
            mean = float(np.sum(weights * values.ravel()))
            var = float(np.sum(weights * (values.ravel() - mean) ** 2))
        error = np.sqrt(var / ess + ref["sd"] ** 2 / ref["ess"])
        scores[name] = float((mean - ref["mean"]) / max(error, 1e-12 * max(ref["sd"], 1e-300)))
    return scores


def weighted_z_scores(entry, draws: dict, log_weights: np.ndarray, psis_ess: float, reference: dict) -> dict:
    """PSIS-reweighted guide means against the reference, in combined Monte Carlo errors."""
    statistics = entry.stats(tensor_draws(draws, 1))
    weights = np.exp(log_weights - np.logaddexp.reduce(log_weights))
    scores = {}
    for name, ref in reference["summary"].items():
        values = np.asarray(statistics[name], dtype=float)
        mean = float(np.sum(weights * values))
        sd = float(np.sqrt(max(np.sum(weights * (values - mean) ** 2), 0.0)))
        error = np.sqrt(sd**2 / max(psis_ess, 1.0) + ref["sd"] ** 2 / ref["ess"])
        scores[name] = float((mean - ref["mean"]) / max(error, 1e-300))
    return scores
