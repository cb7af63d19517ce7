r"""A two-component Gaussian mixture with the assignments marginalised out."""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import OrderedTransform

from vilab.models.registry import ModelSpec, register_model

__all__ = ["gaussian_mixture", "gaussian_mixture_data"]


def gaussian_mixture(num_obs: int, x: Optional[torch.Tensor] = None) -> None:
    r""".. math:: w \sim \mathrm{Beta}(2, 2),\ \mu_{1} < \mu_2,\ \mu_k \sim \mathcal N(0, 5^2),\
        \sigma_k \sim \mathrm{LogNormal}(0, 1),\
        x_n \sim w\,\mathcal N(\mu_1, \sigma_1^2) + (1 - w)\,\mathcal N(\mu_2, \sigma_2^2).

    The locations are ordered to remove label switching. Their site has an ordered-vector
    support and a :math:`\mathcal N(0, 5^2)` density per element (added with ``pyro.factor``).

    Sites: ``weight`` ``()``, ``locs`` ``(2,)``, ``scales`` ``(2,)``, ``x`` ``(N,)`` in plate ``data``.
    """
    if x is not None and tuple(x.shape) != (num_obs,):
        raise ValueError(f"x: expected shape ({num_obs},); got {tuple(x.shape)}")
    zeros = torch.zeros(2)
    weight = pyro.sample("weight", dist.Beta(torch.tensor(2.0), torch.tensor(2.0)))
    ordered = dist.TransformedDistribution(dist.Normal(zeros, 5.0).to_event(1), OrderedTransform())
    locs = pyro.sample("locs", ordered.mask(False))
    pyro.factor("locs_prior", dist.Normal(0.0, 5.0).log_prob(locs).sum(-1))
    scales = pyro.sample("scales", dist.LogNormal(zeros, 1.0).to_event(1))
    mix = dist.Categorical(torch.stack([weight, 1 - weight], -1))
    components = dist.Normal(locs, scales)
    with pyro.plate("data", num_obs):
        pyro.sample("x", dist.MixtureSameFamily(mix, components), obs=x)


def gaussian_mixture_data(num_obs: int = 200, seed: int = 0) -> torch.Tensor:
    """Draws from 0.4 N(-2, 0.8^2) + 0.6 N(2, 1) (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    first = torch.rand(num_obs, generator=g) < 0.4
    noise = torch.randn(num_obs, generator=g)
    x = torch.where(first, -2.0 + 0.8 * noise, 2.0 + noise)
    return x.to(torch.get_default_dtype())


register_model(
    ModelSpec(
        "gaussian_mixture",
        lambda: (gaussian_mixture, (200, gaussian_mixture_data()), {}),
        "Two-component Gaussian mixture (marginalised)",
        tags=("mixture",),
    )
)
