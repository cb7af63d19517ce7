r"""Amortized Gaussian encoders and the mean-field VAE guide built on them.

An encoder is a plain ``nn.Module`` mapping images ``x`` of shape ``(batch, C, H, W)`` to the
parameters of a diagonal Gaussian :math:`q_\phi(z \mid x) = \mathcal{N}(\mu_\phi(x),
\operatorname{diag}\sigma_\phi(x)^2)`, returned as ``(loc, scale)`` of shape ``(batch, D)``.
``encoder.features(x)`` exposes the last hidden layer ``h(x)`` so flow guides can condition on it.

References:
    Auto-Encoding Variational Bayes, Kingma & Welling, 2013, arXiv:1312.6114.
"""

from __future__ import annotations

from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "GatedDense",
    "HIDDEN_LAYERS",
    "hidden_stack",
    "MLPEncoder",
    "ConvEncoder",
    "AmortizedNormalGuide",
    "build_encoder",
]

_MIN_SCALE = 1e-4
HIDDEN_LAYERS = ("elu", "gated")


class GatedDense(nn.Module):
    r"""Gated dense layer :math:`h = (W x + b) \odot \sigma(V x + c)`, ``(..., in) -> (..., out)``.

    The hidden layer of the MLP VAEs in the VampPrior and exemplar-prior papers, whose
    Fashion-MNIST log-likelihoods are the anchors of ``benchmarks/vae_quality.py``. ``W`` and
    ``V`` are one ``Linear`` of twice the width, so the layer is a single matrix product.

    References:
        Language Modeling with Gated Convolutional Networks, Dauphin, Fan, Auli & Grangier,
        2017, arXiv:1612.08083.
        VAE with a VampPrior, Tomczak & Welling, 2018, arXiv:1705.07120.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, 2 * out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.linear(x).chunk(2, dim=-1)
        return value * torch.sigmoid(gate)


def hidden_stack(in_features: int, widths: Sequence[int], kind: str = "elu") -> tuple[list, int]:
    """Hidden layers of the given ``widths`` after an input of ``in_features``: ``Linear`` + ELU
    (``kind="elu"``) or :class:`GatedDense` (``"gated"``). Returns the modules and the last width.

    Raises:
        ValueError: for a ``kind`` not in :data:`HIDDEN_LAYERS`.
    """
    if kind not in HIDDEN_LAYERS:
        raise ValueError(f"hidden_layer: expected one of {', '.join(HIDDEN_LAYERS)}; got {kind!r}")
    layers, width = [], int(in_features)
    for hidden in widths:
        layers += [GatedDense(width, hidden)] if kind == "gated" else [nn.Linear(width, hidden), nn.ELU()]
        width = hidden
    return layers, width


def _check_images(x: torch.Tensor, image_shape: Sequence[int], who: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor of images; got {type(x).__name__}")
    if x.dim() < 4 or tuple(x.shape[-3:]) != tuple(image_shape):
        raise ValueError(
            f"x: {who} expects images of shape (batch, {', '.join(map(str, image_shape))}); got {tuple(x.shape)}"
        )


def _check_levels(quantiles: Sequence[float] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``quantiles`` as a 1-D tensor of levels in (0, 1) with ``like``'s dtype and device."""
    levels = torch.as_tensor(quantiles, dtype=like.dtype, device=like.device).reshape(-1)
    if levels.numel() == 0 or not ((levels > 0) & (levels < 1)).all():
        raise ValueError(f"quantiles: expected levels strictly between 0 and 1; got {levels.tolist()}")
    return levels


def _empirical_quantiles(
    distribution: dist.TorchDistribution, quantiles: Sequence[float] | torch.Tensor, num_samples: int
) -> dict[str, torch.Tensor]:
    """``{"z": (Q, batch, D)}``: quantiles of ``num_samples`` draws, for guides whose marginals
    have no closed form (the CDF at each estimate is within about sqrt(p(1-p)/n) of p)."""
    if num_samples < 1:
        raise ValueError(f"num_samples: expected a positive integer; got {num_samples}")
    draws = distribution.sample((num_samples,))
    return {"z": torch.quantile(draws, _check_levels(quantiles, draws), dim=0)}


