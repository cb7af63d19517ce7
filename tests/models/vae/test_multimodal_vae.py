"""Multimodal VAE with a product-of-experts guide: PoE algebra, sites, estimators."""

import math

import numpy as np
import pytest
import torch
from pyro import poutine

from vilab.guides.amortized.poe import LabelEncoder, PoEGuide, product_of_experts
from vilab.models.vae.multimodal import build_multimodal_vae

Z = 4.5
SHAPE = (1, 4, 4)


@pytest.fixture
def pairs():
    return torch.bernoulli(torch.full((6, *SHAPE), 0.4)), torch.tensor([0, 1, 2, 0, 1, 2])


def test_product_of_experts_is_the_normalised_product_of_densities():
    locs = [torch.randn(5, 3), torch.randn(5, 3)]
    scales = [torch.rand(5, 3) + 0.2, torch.rand(5, 3) + 0.2]
    loc, scale = product_of_experts(locs, scales)
    normal = torch.distributions.Normal
    z = torch.randn(7, 5, 3)
    summed = sum(normal(m, s).log_prob(z) for m, s in zip(locs, scales)) + normal(0, 1).log_prob(z)
    difference = normal(loc, scale).log_prob(z) - summed
    # log q(z) - sum of expert log densities must not depend on z.
    torch.testing.assert_close(difference, difference[:1].expand_as(difference))
    single = product_of_experts(locs[:1], scales[:1], prior_expert=False)
    torch.testing.assert_close(single[0], locs[0])
    torch.testing.assert_close(single[1], scales[0])
    with pytest.raises(ValueError, match="locs, scales"):
        product_of_experts(locs, scales[:1])
    with pytest.raises(ValueError, match="locs"):
        product_of_experts([], [])


def test_model_sites_follow_the_observed_modalities(pairs):
    x, y = pairs
    vae = build_multimodal_vae(SHAPE, 3, 2, hidden_dims=(8,))
    for args, sites in (((x, y), {"z", "x", "y"}), ((x, None), {"z", "x"}), ((None, y), {"z", "y"})):
        guide_trace = poutine.trace(vae.guide).get_trace(*args)
        trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(*args)
        names = {n for n, s in trace.nodes.items() if s["type"] == "sample" and n != "data"}
        assert names == sites
    prior = poutine.trace(vae.model).get_trace(batch_size=4)
    assert prior.nodes["x"]["value"].shape == (4, *SHAPE) and prior.nodes["y"]["value"].shape == (4,)
    with pytest.raises(ValueError, match="x, y: expected at least one"):
        vae.guide()
    with pytest.raises(ValueError, match="batch_size"):
        vae.model()
    with pytest.raises(ValueError, match="y: expected long labels in 0..2"):
        vae.guide(None, torch.tensor([3]))


def test_loss_gradients_reach_every_parameter(pairs):
    vae = build_multimodal_vae(SHAPE, 3, 2, hidden_dims=(8,))
    vae.loss(*pairs).backward()
    assert [n for n, p in vae.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []


def test_label_posterior_is_normalised_and_scores_are_shaped(pairs):
    x, y = pairs
    vae = build_multimodal_vae(SHAPE, 3, 2, hidden_dims=(8,))
    posterior = vae.label_posterior(x, num_samples=50)
    torch.testing.assert_close(torch.logsumexp(posterior, -1), torch.zeros(6))
    scores = vae.log_likelihoods(x, y, num_samples=50)
    assert set(scores) == {"joint", "image", "label", "label_given_image", "image_given_label", "correct"}
    assert all(v.shape == (6,) for v in scores.values())
    assert vae.sample_images(y).shape == (6, *SHAPE)


def test_label_marginal_matches_gauss_hermite_quadrature():
    vae = build_multimodal_vae(SHAPE, 3, 1, hidden_dims=(8,))
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    z = torch.as_tensor(nodes).unsqueeze(-1)
    probs = torch.softmax(vae.model.label_decoder(z), -1).detach()
    exact = (torch.as_tensor(weights).unsqueeze(-1) * probs).sum(0) / math.sqrt(2 * math.pi)
    y = torch.arange(3)
    with torch.no_grad():
        log_w, _ = vae._log_weights(None, y, None, y, 20000)
    w = log_w.exp()
    tolerance = Z * w.std(0) / math.sqrt(w.shape[0])
    assert ((w.mean(0) - exact).abs() <= tolerance).all(), (w.mean(0), exact)


def test_label_encoder_expert_shapes():
    loc, scale = LabelEncoder(4, 3)(torch.tensor([0, 3]))
    assert loc.shape == scale.shape == (2, 3) and (scale > 0).all()
    assert isinstance(PoEGuide(torch.nn.Identity(), LabelEncoder(4, 3)).latent_dim, int)
