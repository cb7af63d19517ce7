"""fit_svi's Laplace start, scale-free steps and convergence test, against closed-form posteriors."""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from vilab.inference.svi.convergence import IterateMonitor, split_rhat
from vilab.inference.nuts.api import run_nuts
from vilab.inference.svi.api import fit_svi

# Tolerances: the fitted loc and scale are averages of SGD iterates over a 500-step window; at the
# optimum their own fluctuation is a few hundredths of a posterior sd (measured: < 0.05 on
# these models), so 0.1 sd and 10% on the sd, the accuracy the Gaussian families must reach.
MEAN_TOL_SD, SD_RATIO_TOL = 0.1, 0.1

SCALES = (1e-3, 1e3)
MEANS = (1.0, -2.0)
RHO = 0.9


def _covariance():
    scales = torch.tensor(SCALES)
    correlation = torch.tensor([[1.0, RHO], [RHO, 1.0]])
    return scales.unsqueeze(-1) * correlation * scales


def badly_scaled():
    """A correlated Gaussian posterior whose coordinates have sd 1e-3 and 1e3."""
    pyro.sample("z", dist.MultivariateNormal(torch.tensor(MEANS), covariance_matrix=_covariance()))


def _guide_moments(result):
    posterior = result.guide.get_posterior() if hasattr(result.guide, "get_posterior") else None
    if posterior is not None and hasattr(posterior, "covariance_matrix"):
        return posterior.mean.detach(), posterior.covariance_matrix.detach()
    loc, scale = result.guide._get_loc_and_scale("z")  # AutoNormal
    return loc.detach(), torch.diag(scale.detach() ** 2)


@pytest.mark.parametrize(
    "guide, backend",
    [
        ("meanfield", "auto"),
        ("fullrank", "auto"),
        ("lowrank", "auto"),
        ("laplace", "auto"),
        ("meanfield", "pyro"),
        ("fullrank", "pyro"),
    ],
)
def test_a_badly_scaled_posterior_converges_for_every_gaussian_family(guide, backend):
    # backend="pyro": Pyro's SVI with ScaledClippedAdam takes the same sd-scaled steps.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = fit_svi(
            badly_scaled,
            guide,
            progress=False,
            backend=backend,
            guide_options={"rank": 1} if guide == "lowrank" else None,
        )
    assert result.converged
    assert result.config["init"].startswith("Laplace")
    loc, covariance = _guide_moments(result)
    target = _covariance()
    if guide == "meanfield":  # the KL-optimal diagonal Gaussian: variances 1 / diag(precision)
        target = torch.diag(1.0 / torch.linalg.inv(target).diagonal())
    assert ((loc - torch.tensor(MEANS)).abs() / torch.tensor(SCALES)).max() < MEAN_TOL_SD
    ratio = (covariance.diagonal() / target.diagonal()).sqrt()
    assert ((ratio - 1).abs() < SD_RATIO_TOL).all()
    if guide != "meanfield":
        correlation = covariance[0, 1] / covariance.diagonal().prod().sqrt()
        assert abs(float(correlation) - RHO) < 0.02


def test_a_run_stopped_by_its_budget_is_not_converged_and_warns():
    x = torch.randn(50) + 3.0
    with pytest.warns(RuntimeWarning, match="did not converge in 150 steps"):
        result = fit_svi(_normal_model, "meanfield", x, num_steps=150, init="guide", progress=False)
    assert not result.converged
    assert result.config["convergence"]["reason"]


def improper(y):
    """``sigma`` has a flat prior on (0, inf) and no data about it: the posterior is improper."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.sample("sigma", dist.HalfNormal(1.0).mask(False))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


@pytest.mark.parametrize("guide", ["meanfield", "fullrank"])
def test_an_improper_posterior_is_not_called_converged(guide):
    y = torch.randn(20)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        result = fit_svi(improper, guide, y, num_steps=2000, progress=False)
    assert not result.converged
    assert "no Laplace start" in result.config["init"]


def _normal_model(y):
    """The README quickstart's model."""
    mu, sigma = pyro.sample("mu", dist.Normal(0.0, 10.0)), pyro.sample("sigma", dist.HalfNormal(5.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, sigma), obs=y)


