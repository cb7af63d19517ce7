"""Enumerated discrete sites: posterior draws given each continuous draw, the marginal density,
and run_nuts / fit_svi / compare on Pyro's Gaussian-mixture tutorial model."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import config_enumerate
from scipy.stats import norm

from vilab.inference import compare, fit_svi, run_nuts
from vilab.inference.common.tracing import evaluate_draws, trace_model

K = 2
# Pyro's GMM tutorial data: two clusters.
DATA = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])
Z = norm.ppf(1 - 0.001 / 2)


@config_enumerate
def gmm(data):
    """Pyro's Gaussian-mixture tutorial model, as the tutorial writes it."""
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", K):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def _theta_draws(num_draws: int) -> dict:
    """Continuous draws near the two clusters, with either labelling."""
    generator = torch.Generator().manual_seed(1)
    flip = torch.rand(num_draws, generator=generator) < 0.5
    locs = torch.stack([torch.full((num_draws,), 0.5), torch.full((num_draws,), 11.0)], -1)
    locs = locs + 0.5 * torch.randn(num_draws, K, generator=generator)
    locs = torch.where(flip.unsqueeze(-1), locs.flip(-1), locs)
    weights = dist.Dirichlet(torch.tensor([2.0, 3.0])).sample((num_draws,))
    weights = torch.where(flip.unsqueeze(-1), weights.flip(-1), weights)
    return {"weights": weights, "scale": 0.8 + 0.4 * torch.rand(num_draws, generator=generator), "locs": locs}


def _conditional(theta: dict) -> torch.Tensor:
    r""":math:`p(z_i = k \mid y_i, \theta_s)`, shape ``(S, N, K)``."""
    log_p = theta["weights"].log().unsqueeze(1) + dist.Normal(
        theta["locs"].unsqueeze(1), theta["scale"][:, None, None]
    ).log_prob(DATA[:, None])
    return (log_p - log_p.logsumexp(-1, keepdim=True)).exp()


def _assert_posterior_assignments(theta: dict, assignment: torch.Tensor) -> None:
    """Each draw's ``z`` comes from its conditional posterior: the frequency of ``z_i = 1`` over
    draws matches the mean conditional probability within Monte Carlo error (prior draws,
    ``Categorical(weights)``, put about 40-60% of every point in each cluster)."""
    expected = _conditional(theta)[..., 1].mean(0)
    observed = (assignment == 1).double().mean(0)
    tolerance = Z * math.sqrt(0.25 / assignment.shape[0])
    assert ((observed - expected).abs() < tolerance).all(), (observed, expected)


def test_evaluated_draws_hold_posterior_assignments_and_loglik_given_them():
    theta = _theta_draws(200)
    evaluation = evaluate_draws(gmm, (DATA,), {}, theta, marginalize=False)
    assignment = evaluation["values"]["assignment"]
    assert assignment.shape == (200, len(DATA))
    _assert_posterior_assignments(theta, assignment)
    locs = theta["locs"].gather(1, assignment)
    expected = dist.Normal(locs, theta["scale"].unsqueeze(-1)).log_prob(DATA)
    assert torch.allclose(evaluation["log_likelihood"]["obs"], expected)


def test_log_joint_of_enumerated_model_is_the_marginal():
    from vilab.inference.common.enumeration import marginal_log_joint

    theta = _theta_draws(5)
    template = trace_model(gmm, (DATA,), {}, {k: v[0] for k, v in theta.items()})
    got = marginal_log_joint(gmm, (DATA,), {}, theta, template)
    prior = (
        dist.Dirichlet(0.5 * torch.ones(K)).log_prob(theta["weights"])
        + dist.LogNormal(0.0, 2.0).log_prob(theta["scale"])
        + dist.Normal(0.0, 10.0).log_prob(theta["locs"]).sum(-1)
    )
    log_p = theta["weights"].log().unsqueeze(1) + dist.Normal(
        theta["locs"].unsqueeze(1), theta["scale"][:, None, None]
    ).log_prob(DATA[:, None])
    assert torch.allclose(got, prior + log_p.logsumexp(-1).sum(-1))
    assert torch.allclose(evaluate_draws(gmm, (DATA,), {}, theta)["log_joint"], got)


@pytest.mark.slow
def test_run_nuts_draws_assignments_from_their_posterior():
    result = run_nuts(gmm, DATA, num_samples=150, num_warmup=150, num_chains=1, progress=False, backend="pyro")
    theta = {k: v[0] for k, v in result.samples.items() if k != "assignment"}
    assignment = result.samples["assignment"][0]
    _assert_posterior_assignments(theta, assignment)
    assert result.inference_data.posterior["assignment"].shape == (1, 150, len(DATA))


def test_compare_fits_guides_on_the_continuous_sites_of_an_enumerated_model():
    reference = _theta_draws(200)
    report = compare(
        gmm,
        DATA,
        guides=("meanfield",),
        reference=reference,
        num_draws=60,
        progress=False,
        svi_options={"num_steps": 60, "early_stop": False},
    )
    assert not report.failures
    method = report.methods["meanfield"]
    assert method.result.elbo == "enum"
    assignment = method.inference_data.posterior["assignment"].values
    assert assignment.shape == (1, 60, len(DATA))
    assert set(report.table["parameter"]) >= {"locs[1]", "locs[2]", "scale"}


def test_fit_svi_refuses_objectives_that_cannot_sum_out_enumerated_sites():
    with pytest.raises(ValueError, match="elbo: 'iwae' cannot sum out the enumerated site"):
        fit_svi(gmm, "meanfield", DATA, elbo="iwae", num_particles=2, progress=False)
    with pytest.raises(ValueError, match="guide: 'laplace' takes its Hessian"):
        fit_svi(gmm, "laplace", DATA, progress=False)
