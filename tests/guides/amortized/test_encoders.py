"""Encoders and the flow-guide contract, run over every guide: shapes, exact log-density
against an autograd Jacobian, gradients to every parameter, save/load round trip."""

import pyro
import pytest
import torch
from pyro import poutine

from vilab.guides.amortized.flows import FLOWS, AmortizedFlowGuide
from vilab.guides.amortized.encoders import AmortizedNormalGuide, ConvEncoder, MLPEncoder, build_encoder
from vilab.inference.vae.checkpoints import load_module, save_module

LATENT = 3
IMAGE = (1, 8, 8)


def make_guide(kind):
    encoder = MLPEncoder(IMAGE, LATENT, hidden_dims=(16,))
    if kind == "meanfield":
        return AmortizedNormalGuide(encoder)
    return AmortizedFlowGuide(encoder, kind, num_flows=2, hidden_dims=(16,))


@pytest.fixture
def x():
    return torch.bernoulli(torch.full((4, *IMAGE), 0.5))


@pytest.mark.parametrize("encoder_kind", ["mlp", "conv"])
def test_encoder_returns_loc_and_positive_scale(encoder_kind, x):
    encoder = build_encoder(encoder_kind, IMAGE, LATENT, hidden_dims=(16,))
    loc, scale = encoder(x)
    assert loc.shape == scale.shape == (4, LATENT) and (scale > 0).all()
    assert encoder.features(x).shape == (4, encoder.feature_dim)


def test_conv_encoder_rejects_sizes_it_cannot_halve_twice():
    with pytest.raises(ValueError, match="divisible by 4"):
        ConvEncoder((1, 6, 6), 2)


@pytest.mark.parametrize("kind", ("meanfield",) + FLOWS)
def test_guide_samples_have_plate_and_particle_shapes(kind, x):
    guide = make_guide(kind)
    trace = poutine.trace(guide).get_trace(x)
    assert trace.nodes["z"]["value"].shape == (4, LATENT)
    assert trace.nodes["data"]["type"] == "sample"  # the "data" plate
    with pyro.plate("particles", 7, dim=-2):
        trace = poutine.trace(guide).get_trace(x)
    trace.compute_log_prob()
    assert trace.nodes["z"]["value"].shape == (7, 4, LATENT)
    assert trace.nodes["z"]["log_prob"].shape == (7, 4)


@pytest.mark.parametrize("kind", FLOWS)
def test_flow_log_density_matches_the_autograd_jacobian(kind, x):
    guide = make_guide(kind)
    q = guide.distribution(x)
    z0 = q.base_dist.sample()

    def push(z):
        for transform in q.transforms:
            z = transform(z)
        return z

    jacobian = torch.autograd.functional.jacobian(push, z0)  # (4, D, 4, D)
    blocks = torch.stack([jacobian[i, :, i, :] for i in range(len(z0))])
    log_det = torch.linalg.slogdet(blocks)[1]
    z = push(z0)
    expected = q.base_dist.log_prob(z0) - log_det
    torch.testing.assert_close(q.log_prob(z), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["iaf", "spline"])
def test_invertible_flows_score_arbitrary_points(kind, x):
    guide = make_guide(kind)
    q = guide.distribution(x)
    z = q.sample((5,))
    torch.testing.assert_close(guide.log_density(x, z), q.log_prob(z), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("kind", ["planar", "radial", "sylvester"])
def test_non_invertible_flows_refuse_arbitrary_points(kind, x):
    with pytest.raises(NotImplementedError, match="no analytic inverse"):
        make_guide(kind).log_density(x, torch.zeros(4, LATENT))


@pytest.mark.parametrize("kind", ("meanfield",) + FLOWS)
def test_gradients_reach_every_parameter(kind, x, parameters_without_gradient):
    assert not parameters_without_gradient(make_guide(kind), x)


@pytest.mark.parametrize("kind", ("meanfield",) + FLOWS)
def test_save_load_round_trip_gives_the_same_density(kind, x, tmp_path):
    guide = make_guide(kind)
    save_module(guide, str(tmp_path / "g.safetensors"))
    other = make_guide(kind)
    load_module(other, str(tmp_path / "g.safetensors"))
    q, q_other = guide.distribution(x), other.distribution(x)
    z0 = q.base_dist.sample()
    torch.testing.assert_close(q_other.base_dist.log_prob(z0), q.base_dist.log_prob(z0))
    for t, t_other in zip(getattr(q, "transforms", []), getattr(q_other, "transforms", [])):
        torch.testing.assert_close(t_other(z0), t(z0))


def test_flow_guide_validates_its_options():
    encoder = MLPEncoder(IMAGE, 1, hidden_dims=(8,))
    with pytest.raises(ValueError, match="flow: expected one of"):
        AmortizedFlowGuide(encoder, "maf")
    with pytest.raises(ValueError, match="latent_dim >= 2"):
        AmortizedFlowGuide(encoder, "iaf")
    with pytest.raises(TypeError, match="encoder: expected a module with `features`"):
        AmortizedFlowGuide(torch.nn.Linear(2, 2), "planar")


def test_gaussian_guide_quantiles_are_the_closed_form_normal_quantiles(x):
    guide = make_guide("meanfield")
    loc, scale = guide.encoder(x)
    levels = torch.tensor([0.05, 0.5, 0.975])
    quantiles = guide.quantiles(levels, x)["z"]
    assert quantiles.shape == (3, 4, LATENT)
    expected = torch.distributions.Normal(loc, scale).icdf(levels.reshape(-1, 1, 1))
    torch.testing.assert_close(quantiles, expected)
    torch.testing.assert_close(guide.median(x)["z"], quantiles[1])
    with pytest.raises(ValueError, match="strictly between 0 and 1; got \\[0.5, 1.0\\]"):
        guide.quantiles([0.5, 1.0], x)


@pytest.mark.parametrize("kind", FLOWS)
def test_flow_guide_quantiles_have_the_right_coverage_per_datapoint(kind, x):
    guide = make_guide(kind)
    levels = [0.1, 0.5, 0.9]
    num_samples, num_fresh = 2000, 4000
    quantiles = guide.quantiles(levels, x, num_samples=num_samples)["z"]
    assert quantiles.shape == (3, 4, LATENT)
    assert guide.median(x)["z"].shape == (4, LATENT)
    with torch.no_grad():
        fresh = guide.distribution(x).sample((num_fresh,))
    # P(z_d < q_hat) is p up to binomial error from both the estimate and the fresh draws;
    # z = 4.5 over 3 levels x 4 datapoints x 3 coordinates: failure rate ~2e-4 per flow.
    for level, estimate in zip(levels, quantiles):
        coverage = (fresh < estimate).double().mean(0)
        sd = (level * (1 - level) * (1 / num_samples + 1 / num_fresh)) ** 0.5
        assert ((coverage - level).abs() < 4.5 * sd).all()