class _GaussianHead(nn.Module):
    """Last layer: features -> (loc, scale), scale = softplus(.) + a floor for stability."""

    def __init__(self, feature_dim: int, latent_dim: int):
        super().__init__()
        self.loc = nn.Linear(feature_dim, latent_dim)
        self.scale = nn.Linear(feature_dim, latent_dim)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loc(h), F.softplus(self.scale(h)) + _MIN_SCALE


class MLPEncoder(nn.Module):
    r"""Fully connected encoder :math:`x \mapsto (\mu(x), \sigma(x))`.

    Args:
        image_shape: ``(C, H, W)`` of the inputs.
        latent_dim: ``D``, size of :math:`z`.
        hidden_dims: Widths of the hidden layers.
        input_scale: Inputs are divided by this (16 for the 17-level digits, 1 for binary data).
        hidden_layer: ``"elu"`` (``Linear`` + ELU) or ``"gated"`` (:class:`GatedDense`).
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dim: int,
        *,
        hidden_dims: Sequence[int] = (512, 256),
        input_scale: float = 1.0,
        hidden_layer: str = "elu",
    ):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim: expected a positive integer; got {latent_dim}")
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        self.input_scale = float(input_scale)
        layers, width = hidden_stack(int(torch.tensor(self.image_shape).prod()), hidden_dims, hidden_layer)
        self.body = nn.Sequential(nn.Flatten(-3), *layers)
        self.feature_dim = width
        self.head = _GaussianHead(width, latent_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden features ``h(x)``: ``(batch, C, H, W) -> (batch, feature_dim)``."""
        _check_images(x, self.image_shape, "the encoder")
        return self.body(x / self.input_scale)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)``, each ``(batch, D)``."""
        return self.head(self.features(x))


class ConvEncoder(nn.Module):
    r"""Convolutional encoder: two stride-2 convolutions, one dense layer, Gaussian head.

    Args:
        image_shape: ``(C, H, W)`` with ``H`` and ``W`` divisible by 4.
        latent_dim: ``D``.
        channels: Channels of the two convolutions.
        hidden_dim: Width of the dense layer (``feature_dim``).
        input_scale: Inputs are divided by this.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dim: int,
        *,
        channels: Sequence[int] = (32, 64),
        hidden_dim: int = 256,
        input_scale: float = 1.0,
    ):
        super().__init__()
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise ValueError(
                f"image_shape: the convolutional encoder needs H and W divisible by 4; got {tuple(image_shape)}"
            )
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        self.input_scale = float(input_scale)
        self.body = nn.Sequential(
            nn.Conv2d(c, channels[0], 4, stride=2, padding=1),
            nn.ELU(),
            nn.Conv2d(channels[0], channels[1], 4, stride=2, padding=1),
            nn.ELU(),
            nn.Flatten(-3),
            nn.Linear(channels[1] * (h // 4) * (w // 4), hidden_dim),
            nn.ELU(),
        )
        self.feature_dim = hidden_dim
        self.head = _GaussianHead(hidden_dim, latent_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden features ``h(x)``: ``(batch, C, H, W) -> (batch, hidden_dim)``."""
        _check_images(x, self.image_shape, "the encoder")
        batch_shape = x.shape[:-3]
        h = self.body(x.reshape(-1, *self.image_shape) / self.input_scale)
        return h.reshape(*batch_shape, -1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)``, each ``(batch, D)``."""
        return self.head(self.features(x))


def build_encoder(
    kind: str,
    image_shape: Sequence[int],
    latent_dim: int,
    *,
    hidden_dims: Sequence[int] = (512, 256),
    input_scale: float = 1.0,
    hidden_layer: str = "elu",
) -> nn.Module:
    """An ``"mlp"`` or ``"conv"`` encoder (``hidden_dims[-1]`` is the conv dense width;
    ``hidden_layer``, see :data:`HIDDEN_LAYERS`, applies to the MLP)."""
    if kind == "mlp":
        return MLPEncoder(
            image_shape, latent_dim, hidden_dims=hidden_dims, input_scale=input_scale, hidden_layer=hidden_layer
        )
    if kind == "conv":
        if hidden_layer != "elu":
            raise ValueError(f"hidden_layer: the conv encoder has ELU layers only; got {hidden_layer!r}")
        return ConvEncoder(image_shape, latent_dim, hidden_dim=hidden_dims[-1], input_scale=input_scale)
    raise ValueError(f"encoder: expected 'mlp' or 'conv'; got {kind!r}")


class AmortizedNormalGuide(nn.Module):
    r"""Mean-field amortized guide :math:`q(z \mid x) = \mathcal{N}(\mu(x), \operatorname{diag}\sigma(x)^2)`.

    A Pyro guide with the VAE model's signature: ``guide(x)`` samples site ``"z"`` of shape
    ``(batch, D)`` inside ``pyro.plate("data", batch, dim=-1)``.

    Args:
        encoder: Module with ``forward(x) -> (loc, scale)``.
        name: Prefix for ``pyro.module`` when ``register=True``.
        register: Register parameters in Pyro's param store (needed by ``pyro.infer.SVI``
            with a Pyro optimizer; Lightning training optimizes ``parameters()`` directly).
    """

    def __init__(self, encoder: nn.Module, *, name: str = "vae_guide", register: bool = False):
        super().__init__()
        self.encoder = encoder
        self.latent_dim = encoder.latent_dim
        self.name = name
        self.register = register

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """:math:`q(z \\mid x)` with batch shape ``(batch,)`` and event shape ``(D,)``."""
        loc, scale = self.encoder(x)
        return dist.Normal(loc, scale).to_event(1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Sample ``z ~ q(z | x)`` at site ``"z"``; extra arguments are ignored."""
        if self.register:
            pyro.module(self.name, self)
        with pyro.plate("data", x.shape[0], dim=-1):
            return pyro.sample("z", self.distribution(x))

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`\\mathbb{E}_q[z]`, ``(batch, D)``."""
        return self.encoder(x)[0]

    def median(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Posterior median of each site, Pyro autoguide style: ``{"z": (batch, D)}``."""
        return {"z": self.mean(x)}

    def quantiles(self, quantiles: Sequence[float] | torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        r"""Per-datapoint marginal quantiles :math:`\mu_d(x) + \sigma_d(x)\,\Phi^{-1}(p)`.

        Pyro autoguide style (``quantiles`` first, then the model's arguments).

        Args:
            quantiles: Levels :math:`p \in (0, 1)`, shape ``(Q,)``.
            x: Images ``(batch, C, H, W)``.

        Returns:
            ``{"z": (Q, batch, D)}``.
        """
        loc, scale = self.encoder(x)
        levels = _check_levels(quantiles, loc)
        standard = torch.distributions.Normal(torch.zeros_like(levels), 1.0).icdf(levels)
        return {"z": loc + scale * standard.reshape(-1, 1, 1)}

    def log_density(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """:math:`\\log q(z \\mid x)` for any ``z`` broadcastable to ``(..., batch, D)``."""
        return self.distribution(x).log_prob(z)

    def kl_per_dimension(self, x: torch.Tensor, prior: Optional[dist.Distribution]) -> Optional[torch.Tensor]:
        """Analytic per-dimension KL to a diagonal Normal prior, ``(batch, D)``; else ``None``."""
        base = getattr(prior, "base_dist", None)
        if not isinstance(base, torch.distributions.Normal):
            return None
        loc, scale = self.encoder(x)
        return torch.distributions.kl_divergence(torch.distributions.Normal(loc, scale), base)
