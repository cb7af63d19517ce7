r"""Priors :math:`p(z)` for VAEs: standard normal, a learned Gaussian mixture and the VampPrior.

Each prior is an ``nn.Module`` whose ``forward()`` returns a distribution with empty batch
shape and event shape ``(D,)``; the VAE model broadcasts it over ``pyro.plate("data")``.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["StandardNormalPrior", "MixturePrior", "VampPrior", "DiagonalGaussianMixture", "PRIORS"]

PRIORS = ("standard", "mixture", "vamp")


class DiagonalGaussianMixture(dist.MixtureSameFamily):
    r"""A mixture of ``K`` diagonal Gaussians in ``D`` dimensions whose log density takes two
    matrix products instead of an ``(N, K, D)`` broadcast:

    .. math::
        \log \mathcal N(z; m_k, \operatorname{diag} s_k^2) = -\tfrac12 \big[(z \odot z)^\top s_k^{-2}
        - 2 z^\top (m_k \odot s_k^{-2}) + m_k^\top (m_k \odot s_k^{-2})\big]
        - \textstyle\sum_d \log s_{kd} - \tfrac D2 \log 2\pi.

    Scoring a VampPrior (``K = 500``) at thousands of importance samples is memory-bound
    otherwise (``Normal.log_prob`` writes ``N K D`` numbers several times). Sampling, mean and
    variance are ``MixtureSameFamily``'s.

    Args:
        logits: ``(K,)`` mixture logits.
        locs, scales: ``(K, D)`` component means and standard deviations.
    """

    def __init__(self, logits: torch.Tensor, locs: torch.Tensor, scales: torch.Tensor, validate_args=None):
        super().__init__(
            dist.Categorical(logits=logits), dist.Normal(locs, scales).to_event(1), validate_args=validate_args
        )
        self._logits, self._locs, self._scales = logits, locs, scales

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiagonalGaussianMixture, _instance)
        new._logits, new._locs, new._scales = self._logits, self._locs, self._scales
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        dim = self._locs.shape[-1]
        z = value.reshape(-1, dim)
        precision = self._scales.pow(-2)
        weighted = self._locs * precision
        quadratic = (z * z) @ precision.T - 2 * (z @ weighted.T) + (self._locs * weighted).sum(-1)
        log_norm = -self._scales.log().sum(-1) - 0.5 * dim * math.log(2 * math.pi)
        components = -0.5 * quadratic + log_norm + torch.log_softmax(self._logits, -1)
        out = torch.logsumexp(components, -1).reshape(value.shape[:-1])
        return out.expand(torch.broadcast_shapes(out.shape, self.batch_shape))


class StandardNormalPrior(nn.Module):
    r""":math:`p(z) = \mathcal{N}(0, I_D)`.

    Args:
        latent_dim: ``D``.
    """

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        # Buffers so the prior follows the module's device and dtype.
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.TorchDistribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


class MixturePrior(nn.Module):
    r"""Learned mixture of ``K`` diagonal Gaussians,
    :math:`p(z) = \sum_k \pi_k \mathcal{N}(z; m_k, \operatorname{diag} s_k^2)`.

    Args:
        latent_dim: ``D``.
        num_components: ``K``.
    """

    def __init__(self, latent_dim: int, num_components: int = 10):
        super().__init__()
        if num_components < 1:
            raise ValueError(f"num_components: expected a positive integer; got {num_components}")
        self.latent_dim, self.num_components = latent_dim, num_components
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.locs = nn.Parameter(torch.randn(num_components, latent_dim))
        # softplus(0.5413) = 1: components start with unit scale.
        self.raw_scales = nn.Parameter(torch.full((num_components, latent_dim), 0.5413))

    def forward(self) -> dist.TorchDistribution:
        return DiagonalGaussianMixture(self.logits, self.locs, F.softplus(self.raw_scales) + 1e-4)


class VampPrior(nn.Module):
    r"""Variational mixture of posteriors prior,
    :math:`p(z) = \frac1K \sum_{k=1}^K q(z \mid u_k)`, with learned pseudo-inputs :math:`u_k`.

    The pseudo-inputs live in :math:`[0, 1]` (a sigmoid of free parameters) times
    ``input_scale``, like the images the encoder sees. The encoder is *shared* with the guide
    and deliberately not registered as a sub-module here, so its weights appear once in a
    state dict.

    Args:
        encoder: Module with ``forward(x) -> (loc, scale)`` and ``image_shape``, ``latent_dim``.
        num_components: ``K`` pseudo-inputs.
        input_scale: Top grey level of the data (1 for binary images, 16 for digits).

    References:
        VAE with a VampPrior, Tomczak & Welling, 2018, arXiv:1705.07120.
    """

    def __init__(self, encoder: nn.Module, num_components: int = 500, *, input_scale: float = 1.0):
        super().__init__()
        if num_components < 1:
            raise ValueError(f"num_components: expected a positive integer; got {num_components}")
        self.__dict__["_encoder"] = encoder
        self.latent_dim, self.num_components = encoder.latent_dim, num_components
        self.input_scale = float(input_scale)
        # Small noise around grey 0.5, as in the paper's initialisation N(0, 0.01) of the
        # pseudo-input layer.
        self.raw_pseudo_inputs = nn.Parameter(0.1 * torch.randn(num_components, *encoder.image_shape))

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, *, margin: float = 0.05) -> None:
        r"""Set the pseudo-inputs to ``K`` of the given images (grey levels clipped to
        :math:`[\epsilon, 1 - \epsilon]` of ``input_scale`` so the sigmoid can reach them).

        Starting from data makes the prior a mixture of posteriors of real images at once,
        which matters when the encoder is already trained (a warm start); Tomczak & Welling
        discuss this initialisation as an alternative to random pseudo-inputs.

        Args:
            images: ``(N, C, H, W)`` with ``N >= K`` and the encoder's image shape.
            margin: :math:`\epsilon`, in ``(0, 0.5)``.
        """
        shape = tuple(self.raw_pseudo_inputs.shape[1:])
        if not isinstance(images, torch.Tensor) or tuple(images.shape[1:]) != shape:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected a tensor of shape (N, {', '.join(map(str, shape))}); got {got}")
        if images.shape[0] < self.num_components:
            raise ValueError(
                f"images: expected at least {self.num_components} images (one per pseudo-input); got {images.shape[0]}"
            )
        if not 0.0 < margin < 0.5:
            raise ValueError(f"margin: expected a number in (0, 0.5); got {margin}")
        grey = (images[: self.num_components] / self.input_scale).clamp(margin, 1.0 - margin)
        self.raw_pseudo_inputs.copy_(torch.logit(grey).to(self.raw_pseudo_inputs))

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        """``(K, C, H, W)`` pseudo-inputs."""
        return torch.sigmoid(self.raw_pseudo_inputs) * self.input_scale

    def forward(self) -> dist.TorchDistribution:
        loc, scale = self._encoder(self.pseudo_inputs)
        logits = torch.full((self.num_components,), -math.log(self.num_components), dtype=loc.dtype, device=loc.device)
        return DiagonalGaussianMixture(logits, loc, scale)
