r"""Pyro's NUTS with per-draw statistics recorded for ArviZ.

Pyro's kernel keeps only divergence indices; ArviZ's E-BFMI, energy and tree-depth plots need
per-draw ``energy``, ``tree_depth``, ``n_steps``, ``step_size``, ``acceptance_rate`` and
``diverging``. This subclass reads them through the kernel's own hooks, without changing its
transitions. ``energy`` is the Hamiltonian at the start of each transition, after the momentum
refresh; NUTS conserves it along the trajectory up to integration error, so it plays the part
of Stan's ``energy__`` in the E-BFMI.
"""

from __future__ import annotations

import math

from pyro.infer.mcmc import NUTS

__all__ = ["RecordingNUTS", "stats_dtype"]


class RecordingNUTS(NUTS):
    """``pyro.infer.mcmc.NUTS`` that records the statistics of its last transition in ``last_stats``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_stats: dict[str, float] = {}
        self._kinetic = 0.0
        self._leapfrogs = 0
        self._accept_sum = 0.0
        self._diverging = False

    def _sample_r(self, name):
        r, r_unscaled = super()._sample_r(name)
        self._kinetic = float(self._kinetic_energy(r_unscaled))
        return r, r_unscaled

    def _build_basetree(self, *args, **kwargs):
        tree = super()._build_basetree(*args, **kwargs)
        self._leapfrogs += 1
        self._accept_sum += float(tree.sum_accept_probs)
        self._diverging = self._diverging or bool(tree.diverging)
        return tree

    def sample(self, params):
        self._leapfrogs, self._accept_sum, self._diverging = 0, 0.0, False
        _, potential, _ = self._fetch_from_cache()
        step_size = float(self.step_size)
        z = super().sample(params)
        _, new_potential, _ = self._fetch_from_cache()
        if potential is None:  # the cache was cleared (first step after setup)
            potential = new_potential
        steps = max(self._leapfrogs, 1)
        self.last_stats = {
            "energy": float(potential) + self._kinetic if potential is not None else math.nan,
            "lp": -float(new_potential) if new_potential is not None else math.nan,
            "n_steps": self._leapfrogs,
            "tree_depth": math.ceil(math.log2(self._leapfrogs + 1)),
            "step_size": step_size,
            "acceptance_rate": self._accept_sum / steps,
            "diverging": self._diverging,
        }
        return z


def stats_dtype(name: str):
    """numpy dtype of a recorded statistic."""
    return {"diverging": bool, "n_steps": int, "tree_depth": int}.get(name, float)
