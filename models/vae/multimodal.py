r"""Multimodal VAE on an image and its class label, with a product-of-experts posterior (MVAE).

Generative model for ``N`` pairs:

.. math::

    z_n \sim \mathcal{N}(0, I_D), \qquad
    x_n \mid z_n \sim \mathrm{Bernoulli}(\sigma(f_\theta(z_n))), \qquad
    y_n \mid z_n \sim \mathrm{Categorical}(\operatorname{softmax} g_\theta(z_n)),

sites ``"z"`` ``(N, D)``, ``"x"`` ``(N, C, H, W)``, ``"y"`` ``(N,)`` in
``pyro.plate("data", N, dim=-1)``; a modality passed as ``None`` (with the other observed) is
left out of the model, so ``model(x, None)`` is the image-only marginal model. The guide is
:class:`~vilab.guides.amortized.poe.PoEGuide`. Training maximises the sub-sampled objective of Wu &
Goodman, the sum of the ELBOs of :math:`(x, y)`, :math:`x` alone and :math:`y` alone (all
subsets for two modalities), with the label log-likelihood weighted by ``label_weight``
(their :math:`\lambda`) so 1 label is not drowned by 784 pixels.

Evaluation (:meth:`MultimodalVAE.log_likelihoods`): importance-sampled :math:`\log p(x, y)`,
:math:`\log p(x)`, :math:`\log p(y)`; :math:`\log p(y \mid x)` by self-normalised importance
sampling, :math:`\log \sum_k w_k p(y \mid z_k) - \log \sum_k w_k` with
:math:`w_k = p(x, z_k)/q(z_k \mid x)`, which also gives the image-to-label classifier; and
:math:`\log p(x \mid y) = \log p(x, y) - \log p(y)`.

References:
    Multimodal Generative Models for Scalable Weakly-Supervised Learning, Wu & Goodman, 2018,
    arXiv:1802.05335.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from vilab.guides.amortized.encoders import MLPEncoder
from vilab.guides.amortized.poe import LabelEncoder, PoEGuide
from vilab.models.vae.vae import MLPDecoder

__all__ = ["MultimodalModel", "MultimodalVAE", "build_multimodal_vae"]


class MultimodalModel(nn.Module):
    """The generative model ``model(x=None, y=None, *, batch_size=None)``.

    Args:
        image_decoder: ``z (..., D) -> logits (..., C, H, W)``.
        num_classes: ``K``.
        latent_dim: ``D``.
        hidden_dim: Width of the label decoder.
    """

    def __init__(self, image_decoder: nn.Module, num_classes: int, latent_dim: int, hidden_dim: int = 64):
        super().__init__()
        self.image_decoder, self.num_classes, self.latent_dim = image_decoder, num_classes, latent_dim
        self.label_decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.ELU(), nn.Linear(hidden_dim, num_classes)
        )

    def image_likelihood(self, z: torch.Tensor) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=self.image_decoder(z)).to_event(3)

    def label_likelihood(self, z: torch.Tensor) -> dist.TorchDistribution:
        return dist.Categorical(logits=self.label_decoder(z))

    def forward(
        self, x: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None, *, batch_size: Optional[int] = None
    ) -> torch.Tensor:
        observed = x if x is not None else y
        if observed is None and batch_size is None:
            raise ValueError("batch_size: expected an integer when x and y are both None")
        size = observed.shape[0] if observed is not None else batch_size
        generate = x is None and y is None
        with pyro.plate("data", size, dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.latent_dim), 1.0).to_event(1))
            if x is not None or generate:
                pyro.sample("x", self.image_likelihood(z), obs=x)
            if y is not None or generate:
                pyro.sample("y", self.label_likelihood(z), obs=y)
        return z


class MultimodalVAE(nn.Module):
    """Model and PoE guide bundled with the sub-sampled loss and the evaluation of the module.

    Args:
        model: :class:`MultimodalModel`.
        guide: :class:`~vilab.guides.amortized.poe.PoEGuide`.
        label_weight: :math:`\\lambda` on :math:`\\log p(y \\mid z)` in the training loss.
    """

    def __init__(self, model: MultimodalModel, guide: PoEGuide, *, label_weight: float = 50.0):
        super().__init__()
        self.model, self.guide, self.label_weight = model, guide, label_weight

    def _elbo(self, x, y, label_weight):
        q = self.guide.distribution(x, y)
        z = q.rsample()
        kl = torch.distributions.kl_divergence(q, dist.Normal(torch.zeros_like(z), 1.0).to_event(1))
        reconstruction = 0.0
        if x is not None:
            reconstruction = reconstruction + self.model.image_likelihood(z).log_prob(x)
        if y is not None:
            reconstruction = reconstruction + label_weight * self.model.label_likelihood(z).log_prob(y)
        return reconstruction - kl

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Negative sub-sampled objective per pair: ELBO(x, y) + ELBO(x) + ELBO(y), weighted."""
        w = self.label_weight
        total = self._elbo(x, y, w) + self._elbo(x, None, w) + self._elbo(None, y, w)
        return -total.mean()

    def _log_weights(self, x, y, proposal_x, proposal_y, num_samples):
        q = self.guide.distribution(proposal_x, proposal_y)
        z = q.sample((num_samples,))
        log_w = dist.Normal(torch.zeros_like(z), 1.0).to_event(1).log_prob(z) - q.log_prob(z)
        if x is not None:
            log_w = log_w + self.model.image_likelihood(z).log_prob(x)
        if y is not None:
            log_w = log_w + self.model.label_likelihood(z).log_prob(y)
        return log_w, z

    @torch.no_grad()
    def label_posterior(self, x: torch.Tensor, *, num_samples: int = 500) -> torch.Tensor:
        """:math:`\\log p(y \\mid x)` for every class by self-normalised IS: ``(N, K)``."""
        log_w, z = self._log_weights(x, None, x, None, num_samples)
        log_probs = torch.log_softmax(self.model.label_decoder(z), -1)  # (S, N, K)
        return torch.logsumexp(log_w.unsqueeze(-1) + log_probs, 0) - torch.logsumexp(log_w, 0).unsqueeze(-1)

    @torch.no_grad()
    def log_likelihoods(self, x: torch.Tensor, y: torch.Tensor, *, num_samples: int = 500) -> dict[str, torch.Tensor]:
        """Per-pair ``joint``, ``image``, ``label``, ``label_given_image``,
        ``image_given_label`` log-likelihoods and ``correct`` (argmax p(y|x) == y), each ``(N,)``."""

        def estimate(log_w):
            return torch.logsumexp(log_w, 0) - math.log(num_samples)

        joint = estimate(self._log_weights(x, y, x, y, num_samples)[0])
        image = estimate(self._log_weights(x, None, x, None, num_samples)[0])
        label = estimate(self._log_weights(None, y, None, y, num_samples)[0])
        posterior = self.label_posterior(x, num_samples=num_samples)
        return {
            "joint": joint,
            "image": image,
            "label": label,
            "label_given_image": posterior.gather(-1, y.unsqueeze(-1)).squeeze(-1),
            "image_given_label": joint - label,
            "correct": (posterior.argmax(-1) == y).to(joint.dtype),
        }

    @torch.no_grad()
    def sample_images(self, y: torch.Tensor) -> torch.Tensor:
        """Decoder means at :math:`z \\sim q(z \\mid y)`: ``(N, C, H, W)``."""
        z = self.guide.distribution(None, y).sample()
        return torch.sigmoid(self.model.image_decoder(z))


def build_multimodal_vae(
    image_shape: Sequence[int],
    num_classes: int = 10,
    latent_dim: int = 16,
    *,
    hidden_dims: Sequence[int] = (300, 300),
    label_weight: float = 50.0,
) -> MultimodalVAE:
    """MLP image encoder/decoder, label encoder/decoder and the PoE guide."""
    encoder = MLPEncoder(image_shape, latent_dim, hidden_dims=hidden_dims)
    decoder = MLPDecoder(latent_dim, image_shape, hidden_dims=tuple(reversed(hidden_dims)))
    model = MultimodalModel(decoder, num_classes, latent_dim)
    guide = PoEGuide(encoder, LabelEncoder(num_classes, latent_dim))
    return MultimodalVAE(model, guide, label_weight=label_weight)
