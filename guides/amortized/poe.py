r"""Product-of-experts posteriors for multimodal VAEs.

Each observed modality :math:`m` has an encoder giving a Gaussian expert
:math:`\tilde q(z \mid x_m) = \mathcal{N}(\mu_m, \operatorname{diag}\sigma_m^2)`; with the
prior expert :math:`\mathcal{N}(0, I)` the joint posterior over any subset :math:`S` of the
modalities is their normalised product, again Gaussian:

.. math::

    q(z \mid x_S) \propto p(z) \prod_{m \in S} \tilde q(z \mid x_m), \qquad
    \sigma^{-2} = 1 + \sum_{m \in S} \sigma_m^{-2}, \quad
    \mu = \sigma^2 \sum_{m \in S} \mu_m \sigma_m^{-2},

so a missing modality is simply left out of the product.

References:
    Multimodal Generative Models for Scalable Weakly-Supervised Learning, Wu & Goodman, 2018,
    arXiv:1802.05335.
"""

from __future__ import annotations

from typing import Any, Optional

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["product_of_experts", "LabelEncoder", "PoEGuide"]


def product_of_experts(
    locs: list[torch.Tensor], scales: list[torch.Tensor], *, prior_expert: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Normalised product of diagonal Gaussian experts (and the :math:`\mathcal{N}(0, I)` prior).

    Args:
        locs: Expert means, each ``(..., D)``.
        scales: Expert standard deviations, each ``(..., D)``.
        prior_expert: Include the standard-normal prior expert.

    Returns:
        ``(loc, scale)`` of the product, ``(..., D)``.

    Raises:
        ValueError: with no expert at all, or mismatched list lengths.
    """
    if len(locs) != len(scales):
        raise ValueError(f"locs, scales: expected lists of equal length; got {len(locs)} and {len(scales)}")
    if not locs and not prior_expert:
        raise ValueError("locs: expected at least one expert when prior_expert=False; got none")
    precisions = [s.pow(-2) for s in scales]
    if prior_expert:
        like = locs[0] if locs else None
        if like is None:
            raise ValueError(
                "locs: the prior expert alone has no shape; pass at least one expert or build N(0, I) directly"
            )
        precisions.append(torch.ones_like(like))
        locs = list(locs) + [torch.zeros_like(like)]
    precision = torch.stack(precisions).sum(0)
    loc = torch.stack([m * p for m, p in zip(locs, precisions)]).sum(0) / precision
    return loc, precision.rsqrt()


class LabelEncoder(nn.Module):
    """Class label ``(N,)`` long -> Gaussian expert ``(loc, scale)`` each ``(N, D)``.

    Args:
        num_classes: ``K``.
        latent_dim: ``D``.
        hidden_dim: Width of the embedding and hidden layer.
    """

    def __init__(self, num_classes: int, latent_dim: int, hidden_dim: int = 64):
        super().__init__()
        self.num_classes, self.latent_dim = num_classes, latent_dim
        self.net = nn.Sequential(
            nn.Embedding(num_classes, hidden_dim),
            nn.ELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ELU(),
            nn.Linear(hidden_dim, 2 * latent_dim),
        )

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if y.dtype != torch.long or y.min() < 0 or y.max() >= self.num_classes:
            raise ValueError(
                f"y: expected long labels in 0..{self.num_classes - 1}; got dtype "
                f"{y.dtype} with values in [{y.min().item()}, {y.max().item()}]"
            )
        loc, raw = self.net(y).chunk(2, -1)
        return loc, F.softplus(raw) + 1e-4


class PoEGuide(nn.Module):
    """Guide ``guide(x=None, y=None)``: :math:`q(z \\mid \\text{observed modalities})` by PoE.

    Samples ``"z"`` ``(N, D)`` in ``pyro.plate("data", N, dim=-1)``.

    Args:
        image_encoder: ``x (N, C, H, W) -> (loc, scale)`` (e.g. ``MLPEncoder``).
        label_encoder: ``y (N,) -> (loc, scale)`` (:class:`LabelEncoder`).
    """

    def __init__(self, image_encoder: nn.Module, label_encoder: nn.Module):
        super().__init__()
        self.image_encoder, self.label_encoder = image_encoder, label_encoder
        self.latent_dim = label_encoder.latent_dim

    def distribution(
        self, x: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None
    ) -> dist.TorchDistribution:
        """The PoE posterior for the modalities given (at least one)."""
        experts = []
        if x is not None:
            experts.append(self.image_encoder(x))
        if y is not None:
            experts.append(self.label_encoder(y))
        if not experts:
            raise ValueError("x, y: expected at least one observed modality; got neither")
        loc, scale = product_of_experts([e[0] for e in experts], [e[1] for e in experts])
        return dist.Normal(loc, scale).to_event(1)

    def forward(
        self, x: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        q = self.distribution(x, y)
        with pyro.plate("data", q.batch_shape[0], dim=-1):
            return pyro.sample("z", q)
