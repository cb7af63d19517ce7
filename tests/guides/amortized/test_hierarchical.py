"""The two-level latent and its amortized guide: the joint density, shapes under a particle
plate, gradients to every parameter, save/load, and the scoring the diagnostics rely on."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from vilab.guides.amortized.encoders import MLPEncoder
from vilab.guides.amortized.hierarchical import ConditionalGaussian, HierarchicalNormalGuide, TwoLevelLatent
from vilab.inference.vae.checkpoints import load_module, save_module

IMAGE = (1, 6, 6)
TOP, LOWER = 3, 2


def make_guide(hidden_layer="gated"):
    encoder = MLPEncoder(IMAGE, TOP, hidden_dims=(16,), hidden_layer=hidden_layer)
    lower = ConditionalGaussian(TOP, LOWER, hidden_dims=(16, 16), context_dim=36, hidden_layer=hidden_layer)
    return HierarchicalNormalGuide(encoder, lower)


@pytest.fixture
def x():
    return torch.bernoulli(torch.full((4, *IMAGE), 0.5))


def test_joint_density_is_top_plus_conditional():
    conditional = ConditionalGaussian(TOP, LOWER, hidden_dims=(8,))
    top = dist.Normal(torch.randn(4, TOP), torch.rand(4, TOP) + 0.5).to_event(1)
    joint = TwoLevelLatent(top, conditional, LOWER)
    value = torch.randn(5, 4, LOWER + TOP)
    z1, z2 = value[..., :LOWER], value[..., LOWER:]
    loc, scale = conditional(z2)
    expected = top.log_prob(z2) + dist.Normal(loc, scale).log_prob(z1).sum(-1)
    torch.testing.assert_close(joint.log_prob(value), expected)
    assert joint.batch_shape == (4,) and joint.event_shape == (LOWER + TOP,)


def test_joint_density_integrates_to_one():
    # One number per level, so the density can be integrated on a grid.
    conditional = ConditionalGaussian(1, 1, hidden_dims=(8,))
    joint = TwoLevelLatent(dist.Normal(torch.zeros(1), torch.ones(1)).to_event(1), conditional, 1)
    grid = torch.linspace(-12, 12, 1201)
    z1, z2 = torch.meshgrid(grid, grid, indexing="ij")
    density = joint.log_prob(torch.stack([z1, z2], -1)).exp()
    mass = torch.trapezoid(torch.trapezoid(density, grid, dim=0), grid)
    assert abs(mass.item() - 1) < 1e-6


def test_draws_follow_the_conditional():
    conditional = ConditionalGaussian(TOP, LOWER, hidden_dims=(8,))
    joint = TwoLevelLatent(dist.Normal(torch.zeros(TOP), torch.ones(TOP)).to_event(1), conditional, LOWER)
    n = 20000
    draws = joint.sample((n,))
    loc, scale = conditional(draws[:, LOWER:])
    standardised = (draws[:, :LOWER] - loc) / scale
    # Mean 0 and variance 1 within 4.5 standard errors (sd 1 and sqrt(2) per coordinate).
    assert standardised.mean(0).abs().max() < 4.5 / math.sqrt(n)
    assert (standardised.var(0) - 1).abs().max() < 4.5 * math.sqrt(2 / n)
    assert draws[:, LOWER:].mean(0).abs().max() < 4.5 / math.sqrt(n)


def test_guide_samples_have_plate_and_particle_shapes(x):
    guide = make_guide()
    trace = poutine.trace(guide).get_trace(x)
    assert trace.nodes["z"]["value"].shape == (4, LOWER + TOP)
    with pyro.plate("particles", 7, dim=-2):
        trace = poutine.trace(guide).get_trace(x)
    trace.compute_log_prob()
    assert trace.nodes["z"]["value"].shape == (7, 4, LOWER + TOP)
    assert trace.nodes["z"]["log_prob"].shape == (7, 4)


def test_scoring_its_own_draw_reuses_the_conditional_and_agrees(x):
    q = make_guide().distribution(x)
    z = q.rsample((3,))
    torch.testing.assert_close(q.log_prob(z), q.log_prob(z.clone()))


@pytest.mark.parametrize("hidden_layer", ["gated", "elu"])
def test_gradients_reach_every_parameter(hidden_layer, x, parameters_without_gradient):
    assert not parameters_without_gradient(make_guide(hidden_layer), x)


def test_save_load_round_trip_gives_the_same_density(x, tmp_path):
    guide = make_guide()
    save_module(guide, str(tmp_path / "g.safetensors"))
    other = make_guide()
    load_module(other, str(tmp_path / "g.safetensors"))
    z = guide.distribution(x).sample((5,))
    torch.testing.assert_close(other.log_density(x, z), guide.log_density(x, z))


def test_pairwise_scoring_matches_one_pair_at_a_time(x):
    # The mutual-information estimate scores every draw under every datapoint's q.
    guide = make_guide()
    z = guide.distribution(x).sample()
    pairwise = guide.log_density(x, z.unsqueeze(1).expand(4, 4, LOWER + TOP))
    for i in range(4):
        for j in range(4):
            expected = guide.log_density(x[j : j + 1], z[i : i + 1])
            torch.testing.assert_close(pairwise[i, j : j + 1], expected)


def test_quantiles_of_the_top_level_are_the_encoders_normal(x):
    guide = make_guide()
    loc, scale = guide.encoder(x)
    n = 4000
    quantiles = guide.quantiles([0.25, 0.5], x, num_samples=n)["z"]
    assert quantiles.shape == (2, 4, LOWER + TOP)
    # Empirical quantile error: sqrt(p(1-p)/n) / density at the quantile, in units of scale.
    for k, p in enumerate([0.25, 0.5]):
        exact = dist.Normal(loc, scale).icdf(torch.tensor(p))
        density = dist.Normal(0.0, 1.0).log_prob(dist.Normal(0.0, 1.0).icdf(torch.tensor(p))).exp()
        tolerance = 4.5 * math.sqrt(p * (1 - p) / n) / density * scale
        assert ((quantiles[k, :, LOWER:] - exact).abs() < tolerance).all()
    assert guide.median(x, num_samples=50)["z"].shape == (4, LOWER + TOP)


def test_standard_normal_start_ignores_the_input():
    conditional = ConditionalGaussian(TOP, LOWER, hidden_dims=(8,), context_dim=5)
    conditional.start_as_standard_normal()
    loc, scale = conditional(torch.randn(6, TOP), conditional.project_context(torch.randn(6, 5)))
    torch.testing.assert_close(loc, torch.zeros(6, LOWER))
    torch.testing.assert_close(scale, torch.ones(6, LOWER))


def test_bad_sizes_are_clear_errors():
    encoder = MLPEncoder(IMAGE, TOP, hidden_dims=(8,))
    with pytest.raises(ValueError, match="lower: expected input_dim=3 .* context_dim=36"):
        HierarchicalNormalGuide(encoder, ConditionalGaussian(TOP + 1, LOWER, context_dim=36))
    with pytest.raises(ValueError, match="hidden_dims: expected at least one"):
        ConditionalGaussian(TOP, LOWER, hidden_dims=())
    with pytest.raises(ValueError, match="context: this conditional was built with context_dim=0"):
        ConditionalGaussian(TOP, LOWER, hidden_dims=(8,)).project_context(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"top: expected a distribution with event shape \(D2,\)"):
        TwoLevelLatent(dist.Normal(0.0, 1.0), ConditionalGaussian(1, 1, hidden_dims=(4,)), 1)
