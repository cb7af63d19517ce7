"""A zoo of user models, ported as their sources write them, with reference posteriors.

``ZOO`` lists :class:`ZooEntry` records. An entry builds its model and data (``inputs``), names
the statistics it checks (``statistics``: draws -> statistic -> 1-D array, label-invariant for
mixtures and networks) and its reference: ``closed_form`` moments, or long NUTS draws of the
NumPyro twin in ``tests/data/zoo/<name>.json.gz`` (written by ``benchmarks/zoo_references.py``).
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .registry import ENTRIES

__all__ = ["ZooEntry", "ZOO", "REFERENCE_DIR", "load_reference", "flat_statistics", "by_name"]

REFERENCE_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "data", "zoo"))


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo.

    Attributes:
        name: identifier (test id, reference file name).
        source: where the model is written (title and address).
        kind: family, for the table (glm, hierarchical, gp, discrete, timeseries, network).
        features: what the model exercises (``PyroModule``, ``obs_mask``, ``beta[g]``...).
        data: ``data.py`` function returning the data as NumPy arrays.
        inputs: data dict -> (model, args, kwargs) with torch tensors in the default dtype.
        sites: latent sites whose draws the reference stores and ``compare`` scores.
        statistics: site draws (``(n, *shape)`` arrays) -> statistic -> ``(n,)`` array.
        closed_form: data dict -> statistic -> (mean, sd), for conjugate models.
        closed_draws: (data dict, n, rng) -> site -> exact draws, for ``compare``.
        fast: in the default (fast) suite.
        note: how the data or the port differ from the source, if at all.
        options: expectations beyond the default: ``nuts_refusal`` (a regex the ``ValueError``
            of ``run_nuts`` must match: NUTS cannot be right on the model) and ``svi_refusal``
            (the same for ``fit_svi`` and ``compare``), ``compare_refusal`` (``compare`` only)
            and ``fold`` (``modes.py``: a model whose modes are not mirror images).
    """

    name: str
    source: str
    kind: str
    features: tuple
    data: Callable[[], dict]
    inputs: Callable[[dict], tuple]
    sites: tuple
    statistics: Optional[Callable[[dict], dict]] = None
    closed_form: Optional[Callable[[dict], dict]] = None
    closed_draws: Optional[Callable[..., dict]] = None
    fast: bool = False
    note: str = ""
    options: dict = field(default_factory=dict)

    def stats(self, draws: dict) -> dict:
        """Statistic -> 1-D array, from site -> ``(n, *shape)`` draws."""
        if self.statistics is not None:
            return self.statistics(draws)
        return flat_statistics({k: draws[k] for k in self.sites})


def flat_statistics(draws: dict) -> dict:
    """Site -> ``(n, *shape)`` arrays to flat, 1-based names (``beta[1]``, ``L[2,1]``) -> ``(n,)``."""
    flat = {}
    for name, value in draws.items():
        value = np.asarray(value, dtype=float)
        if value.ndim == 1:
            flat[name] = value
            continue
        for index in np.ndindex(*value.shape[1:]):
            flat[f"{name}[{','.join(str(i + 1) for i in index)}]"] = value[(slice(None),) + index]
    return flat


def load_reference(entry: ZooEntry) -> dict:
    """The entry's reference: ``{"summary": {stat: {mean, sd, ess}}, "draws": {site: array}}``.

    Closed-form references have infinite ESS and exact draws (seeded) for ``compare``.
    """
    if entry.closed_form is not None:
        moments = entry.closed_form(entry.data())
        summary = {k: {"mean": m, "sd": s, "ess": float("inf"), "rhat": 1.0} for k, (m, s) in moments.items()}
        draws = entry.closed_draws(entry.data(), 4000, np.random.default_rng(0))
        return {"summary": summary, "draws": draws, "kind": "closed form"}
    path = os.path.join(REFERENCE_DIR, f"{entry.name}.json.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no reference for {entry.name!r} at {path}; run benchmarks/zoo_references.py")
    with gzip.open(path, "rt") as handle:
        stored = json.load(handle)
    stored["draws"] = {k: np.asarray(v) for k, v in stored["draws"].items()}
    stored["kind"] = "NumPyro NUTS"
    return stored


ZOO = [ZooEntry(**entry) for entry in ENTRIES]


def by_name(name: str) -> ZooEntry:
    return next(entry for entry in ZOO if entry.name == name)
