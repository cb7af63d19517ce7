r"""Two stochastic layers in one latent site: the distribution and the amortized guide.

A two-level VAE has latents :math:`z_2` (top) and :math:`z_1` (bottom). Both the prior and the
guide factorise top-down,

.. math::

    p(z_1, z_2) = p(z_2)\, p_\theta(z_1 \mid z_2), \qquad
    q(z_1, z_2 \mid x) = q_\phi(z_2 \mid x)\, q_\phi(z_1 \mid x, z_2),

with diagonal Gaussian conditionals. Here the pair is one site ``"z"`` holding
:math:`[z_1, z_2]` (event shape ``(D_1 + D_2,)``). Every tool built for one latent site then
works unchanged: the ELBO split, importance sampling, active units, mutual information and the
plots. :class:`TwoLevelLatent` is that joint distribution; :class:`HierarchicalNormalGuide` is
the guide.

References:
    VAE with a VampPrior, Tomczak & Welling, 2018, arXiv:1705.07120 (the two-level HVAE).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch import nn
from torch.distributions import constraints
from torch.nn import functional as F

from vilab.guides.amortized.encoders import _GaussianHead, _check_images, _empirical_quantiles, hidden_stack

__all__ = ["TwoLevelLatent", "ConditionalGaussian", "HierarchicalNormalGuide"]

Conditional = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class TwoLevelLatent(TorchDistribution):
    r"""The joint :math:`p(z_1, z_2) = p(z_2)\, \mathcal N(z_1; \mu(z_2), \operatorname{diag}
    \sigma(z_2)^2)` over ``value = [z_1, z_2]``.

    .. math:: \log p([z_1, z_2]) = \log p(z_2) + \sum_d \log \mathcal N(z_{1d}; \mu_d(z_2),
        \sigma_d(z_2)^2)

    Sampling draws :math:`z_2` first, so with the same seed a two-level model draws the same
    :math:`z_2` as a one-level model draws :math:`z`. It is reparameterized when ``top`` is.

    Args:
        top: Distribution of :math:`z_2`, event shape ``(D_2,)``.
        conditional: ``z2 (..., D_2) -> (loc, scale)``, each ``(..., D_1)``. It must broadcast
            over leading dimensions (importance samples, other datapoints).
        lower_dim: ``D_1``.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(
        self, top: TorchDistribution, conditional: Conditional, lower_dim: int, validate_args: Optional[bool] = None
    ):
        if top.event_shape.numel() < 1 or len(top.event_shape) != 1:
            raise ValueError(f"top: expected a distribution with event shape (D2,); got {tuple(top.event_shape)}")
        self.top, self.conditional, self.lower_dim = top, conditional, int(lower_dim)
        self._cache: Optional[tuple] = None
        event = (self.lower_dim + top.event_shape[0],)
        super().__init__(top.batch_shape, torch.Size(event), validate_args=False)

    @property
    def has_rsample(self) -> bool:
        return self.top.has_rsample

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(TwoLevelLatent, _instance)
        new.top = self.top.expand(batch_shape)
        new.conditional, new.lower_dim, new._cache = self.conditional, self.lower_dim, None
        super(TwoLevelLatent, new).__init__(new.top.batch_shape, self.event_shape, validate_args=False)
        return new

    def split(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[z_1, z_2]`` -> ``(z_1, z_2)``."""
        return value[..., : self.lower_dim], value[..., self.lower_dim :]

    def _draw(self, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loc, scale = self.conditional(z2)
        noise = torch.randn(loc.shape, dtype=loc.dtype, device=loc.device)
        value = torch.cat([loc + scale * noise, z2.expand(*loc.shape[:-1], z2.shape[-1])], -1)
        return value, loc, scale

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        value, loc, scale = self._draw(self.top.rsample(sample_shape))
        # Scoring the guide's own draw (as a Pyro trace does) reuses the conditional. Only
        # reparameterized draws are cached: a cached no-grad draw would hide the gradient
        # of a later log_prob.
        self._cache = (value, loc, scale)
        return value

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self._draw(self.top.sample(sample_shape))[0]

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.split(value)
        if self._cache is not None and value is self._cache[0]:
            loc, scale = self._cache[1:]
        else:
            loc, scale = self.conditional(z2)
        lower = dist.Normal(loc, scale).log_prob(z1).sum(-1)
        return self.top.log_prob(z2) + lower


class ConditionalGaussian(nn.Module):
    r"""A diagonal Gaussian over ``output_dim`` numbers given ``z`` and an optional context:
    :math:`(\mu, \sigma) = \mathrm{head}(\mathrm{MLP}(W z + V c + b))`.

    The first layer acts on :math:`[z, c]`; it is split into :math:`W z + V c` so a context
    shared by many ``z`` (an image and its importance samples) goes through :math:`V` once.

    Args:
        input_dim: Size of ``z``.
        output_dim: Size of the Gaussian.
        hidden_dims: Hidden widths (at least one).
        context_dim: Size of the context, 0 for none.
        hidden_layer: ``"elu"`` or ``"gated"`` (see :func:`~vilab.guides.amortized.encoders.hidden_stack`).
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        *,
        hidden_dims: Sequence[int] = (300, 300),
        context_dim: int = 0,
        hidden_layer: str = "gated",
    ):
        super().__init__()
        if not hidden_dims:
            raise ValueError("hidden_dims: expected at least one hidden width; got none")
        if min(input_dim, output_dim) < 1 or context_dim < 0:
            raise ValueError(
                f"input_dim, output_dim, context_dim: expected positive sizes (context "
                f"may be 0); got {input_dim}, {output_dim}, {context_dim}"
            )
        first = int(hidden_dims[0])
        self.gated = hidden_layer == "gated"
        width = 2 * first if self.gated else first
        self.input_layer = nn.Linear(input_dim, width)
        self.context_layer = nn.Linear(context_dim, width, bias=False) if context_dim else None
        layers, last = hidden_stack(first, hidden_dims[1:], hidden_layer)
        self.body = nn.Sequential(*layers)
        self.head = _GaussianHead(last, output_dim)
        self.input_dim, self.output_dim, self.context_dim = input_dim, output_dim, context_dim

    def project_context(self, context: torch.Tensor) -> torch.Tensor:
        """:math:`V c` for a context ``(..., context_dim)``; pass it to :meth:`forward`."""
        if self.context_layer is None:
            raise ValueError("context: this conditional was built with context_dim=0")
        return self.context_layer(context)

    def forward(
        self, z: torch.Tensor, projected_context: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)``, each ``(..., output_dim)``; ``projected_context`` broadcasts."""
        pre = self.input_layer(z)
        if projected_context is not None:
            pre = pre + projected_context
        if self.gated:
            value, gate = pre.chunk(2, dim=-1)
            hidden = value * torch.sigmoid(gate)
        else:
            hidden = F.elu(pre)
        return self.head(self.body(hidden))

    @torch.no_grad()
    def start_as_standard_normal(self) -> None:
        r"""Make the output :math:`\mathcal N(0, I)` whatever the input (zero head weights and
        a scale bias with softplus(b) + floor = 1), for a function-preserving warm start."""
        for layer in (self.head.loc, self.head.scale):
            layer.weight.zero_()
        self.head.loc.bias.zero_()
        floor = 1e-4  # the head's scale floor
        self.head.scale.bias.fill_(math.log(math.expm1(1.0 - floor)))


class HierarchicalNormalGuide(nn.Module):
    r"""Amortized two-level guide :math:`q(z_2 \mid x)\, q(z_1 \mid x, z_2)`, sampling site
    ``"z"`` = :math:`[z_1, z_2]` of shape ``(batch, D_1 + D_2)`` inside
    ``pyro.plate("data", batch, dim=-1)``.

    :math:`q(z_2 \mid x)` is the ``encoder`` (shared with a VampPrior over :math:`z_2`);
    :math:`q(z_1 \mid x, z_2)` is a :class:`ConditionalGaussian` on :math:`z_2` with the
    flattened image as context, as in Tomczak & Welling's HVAE.

    Args:
        encoder: Module with ``forward(x) -> (loc, scale)``, ``image_shape``, ``latent_dim``
            (``D_2``) and ``input_scale``.
        lower: :class:`ConditionalGaussian` with ``input_dim = D_2`` and ``context_dim =
            C H W``; its ``output_dim`` is ``D_1``.
        name: Prefix for ``pyro.module`` when ``register=True``.
        register: Register parameters in Pyro's param store (for ``pyro.infer.SVI``).
    """

    def __init__(
        self, encoder: nn.Module, lower: ConditionalGaussian, *, name: str = "vae_guide", register: bool = False
    ):
        super().__init__()
        pixels = math.prod(encoder.image_shape)
        if lower.input_dim != encoder.latent_dim or lower.context_dim != pixels:
            raise ValueError(
                f"lower: expected input_dim={encoder.latent_dim} (the encoder's "
                f"latent) and context_dim={pixels} (pixels); got "
                f"{lower.input_dim} and {lower.context_dim}"
            )
        self.encoder, self.lower = encoder, lower
        self.lower_dim, self.top_dim = lower.output_dim, encoder.latent_dim
        self.latent_dim = self.lower_dim + self.top_dim
        self.name, self.register = name, register

    def distribution(self, x: torch.Tensor) -> TwoLevelLatent:
        r""":math:`q(z_1, z_2 \mid x)`: batch shape ``(batch,)``, event shape ``(D_1 + D_2,)``."""
        _check_images(x, self.encoder.image_shape, "the guide")
        loc, scale = self.encoder(x)
        pixels = x.flatten(-3) / getattr(self.encoder, "input_scale", 1.0)
        context = self.lower.project_context(pixels)
        return TwoLevelLatent(dist.Normal(loc, scale).to_event(1), lambda z2: self.lower(z2, context), self.lower_dim)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Sample :math:`[z_1, z_2] \\sim q(\\cdot \\mid x)` at site ``"z"``; extra arguments are ignored."""
        if self.register:
            pyro.module(self.name, self)
        with pyro.plate("data", x.shape[0], dim=-1):
            return pyro.sample("z", self.distribution(x))

    @torch.no_grad()
    def mean(self, x: torch.Tensor, *, num_samples: int = 256) -> torch.Tensor:
        r""":math:`\mathbb{E}_q[z]`, ``(batch, D_1 + D_2)``: exact for :math:`z_2`, Monte Carlo
        over :math:`z_2` for :math:`\mathbb{E}[z_1] = \mathbb{E}_{z_2}[\mu(x, z_2)]`."""
        q = self.distribution(x)
        z2 = q.top.sample((num_samples,))
        loc, _ = q.conditional(z2)
        return torch.cat([loc.mean(0), q.top.base_dist.loc], -1)

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | torch.Tensor, x: torch.Tensor, *, num_samples: int = 1000
    ) -> dict[str, torch.Tensor]:
        r"""Per-datapoint marginal quantiles of each coordinate, ``{"z": (Q, batch, D_1 + D_2)}``.

        :math:`z_1`'s marginal is a continuous mixture, so these are empirical quantiles of
        ``num_samples`` draws (CDF error about :math:`\sqrt{p(1-p)/n}`), Pyro autoguide style.
        """
        return _empirical_quantiles(self.distribution(x), quantiles, num_samples)

    def median(self, x: torch.Tensor, *, num_samples: int = 1000) -> dict[str, torch.Tensor]:
        """Per-datapoint marginal medians ``{"z": (batch, D_1 + D_2)}`` (Monte Carlo)."""
        return {"z": self.quantiles([0.5], x, num_samples=num_samples)["z"][0]}

    def log_density(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        r""":math:`\log q(z_1, z_2 \mid x)` at any ``z`` broadcastable to ``(..., batch, D_1 + D_2)``."""
        return self.distribution(x).log_prob(z)

    def kl_per_dimension(self, x: torch.Tensor, prior) -> None:
        """``None``: the KL of a two-level latent does not split over dimensions."""
        return None
