r"""The convergence test on a subsampled model, confirmed on the full data.

A ``pyro.plate(..., subsample_size=n)`` makes each step's loss an estimate from ``n`` of the
plate's points, scaled up: its noise can be many nats, so the loss trend of
:class:`~vilab.inference.svi.convergence.IterateMonitor` sees no rise, and the iterates'
:math:`\hat R` can pass while a scale is still drifting towards the optimum (measured: a
meanfield sd 1.8 times the posterior's, called converged). The test's verdict is therefore
confirmed by the full-data ELBO, without subsampling noise: the window's averaged guide must
not beat the average of one window earlier by more than ``z`` standard errors (or
``elbo_tolerance`` nats) of the paired difference

.. math:: \hat\Delta = \frac1S \sum_s \big[\log w_s(\bar\phi_t) - \log w_s(\bar\phi_{t-W})\big],
   \qquad \log w_s(\phi) = \log p(x, z_s) - \log q_\phi(z_s),

where both sides use the same base noise (common random numbers), so :math:`\hat\Delta`'s
error is that of the difference, not of each ELBO.
"""

from __future__ import annotations

import torch

from vilab.inference.common.model_handlers import full_plates
from vilab.inference.common.tracing import evaluate_draws
from vilab.inference.svi.convergence import TREND_Z
from vilab.inference.svi.guide_draws import draw_from_guide

__all__ = ["FullDataCheck"]

# Draws per full-data ELBO: the paired difference's standard error shrinks as 1 / sqrt(S).
NUM_DRAWS = 256


class FullDataCheck:
    """Confirms a passed convergence test on a subsampled model (see the module docstring).

    Args:
        model, guide: the model and guide being fitted (subsampled plates in either run over
            every index here).
        args, kwargs: the model's data.
        trace: one trace of the model over the full data.
        window: steps per test window.
        elbo_tolerance: a full-data ELBO gain per window below this many nats counts as flat.
        num_draws: guide draws per ELBO estimate.
        seed: the seed of the common random numbers.
    """

    def __init__(self, model, guide, args, kwargs, trace, window, *, elbo_tolerance=0.05, num_draws=NUM_DRAWS, seed=0):
        self.model, self.guide = full_plates(model), full_plates(guide)
        self.args, self.kwargs, self.trace = args, kwargs, trace
        self.window, self.elbo_tolerance, self.num_draws, self.seed = window, elbo_tolerance, num_draws, seed
        self.averages: dict[int, torch.Tensor] = {}
        self.num_evaluations = 0

    def record(self, step: int, average: torch.Tensor) -> None:
        """Keep the window's mean iterate after ``step`` steps (every test's, passed or not)."""
        self.averages[step] = average.clone()

    def reason(self, stepper, step: int, average: torch.Tensor) -> str:
        """``""`` when the full-data ELBO is flat over the last window, else why not. ``step``:
        the steps taken; ``average``: the window's mean iterate. The stepper's own parameters
        are restored before returning."""
        self.record(step, average)
        earlier = [s for s in self.averages if s <= step - self.window]
        if not earlier:
            return "on the full data: no average one window earlier to compare with yet"
        previous = self.averages[max(earlier)]
        current = stepper.flat().clone()
        try:
            before, after = (self._log_weights(stepper, flat) for flat in (previous, average))
        finally:
            _set(stepper, current)
        difference = (after - before).double()
        gain = float(difference.mean())
        error = float(difference.std() / self.num_draws**0.5)
        if gain > max(TREND_Z * error, self.elbo_tolerance):
            return f"on the full data the ELBO is still rising ({gain:.3g} +- {error:.2g} nats per {self.window} steps)"
        return ""

    def _log_weights(self, stepper, flat: torch.Tensor) -> torch.Tensor:
        _set(stepper, flat)
        self.num_evaluations += 1
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(self.seed)
            draws = draw_from_guide(self.guide, self.args, self.kwargs, self.num_draws, self.trace)
            evaluation = evaluate_draws(self.model, self.args, self.kwargs, draws.samples)
        return evaluation["log_joint"] - draws.log_q


def _set(stepper, flat: torch.Tensor) -> None:
    """Put ``flat`` in the stepper and (for a compiled step, which keeps its own copy) the guide."""
    stepper.set_flat(flat)
    write_back = getattr(stepper, "write_back", None)
    if write_back is not None:
        write_back()
