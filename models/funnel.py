r"""Neal's funnel: a scale parameter that sets the width of everything else.

References:
    Neal, R. M. "Slice sampling", Annals of Statistics, 2003.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from vilab.models.registry import ModelSpec, register_model

__all__ = ["funnel", "funnel_noncentered"]


def funnel(dim: int = 9) -> None:
    r""".. math:: v \sim \mathcal N(0, 3^2), \quad x_i \mid v \sim \mathcal N(0, e^{v}), \ i=1..d.

    The exact marginals are known: :math:`v \sim \mathcal N(0, 9)` and each :math:`x_i` is a
    normal scale mixture with mean 0. Sites: ``v`` ``()``, ``x`` ``(dim,)`` in plate ``dim``.
    """
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim: expected a positive int; got {dim!r}")
    v = pyro.sample("v", dist.Normal(torch.tensor(0.0), 3.0))
    with pyro.plate("dim", dim):
        pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2)))


def funnel_noncentered(dim: int = 9) -> None:
    r"""The same distribution via :math:`x_i = e^{v/2} z_i`, :math:`z_i \sim \mathcal N(0, 1)`."""
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim: expected a positive int; got {dim!r}")
    v = pyro.sample("v", dist.Normal(torch.tensor(0.0), 3.0))
    with pyro.plate("dim", dim):
        z = pyro.sample("z", dist.Normal(torch.tensor(0.0), 1.0))
        pyro.deterministic("x", torch.exp(v / 2) * z)


register_model(ModelSpec("funnel", lambda: (funnel, (9,), {}), "Neal's funnel (d = 9)", tags=("pathological",)))
register_model(
    ModelSpec(
        "funnel_noncentered",
        lambda: (funnel_noncentered, (9,), {}),
        "Neal's funnel, non-centred",
        tags=("pathological",),
    )
)
