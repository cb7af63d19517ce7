"""Objectives against closed forms on a linear-Gaussian model where log p(x) is known:
z ~ N(0, 1), x | z ~ N(z, 1), so p(x) = N(0, 2) and p(z | x) = N(x / 2, 1 / 2)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from vilab.inference.vae.objectives import (
    ELBOLoss,
    IWAELoss,
    KLAnnealing,
    PyroELBOLoss,
    as_loss,
    elbo_terms,
    free_bits_kl,
    iwae_bound,
    log_importance_weights,
)
from vilab.inference.vae.evaluation import importance_sampled_log_likelihood

Z = 4.5  # standard errors; a per-assertion failure budget of about 1e-5


def model(x):
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def make_guide(shift=0.0, scale=math.sqrt(0.5)):
    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(x / 2 + shift, scale).to_event(1))

    return guide


@pytest.fixture(autouse=True)
def _data():
    # Built per test so they take the suite's default dtype (float64).
    global X, LOG_EVIDENCE
    X = torch.tensor([[-1.0], [0.3], [2.0]])
    LOG_EVIDENCE = dist.Normal(0.0, math.sqrt(2.0)).log_prob(X).squeeze(-1)


def test_exact_posterior_makes_every_bound_equal_the_evidence():
    guide = make_guide()
    torch.testing.assert_close(elbo_terms(model, guide, X, analytic_kl=False).elbo, LOG_EVIDENCE)
    torch.testing.assert_close(iwae_bound(model, guide, X, num_samples=3), LOG_EVIDENCE)


def test_analytic_kl_matches_the_closed_form_and_is_split_per_dimension():
    guide = make_guide(shift=0.4, scale=0.5)
    terms = elbo_terms(model, guide, X)
    loc = X.squeeze(-1) / 2 + 0.4
    expected = torch.log(torch.tensor(1 / 0.5)) + (0.25 + loc**2) / 2 - 0.5
    torch.testing.assert_close(terms.kl, expected)
    assert terms.kl_per_dim.shape == (3, 1)


def test_mean_log_weight_is_the_closed_form_elbo():
    # ELBO = log p(x) - KL(q(z|x) || p(z|x)) with p(z|x) = N(x/2, 1/2).
    shift, scale = 0.4, 0.5
    log_w = log_importance_weights(model, make_guide(shift, scale), X, num_samples=20000)
    q = dist.Normal(X.squeeze(-1) / 2 + shift, scale)
    posterior = dist.Normal(X.squeeze(-1) / 2, math.sqrt(0.5))
    expected = LOG_EVIDENCE - torch.distributions.kl_divergence(q, posterior)
    tolerance = Z * log_w.std(0) / math.sqrt(len(log_w))
    assert ((log_w.mean(0) - expected).abs() < tolerance).all()


def test_iwae_bound_tightens_with_more_samples_and_stays_below_the_evidence():
    guide = make_guide(shift=0.8, scale=0.4)
    repeats = 400
    log_w = log_importance_weights(model, guide, X, num_samples=repeats * 50).reshape(repeats, 50, 3)
    bound_1 = log_w[:, 0]
    bound_50 = torch.logsumexp(log_w, 1) - math.log(50)
    assert (bound_50.mean(0) > bound_1.mean(0)).all()
    slack = Z * bound_50.std(0) / math.sqrt(repeats)
    assert (bound_50.mean(0) < LOG_EVIDENCE + slack).all()
    assert iwae_bound(model, guide, X, num_samples=5).shape == (3,)


def test_importance_sampled_log_likelihood_recovers_the_evidence_within_its_error():
    guide = make_guide(shift=0.3, scale=0.9)
    loader = [X, X[:1]]
    estimate = importance_sampled_log_likelihood(model, guide, loader, num_samples=5000, chunk_size=700)
    expected = torch.cat([LOG_EVIDENCE, LOG_EVIDENCE[:1]])
    assert estimate.per_example.shape == (4,) and estimate.monte_carlo_stderr > 0
    # The estimator's bias is O(1/K), far below its Monte Carlo error at K = 5000.
    assert abs(estimate.mean - expected.mean().item()) < Z * estimate.monte_carlo_stderr
    log_w = log_importance_weights(model, guide, X, num_samples=11)
    assert log_w.shape == (11, 3)


def test_kl_annealing_ramps_linearly_then_holds():
    schedule = KLAnnealing(warmup_steps=10, start=0.0, end=1.0)
    assert [schedule(s) for s in (0, 5, 10, 99)] == [0.0, 0.5, 1.0, 1.0]
    cyclical = KLAnnealing(warmup_steps=10, num_cycles=2)
    assert [cyclical(s) for s in (0, 5, 9, 10, 12, 25)] == [0.0, 1.0, 1.0, 0.0, 0.4, 1.0]
    with pytest.raises(ValueError, match="warmup_steps"):
        KLAnnealing(warmup_steps=-1)


def test_free_bits_stop_gradients_of_dimensions_under_the_floor():
    loc = torch.tensor([[0.01], [0.02]], requires_grad=True)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    terms = elbo_terms(model, guide, X[:2])
    free_bits_kl(terms, 0.5).backward()
    assert loc.grad.abs().sum() == 0
    assert free_bits_kl(terms, 0.5).item() == pytest.approx(2 * 0.5)
    torch.testing.assert_close(free_bits_kl(terms, 0.0), terms.kl.sum())


def test_losses_share_one_interface():
    guide = make_guide()
    for loss in (
        ELBOLoss(beta=KLAnnealing(5)),
        IWAELoss(4),
        PyroELBOLoss(pyro.infer.Trace_ELBO()),
        as_loss("elbo"),
        as_loss("trace"),
        as_loss("iwae"),
    ):
        output = loss(model, guide, X, step=2)
        assert output.loss.dim() == 0 and torch.isfinite(output.loss)
    torch.testing.assert_close(as_loss("trace")(model, guide, X).loss, -LOG_EVIDENCE.mean())
    with pytest.raises(ValueError, match="loss: expected"):
        as_loss("kl")
