"""MMD, the minibatch MI estimate, the InfoVAE / MI losses and the strong-decoder VAE."""

import math

import pyro
import pytest
import torch
from torch.distributions import Normal

from vilab.inference.vae.mutual_information import (
    InfoVAELoss,
    MutualInformationLoss,
    kernel_matrix,
    latent_terms,
    maximum_mean_discrepancy,
    minibatch_mutual_information,
)
from vilab.inference.vae.objectives import ELBOLoss, log_importance_weights
from vilab.models.vae.autoregressive import build_autoregressive_vae

Z = 4.5
SHAPE = (1, 5, 4)


def _rbf_expectation(m1, s1, m2, s2, h):
    # E k(a, b), a ~ N(m1, s1^2 I), b ~ N(m2, s2^2 I), RBF bandwidth h (Gaussian convolution).
    d = m1.numel()
    total = h**2 + s1**2 + s2**2
    return (h**2 / total) ** (d / 2) * math.exp(-float((m1 - m2).pow(2).sum()) / (2 * total))


def test_unbiased_mmd_matches_the_closed_form_for_gaussians():
    m_q, m_p, s_q, s_p, h = torch.tensor([0.5, -0.3]), torch.zeros(2), 0.8, 1.0, 1.2
    exact = (
        _rbf_expectation(m_q, s_q, m_q, s_q, h)
        + _rbf_expectation(m_p, s_p, m_p, s_p, h)
        - 2 * _rbf_expectation(m_q, s_q, m_p, s_p, h)
    )
    estimates = torch.stack(
        [
            maximum_mean_discrepancy(
                m_q + s_q * torch.randn(100, 2), m_p + s_p * torch.randn(120, 2), kernel="rbf", bandwidth=h
            )
            for _ in range(100)
        ]
    )
    tolerance = Z * float(estimates.std()) / math.sqrt(len(estimates))
    assert float(estimates.mean()) == pytest.approx(exact, abs=tolerance)
    assert exact > 3 * tolerance  # the two distributions are distinguishable at this size


def test_kernels_are_one_on_the_diagonal_and_checked():
    a = torch.randn(4, 3)
    for kernel in ("rbf", "imq"):
        torch.testing.assert_close(kernel_matrix(a, a, kernel=kernel).diagonal(), torch.ones(4))
    with pytest.raises(ValueError, match="kernel"):
        kernel_matrix(a, a, kernel="linear")
    with pytest.raises(ValueError, match="at least 2 samples"):
        maximum_mean_discrepancy(a[:1], a)


def test_minibatch_mutual_information_limits():
    z = torch.randn(64, 2)
    same = Normal(torch.zeros(64, 2), 1.0)
    assert float(minibatch_mutual_information(torch.distributions.Independent(same, 1), z)) == pytest.approx(
        0.0, abs=1e-12
    )
    # Two well-separated codes, half the batch each: I = log 2 up to the overlap e^-200.
    locs = torch.cat([torch.full((32, 2), -10.0), torch.full((32, 2), 10.0)])
    q = torch.distributions.Independent(Normal(locs, 1.0), 1)
    assert float(minibatch_mutual_information(q, q.sample())) == pytest.approx(math.log(2), abs=1e-6)


@pytest.fixture
def strong_vae():
    return build_autoregressive_vae(SHAPE, 3, encoder_hidden=(8,), decoder_hidden=8)


@pytest.fixture
def images():
    return torch.bernoulli(torch.full((6, *SHAPE), 0.4))


def test_info_vae_with_alpha_zero_lambda_one_is_the_elbo(strong_vae, images):
    pyro.set_rng_seed(3)
    info = InfoVAELoss(alpha=0.0, lambda_=1.0)(strong_vae.model, strong_vae.guide, images)
    pyro.set_rng_seed(3)
    elbo = ELBOLoss()(strong_vae.model, strong_vae.guide, images)
    torch.testing.assert_close(info.loss, elbo.loss)
    pyro.set_rng_seed(3)
    plain = MutualInformationLoss(0.0)(strong_vae.model, strong_vae.guide, images)
    torch.testing.assert_close(plain.loss, elbo.loss)


def test_info_vae_draws_as_many_prior_samples_as_asked(strong_vae, images):
    prior = latent_terms(strong_vae.model, strong_vae.guide, images).prior
    assert InfoVAELoss()._prior_draws(prior, 3).shape == (6, 3)
    assert InfoVAELoss(num_prior_samples=10)._prior_draws(prior, 3).shape == (10, 3)


@pytest.mark.parametrize("loss", [InfoVAELoss(), MutualInformationLoss(1.0)])
def test_losses_give_gradients_to_every_parameter(strong_vae, images, loss):
    output = loss(strong_vae.model, strong_vae.guide, images)
    output.loss.backward()
    assert [n for n, p in strong_vae.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []
    assert "elbo" in output.metrics


def test_strong_decoder_model_shapes_and_vectorized_weights(strong_vae, images):
    terms = latent_terms(strong_vae.model, strong_vae.guide, images)
    assert terms.reconstruction.shape == terms.kl.shape == (6,)
    assert log_importance_weights(strong_vae.model, strong_vae.guide, images, num_samples=4).shape == (4, 6)
    assert strong_vae.model.decoder.sample(torch.randn(2, 3)).shape == (2, *SHAPE)
    with pytest.raises(ValueError, match="x: expected images"):
        strong_vae.model(torch.zeros(2, 1, 4, 4))


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="alpha, lambda_"):
        InfoVAELoss(alpha=0.0, lambda_=0.5)
    with pytest.raises(ValueError, match="mi_weight"):
        MutualInformationLoss(-1.0)
    with pytest.raises(ValueError, match="guide: expected a latent site named 'z'"):
        latent_terms(lambda x: None, lambda x: None, torch.zeros(2, 1))
