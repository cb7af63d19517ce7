"""Deep Markov model, its structured guide and the sequence data sets."""

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from vilab.datasets_sequential import image_rows, simulate_pendulum
from vilab.inference.vae.minibatch import fit_minibatch
from vilab.inference.vae.objectives import elbo_terms, iwae_bound, log_importance_weights
from vilab.models.vae.dmm import DMM, DeepMarkovModel

pytestmark = pytest.mark.float32
Z = 4.5


@pytest.fixture
def binary_batch():
    return torch.bernoulli(torch.full((5, 6, 4), 0.3))


def test_model_and_guide_sites_and_shapes(binary_batch):
    dmm = DMM(4, 3, rnn_dim=8, transition_dim=8, emission_dim=8)
    guide_trace = poutine.trace(dmm.guide).get_trace(binary_batch)
    model_trace = poutine.trace(poutine.replay(dmm.model, trace=guide_trace)).get_trace(binary_batch)
    latent = [n for n, s in guide_trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)]
    assert latent == [f"z_{t}" for t in range(1, 7)]
    assert model_trace.nodes["z_3"]["value"].shape == (5, 3)
    assert model_trace.nodes["x_6"]["value"].shape == (5, 4)
    assert dmm.reconstruct(binary_batch).shape == (5, 6, 4)
    assert dmm.forecast(binary_batch[:, :4], 3, num_samples=2).shape == (2, 5, 3, 4)
    path = dmm.model(batch_size=2, num_steps=7)
    assert path.shape == (2, 7, 3)


def test_vectorized_importance_weights_match_single_draws(binary_batch):
    dmm = DMM(4, 3, rnn_dim=8, transition_dim=8, emission_dim=8)
    log_w = log_importance_weights(dmm.model, dmm.guide, binary_batch, num_samples=3)
    assert log_w.shape == (3, 5)
    # One draw per call: the single-sample log-weight has the same distribution.
    pyro.set_rng_seed(1)
    vectorized = log_importance_weights(dmm.model, dmm.guide, binary_batch, num_samples=1)[0]
    pyro.set_rng_seed(1)
    guide_trace = poutine.trace(dmm.guide).get_trace(binary_batch)
    model_trace = poutine.trace(poutine.replay(dmm.model, trace=guide_trace)).get_trace(binary_batch)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    single = sum(
        s["log_prob"] for s in model_trace.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)
    ) - sum(s["log_prob"] for s in guide_trace.nodes.values() if s["type"] == "sample" and not site_is_subsample(s))
    torch.testing.assert_close(vectorized, single)


def test_analytic_kl_elbo_agrees_with_the_sampled_elbo_in_expectation(binary_batch):
    dmm = DMM(4, 3, rnn_dim=8, transition_dim=8, emission_dim=8)
    with torch.no_grad():
        analytic = torch.stack([elbo_terms(dmm.model, dmm.guide, binary_batch).elbo.sum() for _ in range(40)])
        sampled = log_importance_weights(dmm.model, dmm.guide, binary_batch, num_samples=2000).sum(-1)
    spread = math.sqrt(float(analytic.var()) / 40 + float(sampled.var()) / 2000)
    assert float(analytic.mean()) == pytest.approx(float(sampled.mean()), abs=Z * spread)


def test_gradients_reach_every_parameter(binary_batch):
    dmm = DMM(4, 3, rnn_dim=8, transition_dim=8, emission_dim=8)
    (-iwae_bound(dmm.model, dmm.guide, binary_batch, num_samples=2).sum()).backward()
    # The observation scale is used only by the Normal likelihood.
    missing = [
        n for n, p in dmm.named_parameters() if (p.grad is None or not p.grad.abs().sum()) and "raw_obs_scale" not in n
    ]
    assert missing == []


@pytest.mark.slow
def test_training_on_the_pendulum_raises_the_elbo():
    data = simulate_pendulum(60, 12, seed=1)
    assert data.train.shape == (40, 12, 2) and data.latent_states.shape == (10, 12, 2)
    dmm = DMM(2, 2, likelihood="normal", rnn_dim=16, transition_dim=16, emission_dim=16)
    before = float(elbo_terms(dmm.model, dmm.guide, data.test).elbo.mean())

    def loss(batch, step):
        return -elbo_terms(dmm.model, dmm.guide, batch).elbo.mean(), {}

    batches = [data.train[i : i + 10] for i in range(0, 40, 10)]
    fit_minibatch(dmm, loss, batches, num_epochs=15, learning_rate=1e-2)
    after = float(elbo_terms(dmm.model, dmm.guide, data.test).elbo.mean())
    assert after > before + 5


def test_invalid_inputs_name_the_argument():
    with pytest.raises(ValueError, match="likelihood"):
        DeepMarkovModel(4, 2, likelihood="poisson")
    with pytest.raises(ValueError, match=r"x: expected sequences of shape \(N, T, 4\)"):
        DMM(4, 2).model(torch.zeros(3, 5, 2))
    with pytest.raises(ValueError, match="batch_size, num_steps"):
        DMM(4, 2).model()
    with pytest.raises(ValueError, match="images"):
        image_rows(torch.zeros(2, 28, 28))
    with pytest.raises(ValueError, match="num_sequences"):
        simulate_pendulum(2)
