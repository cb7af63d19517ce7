"""Local refinement and the Cremer et al. gap decomposition, checked on a linear-Gaussian VAE.

For :math:`z \\sim N(0, I)`, :math:`x \\mid z \\sim N(Wz, s^2 I)` the posterior is Gaussian with
precision :math:`\\Lambda = I + W^T W / s^2`, so :math:`\\log p(x)` is closed-form and the best
mean-field Gaussian misses the posterior by exactly
:math:`\\tfrac12 \\sum_i \\log \\Lambda_{ii} - \\tfrac12 \\log\\det\\Lambda` nats for every ``x``:
that is the approximation gap the decomposition must find.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from vilab.guides.amortized.flows import AmortizedFlowGuide
from vilab.guides.amortized.encoders import AmortizedNormalGuide, MLPEncoder
from vilab.inference.vae.amortization import (
    LocalGuide,
    gap_decomposition,
    importance_log_likelihood,
    monte_carlo_elbo,
    refine_locally,
)

Z = 4.5
SHAPE = (1, 1, 3)


class LinearGaussianModel(nn.Module):
    def __init__(self, weight, noise):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.noise = noise

    def forward(self, x):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            mean = (z @ self.weight.T).reshape(*z.shape[:-1], *SHAPE)
            return pyro.sample("x", dist.Normal(mean, self.noise).to_event(3), obs=x)

    def log_evidence(self, x):
        cov = self.weight @ self.weight.T + self.noise**2 * torch.eye(3)
        return dist.MultivariateNormal(torch.zeros(3), cov).log_prob(x.reshape(-1, 3))

    def meanfield_gap(self):
        precision = torch.eye(2) + self.weight.T @ self.weight / self.noise**2
        return 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))


@pytest.fixture
def setup():
    weight = torch.tensor([[1.0, 0.8], [0.5, -0.3], [0.2, 1.0]])
    model = LinearGaussianModel(weight, 0.5)
    x = (
        dist.MultivariateNormal(torch.zeros(3), weight @ weight.T + 0.25 * torch.eye(3))
        .sample((16,))
        .reshape(16, *SHAPE)
    )
    guide = AmortizedNormalGuide(MLPEncoder(SHAPE, 2, hidden_dims=(16,)))
    return model, guide, x


def test_local_guide_starts_at_the_encoder_output(setup):
    model, guide, x = setup
    local = refine_locally(model, guide, x, num_steps=0).guide
    loc, scale = guide.encoder(x)
    torch.testing.assert_close(local.loc, loc)
    torch.testing.assert_close(local.distribution().base_dist.scale, scale + 1e-5)
    assert local(x).shape == (16, 2)
    with pytest.raises(ValueError, match="x: this local guide holds 16 points"):
        local(x[:3])


def test_refinement_raises_the_elbo_and_leaves_the_model_unchanged(setup):
    model, guide, x = setup
    before = [p.detach().clone() for p in list(model.parameters()) + list(guide.parameters())]
    result = refine_locally(model, guide, x, num_steps=150, learning_rate=0.05)
    after = list(model.parameters()) + list(guide.parameters())
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, after))
    assert all(p.requires_grad for p in after)
    amortized = monte_carlo_elbo(model, guide, x, num_samples=200)
    refined = monte_carlo_elbo(model, result.guide, x, num_samples=200)
    assert float(refined.mean()) > float(amortized.mean()) + 1.0  # untrained encoder
    assert len(result.elbo_trace) == 150


def test_gap_decomposition_finds_the_closed_form_meanfield_gap(setup):
    model, guide, x = setup
    report = gap_decomposition(
        model, guide, x, refine_steps=400, learning_rate=0.05, num_particles=4, elbo_samples=400, iw_samples=2000
    )
    error = report.per_example["log_likelihood"] - model.log_evidence(x).detach()
    # Each estimate is unbiased up to O(Var(w) / K); its spread across points sets the bound.
    assert float(error.mean().abs()) <= Z * float(error.std()) / math.sqrt(len(error))
    expected_gap = float(model.meanfield_gap())
    gaps = report.per_example["approximation_gap"]
    # Tolerance: ELBO Monte Carlo error plus a small allowance for unfinished optimisation
    # (stochastic Adam stops within ~0.01 nats of the optimum here).
    tolerance = Z * float(gaps.std()) / math.sqrt(len(gaps)) + 0.02
    assert report.approximation_gap == pytest.approx(expected_gap, abs=tolerance)
    assert expected_gap > 0.1  # the check is not vacuous: the posterior is correlated
    total = report.approximation_gap + report.amortization_gap
    assert total == pytest.approx(report.log_likelihood - report.elbo_amortized, abs=1e-9)


def test_flow_encoder_refines_its_context(setup):
    model, _, x = setup
    encoder = MLPEncoder(SHAPE, 2, hidden_dims=(16,))
    guide = AmortizedFlowGuide(encoder, "iaf", 1, hidden_dims=(8,))
    result = refine_locally(model, guide, x, num_steps=5, learning_rate=0.05)
    assert result.guide.context.shape == (16, encoder.feature_dim)
    assert {name for name, _ in result.guide.named_parameters()} == {"loc", "raw_scale", "context"}
    assert importance_log_likelihood(model, result.guide, x, num_samples=10).shape == (16,)


def test_invalid_arguments_are_rejected(setup):
    model, guide, x = setup
    with pytest.raises(ValueError, match="init"):
        refine_locally(model, guide, x, init="zeros")
    with pytest.raises(TypeError, match="guide: expected an amortized guide"):
        refine_locally(model, lambda x: None, x)
    with pytest.raises(ValueError, match="loc, scale"):
        LocalGuide(torch.zeros(3, 2), torch.ones(3, 3))


def test_a_two_level_guide_is_refused_with_a_reason():
    from vilab.models.vae.vae import VAEConfig, build_vae

    vae = build_vae(VAEConfig((1, 4, 4), latent_dim=2, encoder_hidden=(8,), decoder_hidden=(8,), latent_levels=2))
    x = torch.bernoulli(torch.full((3, 1, 4, 4), 0.5))
    with pytest.raises(
        TypeError,
        match="guide: local refinement needs a one-level guide .* HierarchicalNormalGuide with 4 latent numbers",
    ):
        refine_locally(vae.model, vae.guide, x)
