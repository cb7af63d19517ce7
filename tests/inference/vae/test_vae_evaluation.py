"""Evaluation on small VAEs: IS >= ELBO, and a collapsed posterior shows in every diagnostic."""

import copy
import math

import pytest
import torch

from vilab.datasets import make_loader
from vilab.inference.vae.objectives import ELBOLoss
from vilab.inference.vae.evaluation import (
    collapse_diagnostics,
    elbo_split,
    evaluate_vae,
    importance_sampled_log_likelihood,
    mutual_information,
)
from vilab.models.vae.vae import VAEConfig, build_vae

pytestmark = pytest.mark.float32
Z = 4.5


def _data(n=64):
    generator = torch.Generator().manual_seed(0)
    # Two prototype images plus pixel noise: enough structure for z to carry information.
    prototypes = (torch.rand(2, 1, 8, 8, generator=generator) > 0.5).float()
    labels = torch.randint(0, 2, (n,), generator=generator)
    flips = torch.rand(n, 1, 8, 8, generator=generator) < 0.05
    return (prototypes[labels] + flips.float()) % 2, labels


def _trained(guide="meanfield", steps=60):
    vae = build_vae(
        VAEConfig((1, 8, 8), latent_dim=4, guide=guide, num_flows=2, encoder_hidden=(32,), decoder_hidden=(32,))
    )
    x, _ = _data()
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    loss = ELBOLoss()
    for _ in range(steps):
        optimizer.zero_grad()
        loss(vae.model, vae.guide, x).loss.backward()
        optimizer.step()
    return vae


@pytest.fixture(scope="module")
def trained_vae():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    try:
        return _trained()
    finally:
        torch.set_default_dtype(previous)


def _collapse(vae):
    """Make q(z|x) = N(0, I) = p(z) for every x."""
    head = vae.guide.encoder.head
    with torch.no_grad():
        for layer in (head.loc, head.scale):
            layer.weight.zero_()
        head.loc.bias.zero_()
        head.scale.bias.fill_(math.log(math.expm1(1 - 1e-4)))
    return vae


def test_importance_sampled_log_likelihood_is_at_least_the_elbo(trained_vae):
    _assert_is_estimate_at_least_elbo(trained_vae)


@pytest.mark.slow
def test_importance_sampled_log_likelihood_is_at_least_the_elbo_with_a_flow_guide():
    _assert_is_estimate_at_least_elbo(_trained("iaf"))


def _assert_is_estimate_at_least_elbo(vae):
    x, y = _data()
    loader = make_loader(x, y, batch_size=64)
    split = elbo_split(vae, loader, num_samples=10)
    estimate = importance_sampled_log_likelihood(vae, loader, num_samples=200, chunk_size=100)
    difference = estimate.per_example - split.per_example
    tolerance = Z * difference.std() / math.sqrt(len(difference))
    assert difference.mean() > -tolerance
    assert split.elbo == pytest.approx(split.reconstruction - split.kl, abs=1e-4)
    assert estimate.stderr > 0 and estimate.per_example.shape == (64,)


def test_a_collapsed_posterior_is_visible_in_every_diagnostic(trained_vae):
    x, y = _data()
    loader = make_loader(x, y, batch_size=64)
    trained = collapse_diagnostics(trained_vae, loader)
    collapsed = collapse_diagnostics(_collapse(copy.deepcopy(trained_vae)), loader)
    assert trained.active_units >= 1 and trained.mutual_information > 0.3
    assert collapsed.active_units == 0
    assert collapsed.kl_per_dim.max() < 1e-3
    assert abs(collapsed.mutual_information) < 1e-4
    assert trained.kl_per_dim.sum() > 0.5


def test_flow_guides_report_what_they_cannot_compute():
    x, y = _data(40)
    loader = make_loader(x, y, batch_size=40)
    vae = build_vae(
        VAEConfig((1, 8, 8), latent_dim=3, guide="planar", num_flows=2, encoder_hidden=(16,), decoder_hidden=(16,))
    )
    report = collapse_diagnostics(vae, loader, num_samples=50)
    assert report.mutual_information is None and report.kl_per_dim is None
    assert "no analytic inverse" in report.note
    iaf = build_vae(
        VAEConfig((1, 8, 8), latent_dim=3, guide="iaf", num_flows=2, encoder_hidden=(16,), decoder_hidden=(16,))
    )
    assert mutual_information(iaf, loader) is not None


def test_evaluate_vae_gives_a_json_ready_record():
    x, y = _data(30)
    metrics = evaluate_vae(_trained(steps=5), make_loader(x, y, batch_size=30), iw_samples=20, chunk_size=7)
    assert metrics["num_examples"] == 30 and metrics["iw_samples"] == 20
    assert len(metrics["kl_per_dim"]) == metrics["latent_dim"] == 4
    assert isinstance(metrics["log_likelihood"], float)


class _OverflowingGuide:
    """A guide whose inverse overflows at other datapoints' samples (NaN off the diagonal)."""

    has_inverse = True

    def distribution(self, x):
        standard = torch.distributions.Normal(torch.zeros(x.shape[0], 2), 1.0)
        return torch.distributions.Independent(standard, 1)

    def log_density(self, x, z):
        own = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        return torch.where(torch.eye(x.shape[0], dtype=torch.bool), own, float("nan"))


def test_mutual_information_counts_an_overflowing_inverse_as_zero_density():
    x, y = _data(8)
    # Only log q(z_i | x_i) survives, so I = mean_i[log q_ii - (log q_ii - log M)] = log M.
    information = mutual_information(None, _OverflowingGuide(), make_loader(x, y, batch_size=8))
    assert information == pytest.approx(math.log(8), abs=1e-5)
