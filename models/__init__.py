"""Generative models: Pyro model functions, each registered by name with default data."""

from vilab.models import conjugate, eight_schools, funnel, logistic, mixture  # noqa: F401
from vilab.models.posteriordb import mixture as _mixture  # noqa: F401
from vilab.models.posteriordb import regression as _regression  # noqa: F401
from vilab.models.posteriordb import timeseries as _timeseries  # noqa: F401
from vilab.models.vae import vae as _vae  # noqa: F401
from vilab.models.vae import priors as _priors  # noqa: F401
from vilab.models.conjugate import beta_bernoulli, linear_regression, normal_normal
from vilab.models.eight_schools import eight_schools_centered, eight_schools_noncentered
from vilab.models.funnel import funnel as neals_funnel
from vilab.models.logistic import logistic_regression
from vilab.models.mixture import gaussian_mixture
from vilab.models.registry import ModelSpec, get_model, list_models, register_model
from vilab.models.vae.vae import VAE, VAEConfig, VAEModel, build_vae
from vilab.models.vae.hierarchical import HierarchicalPrior, embed_one_level
from vilab.models.vae.autoregressive import build_autoregressive_vae
from vilab.models.vae.dmm import DMM, DeepMarkovModel
from vilab.models.vae.hyperspherical import HypersphericalELBOLoss, build_hyperspherical_vae
from vilab.models.vae.multimodal import MultimodalVAE, build_multimodal_vae

__all__ = [
    "ModelSpec",
    "get_model",
    "list_models",
    "register_model",
    "normal_normal",
    "beta_bernoulli",
    "linear_regression",
    "eight_schools_centered",
    "eight_schools_noncentered",
    "neals_funnel",
    "logistic_regression",
    "gaussian_mixture",
    "VAE",
    "VAEConfig",
    "VAEModel",
    "build_vae",
    "build_autoregressive_vae",
    "DMM",
    "DeepMarkovModel",
    "HypersphericalELBOLoss",
    "build_hyperspherical_vae",
    "MultimodalVAE",
    "build_multimodal_vae",
    "HierarchicalPrior",
    "embed_one_level",
]
