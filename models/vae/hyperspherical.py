r"""Hyperspherical VAE (S-VAE): a von Mises-Fisher posterior and a uniform prior on the sphere.

.. math::

    z_n \sim \mathcal{U}(S^{p-1}), \qquad x_n \mid z_n \sim \mathrm{Bernoulli}(\sigma(f_\theta(z_n))),
    \qquad q_\phi(z_n \mid x_n) = \mathrm{vMF}(\mu_\phi(x_n), \kappa_\phi(x_n)),

with ``latent_dim`` :math:`= p` the ambient dimension. The model is
:class:`~vilab.models.vae.vae.VAEModel` with :class:`HypersphericalPrior`, so the VAE helpers
(``VAE.reconstruct``, :mod:`vilab.inference.vae.evaluation`) apply; :func:`hyperspherical_elbo_terms`
gives the ELBO with the closed-form :math:`\mathrm{KL}(\mathrm{vMF} \,\|\, \mathcal{U})`.

References:
    Hyperspherical Variational Auto-Encoders, Davidson, Falorsi, De Cao, Kipf & Tomczak, 2018,
    arXiv:1804.00891.
"""

from __future__ import annotations

from typing import Any, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from vilab.guides.amortized.encoders import MLPEncoder
from vilab.guides.amortized.von_mises_fisher import HypersphericalUniform, VonMisesFisher
from vilab.models.vae.vae import VAE, MLPDecoder, VAEModel
from vilab.types import ELBOTerms, LossOutput

__all__ = [
    "HypersphericalPrior",
    "VMFGuide",
    "build_hyperspherical_vae",
    "hyperspherical_elbo_terms",
    "HypersphericalELBOLoss",
]


class HypersphericalPrior(nn.Module):
    """:math:`p(z) = \\mathcal{U}(S^{p-1})` as a prior module (event shape ``(p,)``)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        if latent_dim < 2:
            raise ValueError(f"latent_dim: expected an ambient dimension >= 2; got {latent_dim}")
        self.latent_dim = latent_dim

    def forward(self) -> dist.TorchDistribution:
        return HypersphericalUniform(self.latent_dim)


class VMFGuide(nn.Module):
    """Amortized :math:`q(z \\mid x) = \\mathrm{vMF}(\\mu(x), \\kappa(x))` on an encoder's features.

    :math:`\\mu = h W_\\mu / \\|h W_\\mu\\|`, :math:`\\kappa = \\mathrm{softplus}(h w_\\kappa) + 1`
    (the floor keeps early training away from the flat, uninformative regime).

    Args:
        body: Module mapping images ``(N, C, H, W)`` to features ``(N, feature_dim)`` (e.g.
            ``MLPEncoder(...).body``).
        feature_dim: Width of the features.
        latent_dim: ``p``.
    """

    def __init__(self, body: nn.Module, feature_dim: int, latent_dim: int):
        super().__init__()
        self.body, self.latent_dim = body, latent_dim
        self.direction = nn.Linear(feature_dim, latent_dim)
        self.concentration = nn.Linear(feature_dim, 1)

    def parameters_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc (N, p), concentration (N,))``."""
        h = self.body(x)
        loc = F.normalize(self.direction(h), dim=-1)
        return loc, F.softplus(self.concentration(h)).squeeze(-1) + 1.0

    def distribution(self, x: torch.Tensor) -> VonMisesFisher:
        return VonMisesFisher(*self.parameters_of(x))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with pyro.plate("data", x.shape[0], dim=-1):
            return pyro.sample("z", self.distribution(x))

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`\\mathbb{E}_q[z] = A_p(\\kappa)\\mu`, ``(N, p)``."""
        return self.distribution(x).mean

    def log_density(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.distribution(x).log_prob(z)


def build_hyperspherical_vae(
    image_shape: Sequence[int], latent_dim: int, *, hidden_dims: Sequence[int] = (300, 300)
) -> VAE:
    """An MLP S-VAE for binary images (``VAE`` bundle; ``config`` is ``None``)."""
    # The Gaussian head of MLPEncoder is not used: only its hidden layers.
    encoder = MLPEncoder(image_shape, latent_dim, hidden_dims=hidden_dims)
    decoder = MLPDecoder(latent_dim, image_shape, hidden_dims=tuple(reversed(hidden_dims)))
    model = VAEModel(decoder, HypersphericalPrior(latent_dim), image_shape)
    return VAE(model, VMFGuide(encoder.body, encoder.feature_dim, latent_dim))


def hyperspherical_elbo_terms(vae: VAE, x: torch.Tensor) -> ELBOTerms:
    """One-sample reconstruction and closed-form KL to the uniform prior, each ``(N,)``."""
    q = vae.guide.distribution(x)
    z = q.rsample()
    reconstruction = vae.model.likelihood(vae.model.decoder(z)).log_prob(x)
    return ELBOTerms(reconstruction, q.kl_to_uniform(), None)


class HypersphericalELBOLoss:
    """Negative ELBO per datapoint with the analytic vMF KL (a :mod:`objectives`-style loss)."""

    def __call__(self, model: VAEModel, guide: VMFGuide, x: torch.Tensor, *, step: int = 0) -> LossOutput:
        terms = hyperspherical_elbo_terms(VAE(model, guide), x)
        return LossOutput(-terms.elbo.mean(), {"elbo": terms.elbo.mean().detach(), "kl": terms.kl.mean().detach()})
