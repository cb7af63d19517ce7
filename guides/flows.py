r"""Normalizing-flow guides over a model's whole (unconstrained) latent space.

A flow guide draws :math:`\epsilon \sim \mathcal N(0, I)`, pushes it through ``K`` learnable
bijections :math:`f_K \circ \dots \circ f_1` and finally an elementwise affine map
:math:`z = \mu + \sigma \odot u`, so that with the flows at identity it starts where the
mean-field guide starts; then

.. math:: \log q(z) = \log \mathcal N(\epsilon; 0, I) - \sum_k \log |\det J_{f_k}| - \sum_i \log \sigma_i.

Every bijection comes from :mod:`pyro.distributions.transforms`.

References:
    Rezende & Mohamed, "Variational Inference with Normalizing Flows", 2015, arXiv:1505.05770
    (planar, radial).
    van den Berg et al., "Sylvester Normalizing Flows for Variational Inference", 2018,
    arXiv:1803.05649.
    Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow", 2016,
    arXiv:1606.04934.
    Durkan et al., "Neural Spline Flows", 2019, arXiv:1906.04032.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import pyro.distributions.transforms as T
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_transform import TransformModule
from pyro.infer.autoguide import AutoNormalizingFlow
from pyro.infer.autoguide.initialization import init_to_median
from torch import nn
from torch.distributions import biject_to

from vilab.types import Model

__all__ = ["ElementwiseAffine", "AutoFlow", "FLOW_LAYERS"]


class ElementwiseAffine(TransformModule):
    r"""Learnable :math:`y = \mu + \sigma \odot x` with :math:`\sigma = \mathrm{softplus}(\rho)`;
    :math:`\log|\det J| = \sum_i \log \sigma_i`.

    Args:
        loc: initial :math:`\mu`, shape ``(D,)``.
        scale: initial :math:`\sigma` (a positive float).
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, loc: torch.Tensor, scale: float = 0.1):
        super().__init__(cache_size=1)
        self.loc = nn.Parameter(loc.detach().clone())
        raw = torch.log(torch.expm1(torch.as_tensor(scale, dtype=loc.dtype)))
        self.raw_scale = nn.Parameter(raw.expand(loc.shape).clone())

    @property
    def scale(self) -> torch.Tensor:
        return nn.functional.softplus(self.raw_scale)

    def _call(self, x):
        return self.loc + self.scale * x

    def _inverse(self, y):
        return (y - self.loc) / self.scale

    def log_abs_det_jacobian(self, x, y):
        return torch.log(self.scale).sum(-1).expand(x.shape[:-1])


def _planar(dim, hidden_dims):
    return T.planar(dim)


def _radial(dim, hidden_dims):
    return T.radial(dim)


def _sylvester(dim, hidden_dims):
    return T.sylvester(dim, count_transforms=min(dim, 4))


def _iaf(dim, hidden_dims):
    return T.affine_autoregressive(dim, hidden_dims=hidden_dims or [max(8, 3 * dim)] * 2)


def _nsf(dim, hidden_dims):
    return T.spline_autoregressive(dim, hidden_dims=hidden_dims or [max(8, 3 * dim)] * 2, count_bins=8)


#: flow name -> ``(latent_dim, hidden_dims) -> TransformModule`` for one layer.
FLOW_LAYERS: dict[str, Callable[[int, Optional[Sequence[int]]], TransformModule]] = {
    "planar": _planar,
    "radial": _radial,
    "sylvester": _sylvester,
    "iaf": _iaf,
    "nsf": _nsf,
}


class AutoFlow(AutoNormalizingFlow):
    r"""A flow guide: ``num_flows`` layers of ``flow`` followed by a learnable affine map.

    Args:
        model: the Pyro model.
        flow: one of ``planar``, ``radial``, ``sylvester``, ``iaf``, ``nsf``.
        num_flows: ``K``, how many layers are stacked (autoregressive layers are interleaved
            with permutations so every coordinate is conditioned on every other).
        hidden_dims: hidden sizes of the autoregressive networks (``iaf``, ``nsf``).
        init_scale: initial :math:`\sigma` of the affine map.
        init_loc_fn: per-site initialisation of :math:`\mu` (as for Pyro's autoguides).
    """

    def __init__(
        self,
        model: Model,
        flow: str = "iaf",
        *,
        num_flows: int = 2,
        hidden_dims: Optional[Sequence[int]] = None,
        init_scale: float = 0.1,
        init_loc_fn: Callable = init_to_median,
    ):
        if flow not in FLOW_LAYERS:
            raise ValueError(f"flow: expected one of {sorted(FLOW_LAYERS)}; got {flow!r}")
        if not isinstance(num_flows, int) or num_flows < 1:
            raise ValueError(f"num_flows: expected a positive int; got {num_flows!r}")
        if init_scale <= 0:
            raise ValueError(f"init_scale: expected > 0; got {init_scale!r}")
        self.flow, self.num_flows, self.hidden_dims, self.init_scale = flow, num_flows, hidden_dims, init_scale
        super().__init__(model, self._build_transform)
        self.init_loc_fn = init_loc_fn

    def _build_transform(self, latent_dim: int) -> T.ComposeTransformModule:
        layers = []
        for k in range(self.num_flows):
            layers.append(FLOW_LAYERS[self.flow](latent_dim, self.hidden_dims))
            if self.flow in ("iaf", "nsf") and latent_dim > 1 and k < self.num_flows - 1:
                layers.append(T.Permute(torch.arange(latent_dim - 1, -1, -1)))
        with torch.no_grad():
            loc = self._init_loc()
        layers.append(ElementwiseAffine(loc, self.init_scale))
        return T.ComposeTransformModule(layers)

    def median(self, *args, **kwargs) -> dict:
        """Posterior medians per element, from 4000 guide draws (a fixed seed)."""
        return {k: v[0] for k, v in _empirical_quantiles(self, [0.5], args, kwargs).items()}

    def quantiles(self, quantiles, *args, **kwargs) -> dict:
        """Elementwise posterior quantiles from 4000 guide draws (a fixed seed); ``(Q, *site)``."""
        return _empirical_quantiles(self, quantiles, args, kwargs)


def _empirical_quantiles(guide, probs, args, kwargs, num_samples: int = 4000) -> dict:
    # Flows have no closed-form quantiles; use draws, under a forked RNG so that asking for a
    # summary never changes the caller's random stream.
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        latent = guide.get_posterior(*args, **kwargs).rsample((num_samples,))
        # Singleton dims let Pyro's unpacking broadcast the draws against plated sites.
        depth = max((len(shape) for shape in guide._unconstrained_shapes.values()), default=0)
        latent = latent.reshape((num_samples,) + (1,) * depth + latent.shape[-1:])
        probs = torch.as_tensor(probs, dtype=latent.dtype)
        values = {}
        for site, unconstrained in guide._unpack_latent(latent):
            constrained = biject_to(site["fn"].support)(unconstrained)
            constrained = constrained.reshape((num_samples,) + site["value"].shape)
            values[site["name"]] = torch.quantile(constrained, probs, dim=0)
    return values
