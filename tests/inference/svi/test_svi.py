r"""fit_svi against closed-form posteriors and evidences.

Tolerances are derived, not picked: the ELBO of a guide that can represent the posterior is
:math:`\log p(x) - \mathrm{KL}`, estimated from S draws with standard error SE; "reaches" means
within ``Z * SE + OPT_TOL`` where ``OPT_TOL`` (0.02 nats) is the optimisation budget. For a
Gaussian, KL <= 0.02 bounds the mean error by sqrt(2 KL) = 0.2 posterior sds.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.stats import norm

from vilab.inference import NonFiniteLossError, fit_svi, psis
from vilab.models import conjugate

Z = norm.ppf(1 - 0.001 / 2)  # two-sided, 0.1% failure budget per check
OPT_TOL = 0.02
MEAN_TOL = math.sqrt(2 * OPT_TOL)


def _elbo(result, num_samples=20000):
    return result.elbo_estimate(num_samples, seed=1)


def test_meanfield_reaches_normal_normal_posterior_and_evidence():
    x = conjugate.default_normal_data()
    result = fit_svi(
        conjugate.normal_normal,
        "meanfield",
        20,
        x,
        num_steps=2000,
        lr=0.05,
        lr_decay=0.01,
        early_stop=False,
        progress=False,
    )
    exact = conjugate.normal_normal_posterior(x)["loc"]
    log_evidence = conjugate.normal_normal_log_evidence(x)
    elbo, se = _elbo(result)
    assert elbo <= log_evidence + Z * se + 1e-9
    assert log_evidence - elbo <= Z * se + OPT_TOL
    median = result.guide.median(20, x)["loc"]
    assert abs(median - exact.mean) / exact.stddev < MEAN_TOL


def test_fullrank_reaches_linear_regression_posterior_and_evidence():
    features, y = conjugate.default_regression_data()
    result = fit_svi(
        conjugate.linear_regression,
        "fullrank",
        features,
        y,
        num_steps=2000,
        lr=0.05,
        lr_decay=0.01,
        early_stop=False,
        progress=False,
    )
    exact = conjugate.linear_regression_posterior(features, y)["beta"]
    log_evidence = conjugate.linear_regression_log_evidence(features, y)
    elbo, se = _elbo(result)
    assert log_evidence - elbo <= Z * se + OPT_TOL
    assert elbo <= log_evidence + Z * se + 1e-9
    draws = result.sample(4000, seed=2)["beta"]
    whitened = torch.linalg.solve_triangular(exact.scale_tril, (draws.mean(0) - exact.mean)[:, None], upper=False)
    assert whitened.norm() < MEAN_TOL + Z / math.sqrt(4000) * math.sqrt(3)


def test_meanfield_on_correlated_regression_pays_a_visible_kl_gap():
    features, y = conjugate.default_regression_data()
    result = fit_svi(
        conjugate.linear_regression,
        "meanfield",
        features,
        y,
        num_steps=2000,
        lr=0.05,
        lr_decay=0.01,
        early_stop=False,
        progress=False,
    )
    log_evidence = conjugate.linear_regression_log_evidence(features, y)
    elbo, se = _elbo(result)
    # The exact KL of the best diagonal Gaussian: 0.5 * log(det diag(Lambda) / det Lambda).
    precision = torch.linalg.inv(conjugate.linear_regression_posterior(features, y)["beta"].covariance_matrix)
    best_gap = 0.5 * float(torch.log(torch.diagonal(precision)).sum() - torch.logdet(precision))
    assert best_gap > 0.1
    assert log_evidence - elbo >= best_gap - Z * se
    assert log_evidence - elbo <= best_gap + Z * se + OPT_TOL


def test_beta_bernoulli_psis_corrected_mean_is_within_monte_carlo_error():
    x = conjugate.default_bernoulli_data()
    result = fit_svi(conjugate.beta_bernoulli, "meanfield", 30, x, num_steps=1500, lr=0.05, progress=False)
    exact = conjugate.beta_bernoulli_posterior(x)["probs"]
    samples, log_weights, _ = result.draws(8000, seed=3)  # a GuideSample unpacks like a tuple
    assert float(log_weights.mean()) <= conjugate.beta_bernoulli_log_evidence(x) + Z * float(
        log_weights.std()
    ) / math.sqrt(8000)
    smoothed = psis(log_weights.numpy())
    # No assertion on k-hat: the posterior has exponential tails in logit space, so the weights
    # p/q of any Gaussian guide, the converged one included, have tail index k = 1 (estimates
    # with 8000 draws range 0.5-6 from seed to seed); the smoothed mean is still checked.
    weights = np.exp(smoothed.log_weights - np.logaddexp.reduce(smoothed.log_weights))
    mean = float(np.sum(weights * samples["probs"].numpy()))
    assert abs(mean - float(exact.mean)) < Z * float(exact.stddev) / math.sqrt(smoothed.ess)


def test_iwae_and_analytic_kl_objectives_run():
    x = conjugate.default_normal_data()
    for elbo, particles in (("iwae", 4), ("meanfield", 2)):
        result = fit_svi(
            conjugate.normal_normal,
            "meanfield",
            20,
            x,
            num_steps=50,
            elbo=elbo,
            num_particles=particles,
            progress=False,
            early_stop=False,
        )
        assert len(result.losses) == 50 and np.isfinite(result.losses).all()


def test_early_stopping_marks_convergence():
    x = conjugate.default_normal_data()
    result = fit_svi(conjugate.normal_normal, "meanfield", 20, x, num_steps=5000, lr=0.05, progress=False)
    assert result.converged and result.num_steps < 5000


def test_nan_loss_stops_with_step_and_site_and_keeps_finite_parameters():
    calls = {"n": 0}

    def model():
        calls["n"] += 1
        z = pyro.sample("z", dist.Normal(torch.tensor(0.0), 1.0))
        pyro.factor("explodes", z * 0.0 + (float("nan") if calls["n"] > 12 else 0.0))

    # A call counter is Python state, which a traced step cannot see: this runs Pyro's SVI.
    with pytest.raises(NonFiniteLossError, match="non-finite at step") as info:
        # init="guide": the Laplace start's L-BFGS would call the model too and move the count.
        fit_svi(model, "meanfield", num_steps=100, progress=False, backend="pyro", init="guide")
    error = info.value
    # the model is called once by validation and once to set up the guide before step 0
    assert error.step == 10 and error.site == "explodes"
    assert len(error.result.losses) == 10
    for name, value in pyro.get_param_store().items():
        assert torch.isfinite(value).all(), name


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(num_steps=0), "num_steps: expected an int >= 1; got 0"),
        (dict(lr=-1.0), "lr: expected > 0"),
        (dict(elbo="nope"), "elbo: expected one of"),
        (dict(elbo="iwae", num_particles=1), "num_particles: the importance-weighted bound needs >= 2"),
    ],
)
def test_bad_configuration_is_named(bad, match):
    x = conjugate.default_normal_data()
    with pytest.raises((ValueError, TypeError), match=match):
        fit_svi(conjugate.normal_normal, "meanfield", 20, x, progress=False, **bad)


def test_nan_in_data_is_named():
    x = conjugate.default_normal_data()
    x[3] = float("nan")
    with pytest.raises(ValueError, match=r"args\[1\]: expected finite data; got 1 NaN/inf"):
        fit_svi(conjugate.normal_normal, "meanfield", 20, x, progress=False)


def test_wrong_data_shape_is_named():
    with pytest.raises(ValueError, match=r"x: expected shape \(20,\); got \(19,\)"):
        fit_svi(conjugate.normal_normal, "meanfield", 20, torch.zeros(19), progress=False)


def test_discrete_latent_site_says_to_enumerate():
    def model():
        z = pyro.sample("z", dist.Bernoulli(torch.tensor(0.3)))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))

    with pytest.raises(ValueError, match="site 'z' is a discrete latent variable.*enumerate"):
        fit_svi(model, "meanfield", progress=False)


def test_unknown_guide_is_a_clear_error():
    with pytest.raises(ValueError, match="known guides: meanfield, fullrank"):
        fit_svi(conjugate.normal_normal, "gaussian", 20, conjugate.default_normal_data(), progress=False)


def test_inference_data_when_a_site_shares_a_statistic_name():
    """posteriordb's mesquite observes a site called "log_weight", VI's sample statistic too."""

    def model(y):
        loc = pyro.sample("loc", dist.Normal(torch.tensor(0.0), 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("log_weight", dist.Normal(loc, 1.0), obs=y)

    result = fit_svi(model, "meanfield", torch.zeros(5), num_steps=20, progress=False)
    idata = result.inference_data(num_samples=50, seed=0)
    assert idata.sample_stats["log_weight"].dims == ("chain", "draw")
    assert idata.log_likelihood["log_weight"].shape == (1, 50, 5)


def unplated_normal_means(y):
    """A latent batched outside any plate, as Statistical Rethinking's NumPyro port writes it."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0).expand([3]))
    pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_fullrank_fits_a_latent_batched_outside_any_plate():
    # Each mu_i | y_i ~ N(y_i / 2, 1/2); the evidence is prod_i N(y_i; 0, 2).
    y = torch.tensor([1.0, 2.0, 0.5])
    result = fit_svi(unplated_normal_means, "fullrank", y, num_steps=2000, lr=0.05, progress=False)
    assert result.converged
    log_evidence = float(dist.Normal(0.0, math.sqrt(2.0)).log_prob(y).sum())
    elbo, se = _elbo(result)
    assert log_evidence - elbo <= Z * se + OPT_TOL
    assert elbo <= log_evidence + Z * se + 1e-9
    draws = result.draws(4000, seed=2)
    sd = math.sqrt(0.5)
    assert (draws.samples["mu"].mean(0) - y / 2).abs().max() / sd < MEAN_TOL + Z / math.sqrt(4000)
    assert (draws.samples["mu"].std(0) / sd - 1).abs().max() < MEAN_TOL + Z / math.sqrt(2 * 4000)
    # The observed site keeps one log-likelihood per element (what LOO reads).
    assert draws.log_likelihood["y"].shape == (4000, 3)
