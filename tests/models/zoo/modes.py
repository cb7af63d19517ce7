r"""Models whose posterior modes are not mirror images: the reference and the NUTS check start
every chain in one mode and weight its draws so that they stand for the whole posterior.

Pyro's HMM (``model_1``) starts its chain from state 0, so the two labellings of its states are
not equivalent: the labelling decides which state's transition row draws the first step. Let
:math:`\sigma` swap the labels, :math:`A` the draws whose state 0 plays the first tone most and
:math:`B = \sigma(A)`. The prior is symmetric, so the posterior at :math:`\sigma\theta` is
:math:`p(\theta \mid y)\, r(\theta)` with :math:`r(\theta) = p(y \mid \sigma\theta) / p(y \mid \theta)`,
and a statistic :math:`f` with :math:`f(\sigma\theta) = f(\theta)` has posterior mean
:math:`E_A[f\,(1 + r)] / E_A[1 + r]`. NUTS chains do not cross between the modes; started in
:math:`A` they give :math:`E_A`, and the weights :math:`1 + r` give the rest.
"""

from __future__ import annotations

import numpy as np

__all__ = ["hmm_log_likelihood", "HMM_FOLD", "fold_weights"]


def hmm_log_likelihood(probs_x, probs_y, sequences, lengths) -> np.ndarray:
    """Log p(sequences | probs_x, probs_y) per draw, the forward pass of ``hmm_model_1`` (the
    chain starts from state 0).

    Args:
        probs_x: ``(n, H, H)`` transition rows.
        probs_y: ``(n, H, D)`` Bernoulli emission probabilities.
        sequences: ``(S, T, D)`` binary tones.
        lengths: ``S`` sequence lengths.

    Returns:
        ``(n,)`` log likelihoods.
    """
    log_x, log_y, log_not_y = np.log(probs_x), np.log(probs_y), np.log1p(-probs_y)
    total = np.zeros(len(probs_x))
    for sequence, length in zip(sequences, lengths):
        tones = sequence[: int(length)]
        emission = np.einsum("td,nhd->tnh", tones, log_y) + np.einsum("td,nhd->tnh", 1 - tones, log_not_y)
        alpha = log_x[:, 0] + emission[0]
        for t in range(1, int(length)):
            alpha = np.logaddexp.reduce(alpha[:, :, None] + log_x, axis=1) + emission[t]
        total = total + np.logaddexp.reduce(alpha, axis=-1)
    return total


def _hmm_log_weights(draws: dict, data: dict) -> np.ndarray:
    """``log(1 + r)`` per draw of mode A."""
    probs_x, probs_y = np.asarray(draws["probs_x"]), np.asarray(draws["probs_y"])
    mine = hmm_log_likelihood(probs_x, probs_y, data["sequences"], data["lengths"])
    swapped = hmm_log_likelihood(probs_x[:, ::-1, ::-1], probs_y[:, ::-1], data["sequences"], data["lengths"])
    return np.logaddexp(0.0, swapped - mine)


def _hmm_in_mode(draws: dict) -> np.ndarray:
    probs_y = np.asarray(draws["probs_y"])
    return probs_y[:, 0, 0] > probs_y[:, 1, 0]


HMM_FOLD = {
    "log_weights": _hmm_log_weights,
    "in_mode": _hmm_in_mode,
    # a start inside mode A (state 0 plays the first two tones, as the simulated data's start state)
    "init_values": {
        "probs_x": np.array([[0.9, 0.1], [0.2, 0.8]]),
        "probs_y": np.array([[0.8, 0.8, 0.15, 0.2], [0.05, 0.25, 0.6, 0.85]]),
    },
}


def fold_weights(fold: dict, draws: dict, data: dict):
    """Normalised weights of mode-A ``draws`` (site -> ``(n, *shape)``), the fraction of draws
    inside mode A, and the mass of mode A, ``1 / (1 + E_A[r])``."""
    log_weights = fold["log_weights"](draws, data)
    weights = np.exp(log_weights - log_weights.max())
    ratio = float(np.mean(np.expm1(log_weights)))
    return weights / weights.sum(), float(np.mean(fold["in_mode"](draws))), 1.0 / (1.0 + ratio)
