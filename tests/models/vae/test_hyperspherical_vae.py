"""Hyperspherical VAE: vMF guide on a uniform prior, analytic vs sampled KL, gradients."""

import math

import pytest
import torch

from vilab.inference.vae.objectives import elbo_terms, log_importance_weights
from vilab.inference.vae.evaluation import active_units, importance_sampled_log_likelihood
from vilab.models.vae.hyperspherical import (
    HypersphericalELBOLoss,
    HypersphericalPrior,
    build_hyperspherical_vae,
    hyperspherical_elbo_terms,
)

Z = 4.5
SHAPE = (1, 4, 4)


@pytest.fixture
def images():
    return torch.bernoulli(torch.full((8, *SHAPE), 0.4))


@pytest.mark.parametrize("latent_dim", [3, 5])
def test_samples_are_unit_vectors_and_scores_are_shaped(images, latent_dim):
    vae = build_hyperspherical_vae(SHAPE, latent_dim, hidden_dims=(16,))
    z = vae.guide(images)
    assert z.shape == (8, latent_dim)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(8))
    assert log_importance_weights(vae.model, vae.guide, images, num_samples=3).shape == (3, 8)
    assert vae.reconstruct(images).shape == images.shape
    assert vae.sample_prior(2).shape == (2, *SHAPE)


def test_analytic_kl_elbo_matches_the_sampled_elbo_in_expectation(images):
    vae = build_hyperspherical_vae(SHAPE, 5, hidden_dims=(16,))
    with torch.no_grad():
        analytic = torch.stack([hyperspherical_elbo_terms(vae, images).elbo.sum() for _ in range(100)])
        sampled = torch.stack([elbo_terms(vae.model, vae.guide, images).elbo.sum() for _ in range(100)])
    spread = math.sqrt(float(analytic.var() + sampled.var()) / 100)
    assert float(analytic.mean()) == pytest.approx(float(sampled.mean()), abs=Z * spread)


def test_loss_gradients_reach_every_parameter(images):
    vae = build_hyperspherical_vae(SHAPE, 3, hidden_dims=(16,))
    output = HypersphericalELBOLoss()(vae.model, vae.guide, images)
    output.loss.backward()
    assert [n for n, p in vae.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []
    assert set(output.metrics) == {"elbo", "kl"}


def test_evaluation_helpers_accept_the_vmf_guide(images):
    vae = build_hyperspherical_vae(SHAPE, 3, hidden_dims=(16,))
    loader = [images[:4], images[4:]]
    count, variances = active_units(vae, loader, num_samples=20)
    assert variances.shape == (3,) and 0 <= count <= 3
    estimate = importance_sampled_log_likelihood(vae, loader, num_samples=20, chunk_size=10)
    assert math.isfinite(estimate.mean)


def test_prior_rejects_a_one_dimensional_sphere():
    with pytest.raises(ValueError, match="latent_dim"):
        HypersphericalPrior(1)
