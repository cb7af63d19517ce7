"""When has a noisy SVI loss stopped improving?"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["has_converged"]


def has_converged(losses: Sequence[float], window: int = 100, rtol: float = 1e-4, z: float = 1.0) -> bool:
    r"""Compare the mean loss of the last two windows of ``window`` steps.

    Converged when the improvement :math:`\bar L_{prev} - \bar L_{last}` is below both
    ``rtol`` times the loss scale and ``z`` standard errors of the difference: the optimiser is no
    longer moving the loss by more than its own Monte Carlo noise.
    """
    if len(losses) < 2 * window:
        return False
    last = np.asarray(losses[-window:], dtype=float)
    previous = np.asarray(losses[-2 * window:-window], dtype=float)
    improvement = previous.mean() - last.mean()
    noise = np.sqrt((last.var() + previous.var()) / window)
    scale = max(abs(last.mean()), 1.0)
    return bool(improvement < max(rtol * scale, z * noise))