def _quickstart_posterior(y, size=801):
    """Exact posterior means and sds of (mu, sigma) by quadrature on a grid spanning +-12 sds."""
    n, mean, sd = len(y), float(y.mean()), float(y.std())
    mu = torch.linspace(mean - 12 * sd / math.sqrt(n), mean + 12 * sd / math.sqrt(n), size)
    sigma = torch.linspace(sd * 0.4, sd * 2.2, size)
    grid_mu, grid_sigma = torch.meshgrid(mu, sigma, indexing="ij")
    log_density = (
        dist.Normal(0.0, 10.0).log_prob(grid_mu)
        + dist.HalfNormal(5.0).log_prob(grid_sigma)
        + dist.Normal(grid_mu.unsqueeze(-1), grid_sigma.unsqueeze(-1)).log_prob(y).sum(-1)
    )
    weights = torch.softmax(log_density.reshape(-1), 0).reshape(log_density.shape)
    moments = {}
    for name, grid in (("mu", grid_mu), ("sigma", grid_sigma)):
        first = float((weights * grid).sum())
        moments[name] = (first, math.sqrt(float((weights * grid**2).sum()) - first**2))
    return moments


def _quickstart_errors(guide, seed):
    torch.manual_seed(seed)
    y = torch.randn(50) + 3.0
    exact = _quickstart_posterior(y)
    result = fit_svi(_normal_model, guide, y, seed=seed, progress=False)
    draws = result.sample(20000, seed=seed)
    return result, {name: abs(float(draws[name].mean()) - m) / s for name, (m, s) in exact.items()}


# 20000 draws: the Monte Carlo error of a mean is 0.007 sd, small beside the 0.2 sd asked for.
@pytest.mark.parametrize("guide", ["meanfield", "iaf"])
def test_the_readme_quickstart_lands_within_a_fifth_of_a_posterior_sd(guide):
    result, errors = _quickstart_errors(guide, seed=0)
    assert max(errors.values()) < 0.2, errors


@pytest.mark.slow
@pytest.mark.parametrize("guide", ["meanfield", "fullrank", "lowrank", "iaf"])
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_the_readme_quickstart_lands_within_a_fifth_of_a_posterior_sd_on_five_seeds(guide, seed):
    result, errors = _quickstart_errors(guide, seed=seed)
    assert max(errors.values()) < 0.2, errors


def test_gradient_evaluations_are_counted_for_svi_and_nuts():
    y = torch.randn(20) + 1.0
    svi = fit_svi(_normal_model, "meanfield", y, num_steps=200, num_particles=2, progress=False, early_stop=False)
    start = svi.config["gradient_evaluations"] - 2 * svi.num_steps
    assert start > 0  # the Laplace start's L-BFGS and Hessian
    nuts = run_nuts(
        _normal_model, y, num_samples=30, num_warmup=30, num_chains=2, progress=False, chain_method="sequential"
    )
    sampling = int(nuts.sample_stats["n_steps"].sum())
    assert nuts.config["gradient_evaluations"] > sampling >= 60


def test_split_rhat_flags_a_drifting_chain_and_passes_white_noise():
    generator = np.random.default_rng(0)
    noise = generator.standard_normal((4, 250, 3))
    assert (split_rhat(noise) < 1.05).all()
    drifting = noise + np.linspace(0, 5, 1000).reshape(4, 250, 1)
    assert (split_rhat(drifting) > 1.5).all()


def test_the_monitor_averages_the_last_window():
    monitor = IterateMonitor(2, window=8, num_splits=4)
    for step in range(12):
        monitor.record(torch.tensor([float(step), 1.0]))
    assert monitor.ready
    assert torch.allclose(monitor.average(), torch.tensor([7.5, 1.0], dtype=torch.float64))


NUM_OBS = 1000
Y_SUBSAMPLED = 1.0 + torch.randn(NUM_OBS, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def subsampled_mean(y):
    """Ten of a thousand points per step: the loss's noise is many nats."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(y), subsample_size=10) as ind:
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y[ind])


@pytest.mark.slow
def test_a_subsampled_fit_earns_converged_on_the_full_data():
    """Before the full-data check this run reported converged at step 2000 with an sd 1.79
    times the posterior's; now it converges with the right sd or says it did not."""
    precision = 1 / 100 + NUM_OBS
    sd = precision**-0.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit_svi(
            subsampled_mean, "meanfield", Y_SUBSAMPLED, init="guide", lr=0.01, num_steps=6000, seed=2, progress=False
        )
    draws = result.sample(4000, seed=0)["mu"]
    if result.converged:
        assert abs(float(draws.std()) / sd - 1) < SD_RATIO_TOL + 3.3 / math.sqrt(2 * 4000)
    else:
        assert any("did not converge" in str(w.message) for w in caught)
