r"""Variational auto-encoders on images as Pyro model/guide pairs.

Generative model for a batch of ``N`` images :math:`x_n \in \{0,\dots,L-1\}^{C \times H \times W}`:

.. math::

    z_n \sim p(z), \qquad
    x_{n,i} \mid z_n \sim \mathrm{Bernoulli}(\sigma(f_\theta(z_n)_i)) \;\; (L = 2)
    \quad\text{or}\quad \mathrm{Categorical}(\operatorname{softmax} f_\theta(z_n)_{i,:})
    \;\; (L > 2),

with sites ``"z"`` ``(N, D)`` and ``"x"`` ``(N, C, H, W)`` inside ``pyro.plate("data", N,
dim=-1)``. ``VAE.model(x)`` and ``VAE.guide(x)`` are ordinary Pyro callables, so any ELBO,
importance sampler or training loop that takes ``(model, guide)`` works with them; the guide is
an amortized Gaussian (:class:`~vilab.guides.amortized.encoders.AmortizedNormalGuide`) or encoder + flow
(:class:`~vilab.guides.amortized.flows.AmortizedFlowGuide`).

References:
    Auto-Encoding Variational Bayes, Kingma & Welling, 2013, arXiv:1312.6114.
    Stochastic Backpropagation and Approximate Inference in Deep Generative Models,
    Rezende, Mohamed & Wierstra, 2014, arXiv:1401.4082.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from vilab.guides.amortized.flows import FLOWS, AmortizedFlowGuide
from vilab.guides.amortized.encoders import HIDDEN_LAYERS, AmortizedNormalGuide, build_encoder, hidden_stack
from vilab.guides.amortized.hierarchical import ConditionalGaussian, HierarchicalNormalGuide
from vilab.models.vae.hierarchical import HierarchicalPrior
from vilab.models.vae.priors import PRIORS, MixturePrior, StandardNormalPrior, VampPrior

__all__ = ["MLPDecoder", "ConvDecoder", "VAEModel", "VAE", "VAEConfig", "build_vae", "GUIDES"]

GUIDES = ("meanfield",) + FLOWS


class MLPDecoder(nn.Module):
    r"""Fully connected decoder :math:`z \mapsto` logits of shape ``(..., C, H, W[, L])``.

    Args:
        latent_dim: ``D``.
        image_shape: ``(C, H, W)``.
        num_levels: ``L``; 2 gives one Bernoulli logit per pixel, more gives ``L`` logits.
        hidden_dims: Hidden widths, applied in order from :math:`z`.
        hidden_layer: ``"elu"`` (``Linear`` + ELU) or ``"gated"``
            (:class:`~vilab.guides.amortized.encoders.GatedDense`).
    """

    def __init__(
        self,
        latent_dim: int,
        image_shape: Sequence[int],
        *,
        num_levels: int = 2,
        hidden_dims: Sequence[int] = (256, 512),
        hidden_layer: str = "elu",
    ):
        super().__init__()
        self.latent_dim, self.image_shape, self.num_levels = latent_dim, tuple(image_shape), num_levels
        self._out_shape = self.image_shape + ((num_levels,) if num_levels > 2 else ())
        layers, width = hidden_stack(latent_dim, hidden_dims, hidden_layer)
        layers.append(nn.Linear(width, math.prod(self._out_shape)))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).reshape(*z.shape[:-1], *self._out_shape)


class ConvDecoder(nn.Module):
    r"""Dense layer to a ``(64, H/4, W/4)`` map, then two stride-2 transposed convolutions.

    Args:
        latent_dim: ``D``.
        image_shape: ``(C, H, W)`` with ``H``, ``W`` divisible by 4.
        num_levels: ``L`` (see :class:`MLPDecoder`).
        channels: Channels of the ``H/4`` and ``H/2`` feature maps.
    """

    def __init__(
        self, latent_dim: int, image_shape: Sequence[int], *, num_levels: int = 2, channels: Sequence[int] = (64, 32)
    ):
        super().__init__()
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise ValueError(
                f"image_shape: the convolutional decoder needs H and W divisible by 4; got {tuple(image_shape)}"
            )
        self.latent_dim, self.image_shape, self.num_levels = latent_dim, tuple(image_shape), num_levels
        self._levels = num_levels if num_levels > 2 else 1
        self._map_shape = (channels[0], h // 4, w // 4)
        self.dense = nn.Sequential(nn.Linear(latent_dim, math.prod(self._map_shape)), nn.ELU())
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(channels[0], channels[1], 4, stride=2, padding=1),
            nn.ELU(),
            nn.ConvTranspose2d(channels[1], c * self._levels, 4, stride=2, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch_shape = z.shape[:-1]
        out = self.deconv(self.dense(z.reshape(-1, self.latent_dim)).reshape(-1, *self._map_shape))
        c, h, w = self.image_shape
        if self._levels == 1:
            return out.reshape(*batch_shape, c, h, w)
        return out.reshape(*batch_shape, c, self._levels, h, w).movedim(-3, -1)


def _is_binary(x: torch.Tensor) -> bool:
    r"""Whether every value of ``x`` is exactly 0 or 1 (NaN is not).

    Runs every training step, so it avoids elementwise comparisons (slow boolean kernels, a
    quarter of a millisecond per batch of 128 images): inside :math:`[0, 1]` every term of
    :math:`\sum_i x_i (1 - x_i)` is non-negative and is zero only at 0 or 1, so the dot
    product is zero exactly when the data are binary.
    """
    if x.numel() == 0:
        return True
    flat = x.reshape(-1)
    if not flat.is_floating_point():
        flat = flat.double()
    low, high = torch.aminmax(flat)
    if not (low.item() >= 0.0 and high.item() <= 1.0):
        return False
    return torch.dot(flat, 1.0 - flat).item() == 0.0


class VAEModel(nn.Module):
    r"""The generative half :math:`p(z)\,p_\theta(x \mid z)` as a Pyro model ``model(x)``.

    Args:
        decoder: Module mapping ``(..., D)`` to logits ``(..., C, H, W[, L])``.
        prior: Module whose ``forward()`` returns :math:`p(z)` (event shape ``(D,)``).
        image_shape: ``(C, H, W)``.
        num_levels: 2 (Bernoulli pixels, data must be 0/1) or ``L`` (categorical pixels, data
            must be integers ``0..L-1``).
        validate_data: Check shape and values of ``x`` on every call (cheap; disable only in
            tight benchmarks).
        name: Prefix for ``pyro.module`` when ``register=True``.
        register: Register parameters in Pyro's param store (for ``pyro.infer.SVI``).
    """

    def __init__(
        self,
        decoder: nn.Module,
        prior: nn.Module,
        image_shape: Sequence[int],
        *,
        num_levels: int = 2,
        validate_data: bool = True,
        name: str = "vae_model",
        register: bool = False,
    ):
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"num_levels: expected an integer >= 2; got {num_levels}")
        self.decoder, self.prior = decoder, prior
        self.image_shape, self.num_levels = tuple(image_shape), num_levels
        self.latent_dim = decoder.latent_dim
        self.validate_data, self.name, self.register = validate_data, name, register

    def check_data(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(batch, C, H, W)`` with valid pixel values."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a tensor of images; got {type(x).__name__}")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"x: the model expects images of shape (batch, "
                f"{', '.join(map(str, self.image_shape))}); got {tuple(x.shape)}"
            )
        if self.num_levels == 2:
            if not _is_binary(x):
                raise ValueError(
                    "x: the Bernoulli decoder needs binary pixels (0 or 1); got "
                    f"values in [{x.min().item():.3g}, {x.max().item():.3g}] - "
                    "binarize the data first (see vilab.datasets.binarize)"
                )
        elif (x != x.round()).any() or x.min() < 0 or x.max() > self.num_levels - 1:
            raise ValueError(
                f"x: the categorical decoder needs integer pixels in "
                f"0..{self.num_levels - 1}; got values in "
                f"[{x.min().item():.3g}, {x.max().item():.3g}]"
            )

    def likelihood(self, logits: torch.Tensor) -> dist.TorchDistribution:
        r""":math:`p(x \mid z)` from decoder logits; event shape ``(C, H, W)``."""
        if self.num_levels == 2:
            return dist.Bernoulli(logits=logits).to_event(3)
        return dist.Categorical(logits=logits).to_event(3)

    def forward(self, x: Optional[torch.Tensor] = None, *, batch_size: Optional[int] = None) -> torch.Tensor:
        """Run the model; ``x=None`` draws ``batch_size`` images from the prior predictive."""
        if self.register:
            pyro.module(self.name, self)
        if x is not None:
            if self.validate_data:
                self.check_data(x)
            batch_size = x.shape[0]
            obs = x if self.num_levels == 2 else x.long()
        elif batch_size is None:
            raise ValueError("batch_size: expected an integer when x is None; got None")
        else:
            obs = None
        with pyro.plate("data", batch_size, dim=-1):
            z = pyro.sample("z", self.prior())
            return pyro.sample("x", self.likelihood(self.decoder(z)), obs=obs)


@dataclass
class VAEConfig:
    """Everything needed to rebuild a :class:`VAE` (saved as JSON next to its weights).

    Attributes:
        image_shape: ``(C, H, W)``.
        latent_dim: ``D``.
        num_levels: 2 for binary images, 17 for digits.
        architecture: ``"mlp"`` or ``"conv"`` (encoder and decoder).
        encoder_hidden: Encoder hidden widths (conv: last entry is the dense width).
        decoder_hidden: MLP decoder hidden widths.
        guide: ``"meanfield"`` or a flow in :data:`~vilab.guides.amortized.flows.FLOWS`.
        num_flows: Flow steps ``K``.
        flow_hidden: Hidden widths of each flow step's network (``None``: library default).
        prior: ``"standard"``, ``"mixture"`` or ``"vamp"``.
        num_components: Mixture components / pseudo-inputs.
        hidden_layer: MLP hidden layers, ``"elu"`` or ``"gated"`` (the anchors' networks).
        latent_levels: 1, or 2 for the two-level VAE of
            :mod:`~vilab.models.vae.hierarchical` (``latent_dim`` numbers per level, site
            ``"z"`` holds both; mean-field guide only; ``prior`` is then :math:`p(z_2)`).
    """

    image_shape: tuple[int, int, int]
    latent_dim: int = 32
    num_levels: int = 2
    architecture: str = "mlp"
    encoder_hidden: tuple[int, ...] = (512, 256)
    decoder_hidden: tuple[int, ...] = (256, 512)
    guide: str = "meanfield"
    num_flows: int = 4
    flow_hidden: Optional[tuple[int, ...]] = None
    prior: str = "standard"
    num_components: int = 500
    hidden_layer: str = "elu"
    latent_levels: int = 1
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "VAEConfig":
        data = dict(data)
        for key in ("image_shape", "encoder_hidden", "decoder_hidden", "flow_hidden"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


class VAE(nn.Module):
    """A model and a guide bundled so one ``state_dict`` holds both.

    Attributes:
        model: :class:`VAEModel`, a Pyro model ``model(x)``.
        guide: Pyro guide ``guide(x)`` sampling site ``"z"``.
        config: The :class:`VAEConfig` it was built from (``None`` when built by hand).
    """

    def __init__(self, model: VAEModel, guide: nn.Module, config: Optional[VAEConfig] = None):
        super().__init__()
        self.model, self.guide, self.config = model, guide, config

    @property
    def latent_dim(self) -> int:
        return self.model.latent_dim

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        r"""Mean of :math:`p(x \mid z)` at a draw :math:`z \sim q(z \mid x)`: ``(N, C, H, W)``."""
        return self.decode_mean(self.guide.distribution(x).sample())

    @torch.no_grad()
    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """Expected pixel value under the decoder (grey level for categorical), ``(..., C, H, W)``."""
        logits = self.model.decoder(z)
        if self.model.num_levels == 2:
            return torch.sigmoid(logits)
        levels = torch.arange(self.model.num_levels, dtype=logits.dtype, device=logits.device)
        return (torch.softmax(logits, -1) * levels).sum(-1)

    @torch.no_grad()
    def sample_prior(self, num_samples: int) -> torch.Tensor:
        """Decoder means at ``num_samples`` prior draws, ``(num_samples, C, H, W)``."""
        return self.decode_mean(self.model.prior().sample((num_samples,)))


def build_vae(config: VAEConfig) -> VAE:
    """Build encoder, decoder, prior and guide from a :class:`VAEConfig`.

    Raises:
        ValueError: for an unknown guide, prior, architecture or hidden layer.
    """
    if config.guide not in GUIDES:
        raise ValueError(f"guide: expected one of {', '.join(GUIDES)}; got {config.guide!r}")
    if config.prior not in PRIORS:
        raise ValueError(f"prior: expected one of {', '.join(PRIORS)}; got {config.prior!r}")
    if config.architecture not in ("mlp", "conv"):
        raise ValueError(f"architecture: expected 'mlp' or 'conv'; got {config.architecture!r}")
    allowed = HIDDEN_LAYERS if config.architecture == "mlp" else ("elu",)
    if config.hidden_layer not in allowed:
        raise ValueError(
            f"hidden_layer: expected one of {', '.join(HIDDEN_LAYERS)} (mlp) or 'elu' "
            f"(conv); got {config.hidden_layer!r} with architecture {config.architecture!r}"
        )
    if config.latent_levels not in (1, 2):
        raise ValueError(f"latent_levels: expected 1 or 2; got {config.latent_levels!r}")
    if config.latent_levels == 2 and config.guide != "meanfield":
        raise ValueError(
            f"guide: the two-level VAE (latent_levels=2) has a mean-field guide only; got {config.guide!r}"
        )
    if config.latent_levels == 2 and config.prior == "mixture":
        raise ValueError("prior: the two-level VAE's top prior is 'standard' or 'vamp'; got 'mixture'")
    input_scale = float(config.num_levels - 1)
    encoder = build_encoder(
        config.architecture,
        config.image_shape,
        config.latent_dim,
        hidden_dims=config.encoder_hidden,
        input_scale=input_scale,
        hidden_layer=config.hidden_layer,
    )
    decoded = config.latent_dim * config.latent_levels
    if config.architecture == "mlp":
        decoder = MLPDecoder(
            decoded,
            config.image_shape,
            num_levels=config.num_levels,
            hidden_dims=config.decoder_hidden,
            hidden_layer=config.hidden_layer,
        )
    else:
        decoder = ConvDecoder(decoded, config.image_shape, num_levels=config.num_levels)
    if config.prior == "standard":
        prior = StandardNormalPrior(config.latent_dim)
    elif config.prior == "mixture":
        prior = MixturePrior(config.latent_dim, config.num_components)
    else:
        prior = VampPrior(encoder, config.num_components, input_scale=input_scale)
    if config.latent_levels == 2:
        return _two_level(config, encoder, decoder, prior)
    if config.guide == "meanfield":
        guide = AmortizedNormalGuide(encoder)
    else:
        guide = AmortizedFlowGuide(encoder, config.guide, config.num_flows, hidden_dims=config.flow_hidden)
    model = VAEModel(decoder, prior, config.image_shape, num_levels=config.num_levels)
    return VAE(model, guide, config)


def _two_level(config: VAEConfig, encoder: nn.Module, decoder: nn.Module, top: nn.Module) -> VAE:
    r"""Tomczak & Welling's HVAE: ``top`` is :math:`p(z_2)`; :math:`p(z_1 \mid z_2)` has the
    decoder's widths and :math:`q(z_1 \mid x, z_2)` the encoder's."""
    hidden = "elu" if config.architecture == "conv" else config.hidden_layer
    size = config.latent_dim
    prior = HierarchicalPrior(
        top, ConditionalGaussian(size, size, hidden_dims=config.decoder_hidden, hidden_layer=hidden)
    )
    lower = ConditionalGaussian(
        size, size, hidden_dims=config.encoder_hidden, context_dim=math.prod(config.image_shape), hidden_layer=hidden
    )
    guide = HierarchicalNormalGuide(encoder, lower)
    model = VAEModel(decoder, prior, config.image_shape, num_levels=config.num_levels)
    return VAE(model, guide, config)
