"""Variational autoencoders: the VAE, its priors, hierarchical, autoregressive, sequential (DMM), multimodal and hyperspherical variants."""

from vilab.models.vae.vae import (  # noqa: F401 -- the package's public names
    MLPDecoder,
    ConvDecoder,
    VAEModel,
    VAE,
    VAEConfig,
    build_vae,
    GUIDES,
)

__all__ = ["MLPDecoder", "ConvDecoder", "VAEModel", "VAE", "VAEConfig", "build_vae", "GUIDES"]
