r"""The two-level VAE's prior :math:`p(z_2)\, p_\theta(z_1 \mid z_2)`, and a warm start from a
one-level VAE.

Generative model (Tomczak & Welling's HVAE):

.. math::

    z_2 \sim p(z_2), \qquad z_1 \mid z_2 \sim \mathcal N(\mu_\theta(z_2),
    \operatorname{diag}\sigma_\theta(z_2)^2), \qquad x \mid z_1, z_2 \sim p_\theta(x \mid z_1, z_2),

where :math:`p(z_2)` is :math:`\mathcal N(0, I)` or a VampPrior over the guide's
:math:`q(z_2 \mid x)`. The pair is one site ``"z"`` = :math:`[z_1, z_2]` (see
:mod:`vilab.guides.amortized.hierarchical`); the decoder is any decoder of ``D_1 + D_2`` numbers.
:func:`build_vae` builds it from ``VAEConfig(latent_levels=2)``.

References:
    VAE with a VampPrior, Tomczak & Welling, 2018, arXiv:1705.07120.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from vilab.guides.amortized.hierarchical import ConditionalGaussian, HierarchicalNormalGuide, TwoLevelLatent

__all__ = ["HierarchicalPrior", "embed_one_level"]


class HierarchicalPrior(nn.Module):
    r""":math:`p(z_1, z_2) = p(z_2)\, p_\theta(z_1 \mid z_2)` as a :class:`TwoLevelLatent`.

    Args:
        top: Module whose ``forward()`` returns :math:`p(z_2)` (event shape ``(D_2,)``), e.g.
            :class:`~vilab.models.vae.priors.VampPrior`.
        conditional: :class:`~vilab.guides.amortized.hierarchical.ConditionalGaussian` from
            :math:`z_2` (no context) to :math:`z_1`.
    """

    def __init__(self, top: nn.Module, conditional: ConditionalGaussian):
        super().__init__()
        if conditional.input_dim != top.latent_dim or conditional.context_dim:
            raise ValueError(
                f"conditional: expected input_dim={top.latent_dim} (the top prior's "
                f"size) and no context; got input_dim={conditional.input_dim}, "
                f"context_dim={conditional.context_dim}"
            )
        self.top, self.conditional = top, conditional
        self.lower_dim, self.top_dim = conditional.output_dim, top.latent_dim
        self.latent_dim = self.lower_dim + self.top_dim

    def forward(self) -> TwoLevelLatent:
        return TwoLevelLatent(self.top(), self.conditional, self.lower_dim)


def _target_key(key: str) -> str:
    # The one-level prior's tensors live under the two-level prior's top.
    return key.replace("model.prior.", "model.prior.top.", 1) if key.startswith("model.prior.") else key


def _fitted(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], lower: int):
    """``(two-level key, one-level tensor)`` pairs; ``ValueError`` for one that does not fit."""
    for key, value in state.items():
        target = _target_key(key)
        if target not in own:
            if key.startswith("model.prior."):  # a saved N(0, I)'s buffers
                continue
            raise ValueError(f"state: {key!r} has no counterpart in the two-level model")
        mine = own[target]
        widened = (
            key.startswith("model.decoder.")
            and value.dim() == 2
            and mine.dim() == 2
            and mine.shape[0] == value.shape[0]
            and mine.shape[1] == value.shape[1] + lower
        )
        if mine.shape != value.shape and not widened:
            raise ValueError(
                f"state: {key!r} has shape {tuple(value.shape)}; the two-level "
                f"model's {target!r} has {tuple(mine.shape)}"
            )
        yield target, value


@torch.no_grad()
def embed_one_level(vae: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    r"""Start a two-level VAE as a trained one-level VAE with an unused :math:`z_1`.

    The one-level :math:`z` becomes :math:`z_2`: its encoder, prior and decoder weights are
    copied, and the decoder's first layer gets zero weights on :math:`z_1`.
    :math:`p(z_1 \mid z_2)` and :math:`q(z_1 \mid x, z_2)` both start as
    :math:`\mathcal N(0, I)`, so their log densities cancel in every importance weight and
    each bound equals the one-level model's (with the same seed, the same :math:`z_2` draws).
    Training then finds a use for :math:`z_1`; the zero weights are a saddle that the
    gradient noise leaves.

    Args:
        vae: A two-level :class:`~vilab.models.vae.vae.VAE` (``latent_levels=2``) whose top level
            has the one-level model's latent size.
        state: The one-level model's state dict (e.g. from its ``model.safetensors``).

    Returns:
        The two-level model's keys that the one-level state did not set.

    Raises:
        ValueError: if ``vae`` is not two-level, or a tensor does not fit.
    """
    guide, prior = vae.guide, vae.model.prior
    if not isinstance(guide, HierarchicalNormalGuide) or not isinstance(prior, HierarchicalPrior):
        raise ValueError(
            "vae: expected a two-level VAE (VAEConfig(latent_levels=2)); got "
            f"guide {type(guide).__name__} and prior {type(prior).__name__}"
        )
    own = vae.state_dict()
    lower = prior.lower_dim
    # Every tensor is checked before any is copied, so a state that does not fit leaves the
    # model as it was.
    plan = dict(_fitted(own, state, lower))
    for target, value in plan.items():
        mine = own[target]
        if mine.shape == value.shape:
            mine.copy_(value)
        else:
            mine.zero_()
            mine[:, lower:] = value  # columns of [z1, z2]: z2 last
    guide.lower.start_as_standard_normal()
    prior.conditional.start_as_standard_normal()
    return sorted(set(own) - set(plan))
