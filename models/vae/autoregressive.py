r"""A VAE with a strong (row-autoregressive) decoder: the classic posterior-collapse setup.

.. math::

    z_n \sim \mathcal{N}(0, I_D), \qquad
    x_{n,r} \mid x_{n,<r}, z_n \sim \mathrm{Bernoulli}\big(\sigma(g_\theta(s_{n,r}))\big),
    \qquad s_{n,r} = \mathrm{GRU}(s_{n,r-1}, [x_{n,r-1}, W z_n]),

rows :math:`r = 1..H` of ``W`` pixels each. The GRU sees every earlier row, so it can model
the images with :math:`z` ignored; trained on the plain ELBO the KL (and :math:`I_q(x; z)`)
tends to zero. Sites: ``"z"`` ``(N, D)``, ``"x"`` ``(N, 1, H, W)`` in
``pyro.plate("data", N, dim=-1)``; the guide is any amortized Gaussian, e.g.
:class:`~vilab.guides.amortized.encoders.AmortizedNormalGuide`.

References:
    Generating Sentences from a Continuous Space, Bowman et al., 2016, arXiv:1511.06349.
    Variational Lossy Autoencoder, Chen et al., 2017, arXiv:1611.02731.
"""

from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from vilab.guides.amortized.encoders import AmortizedNormalGuide, MLPEncoder
from vilab.models.vae.vae import VAE
from vilab.models.vae.priors import StandardNormalPrior

__all__ = ["RowAutoregressiveDecoder", "AutoregressiveVAEModel", "build_autoregressive_vae"]


class RowAutoregressiveDecoder(nn.Module):
    """Teacher-forced row logits ``(..., 1, H, W)`` from ``z (..., D)`` and images ``(N, 1, H, W)``.

    Args:
        latent_dim: ``D``.
        image_shape: ``(1, H, W)``.
        hidden_dim: GRU state size.
    """

    def __init__(self, latent_dim: int, image_shape: Sequence[int], hidden_dim: int = 256):
        super().__init__()
        if len(image_shape) != 3 or image_shape[0] != 1:
            raise ValueError(f"image_shape: expected (1, H, W); got {tuple(image_shape)}")
        self.latent_dim, self.image_shape = latent_dim, tuple(image_shape)
        width = image_shape[2]
        self.lift = nn.Linear(latent_dim, hidden_dim)
        self.rnn = nn.GRU(width + hidden_dim, hidden_dim, batch_first=True)
        self.out = nn.Linear(hidden_dim, width)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        batch_shape = z.shape[:-1]
        rows = x[..., 0, :, :].expand(*batch_shape, *self.image_shape[1:])
        rows = rows.reshape(-1, *self.image_shape[1:])
        previous = torch.cat([torch.zeros_like(rows[:, :1]), rows[:, :-1]], 1)
        code = self.lift(z.reshape(-1, self.latent_dim))
        inputs = torch.cat([previous, code.unsqueeze(1).expand(-1, rows.shape[1], -1)], -1)
        states, _ = self.rnn(inputs, torch.tanh(code).unsqueeze(0).contiguous())
        return self.out(states).reshape(*batch_shape, *self.image_shape)

    @torch.no_grad()
    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``(N, 1, H, W)`` drawn row by row at ``z`` ``(N, D)``."""
        code = self.lift(z)
        state = torch.tanh(code).unsqueeze(0).contiguous()
        row = z.new_zeros(z.shape[0], 1, self.image_shape[2])
        rows = []
        for _ in range(self.image_shape[1]):
            output, state = self.rnn(torch.cat([row, code.unsqueeze(1)], -1), state)
            row = torch.bernoulli(torch.sigmoid(self.out(output)))
            rows.append(row)
        return torch.cat(rows, 1).unsqueeze(1)


class AutoregressiveVAEModel(nn.Module):
    """``model(x)`` of the module docstring (observed images only: sampling uses
    :meth:`RowAutoregressiveDecoder.sample`)."""

    def __init__(self, decoder: RowAutoregressiveDecoder):
        super().__init__()
        self.decoder, self.latent_dim = decoder, decoder.latent_dim
        self.image_shape, self.num_levels = decoder.image_shape, 2
        self.prior = StandardNormalPrior(decoder.latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"x: expected images of shape (N, {', '.join(map(str, self.image_shape))}); got {tuple(x.shape)}"
            )
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", self.prior())
            logits = self.decoder(z, x)
            return pyro.sample("x", dist.Bernoulli(logits=logits).to_event(3), obs=x)


def build_autoregressive_vae(
    image_shape: Sequence[int],
    latent_dim: int = 16,
    *,
    encoder_hidden: Sequence[int] = (300, 300),
    decoder_hidden: int = 256,
) -> VAE:
    """MLP Gaussian encoder + row-GRU decoder, bundled as a :class:`~vilab.models.vae.vae.VAE`."""
    encoder = MLPEncoder(image_shape, latent_dim, hidden_dims=encoder_hidden)
    model = AutoregressiveVAEModel(RowAutoregressiveDecoder(latent_dim, image_shape, decoder_hidden))
    return VAE(model, AmortizedNormalGuide(encoder))
