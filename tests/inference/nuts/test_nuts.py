r"""run_nuts against closed-form posteriors, its record's contents, and its errors.

Tolerances are the Monte Carlo error: a posterior mean is within ``Z * sd / sqrt(ESS)`` and a
posterior sd within ``Z * sd / sqrt(2 ESS)`` (the asymptotic sd of a sample sd), ESS from ArviZ.
"""

import math
import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.stats import norm

from vilab.inference import run_nuts
from vilab.models import conjugate, get_model

Z = norm.ppf(1 - 0.001 / 2)


def _check_against(idata, name, exact_mean, exact_sd, index=()):
    draws = idata.posterior[name].values[(Ellipsis,) + index]
    ess = float(az.ess(draws[None] if draws.ndim == 1 else draws))
    mean, sd = draws.mean(), draws.std()
    assert abs(mean - exact_mean) < Z * exact_sd / math.sqrt(ess), (name, index, mean, exact_mean, ess)
    assert abs(sd - exact_sd) < Z * exact_sd / math.sqrt(2 * ess), (name, index, sd, exact_sd, ess)


def test_normal_normal_matches_the_exact_posterior():
    x = conjugate.default_normal_data()
    result = run_nuts(conjugate.normal_normal, 20, x, num_samples=500, num_warmup=300, num_chains=2, progress=False)
    exact = conjugate.normal_normal_posterior(x)["loc"]
    _check_against(result.inference_data, "loc", float(exact.mean), float(exact.stddev))


def test_linear_regression_matches_the_exact_posterior():
    features, y = conjugate.default_regression_data()
    result = run_nuts(
        conjugate.linear_regression, features, y, num_samples=500, num_warmup=300, num_chains=2, progress=False
    )
    exact = conjugate.linear_regression_posterior(features, y)["beta"]
    for j in range(3):
        _check_against(result.inference_data, "beta", float(exact.mean[j]), float(exact.stddev[j]), (j,))


@pytest.fixture(scope="module")
def eight_schools_run():
    torch.set_default_dtype(torch.float64)
    model, args, kwargs = get_model("eight_schools").load()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return run_nuts(model, *args, num_samples=100, num_warmup=100, num_chains=2, progress=False, **kwargs)


def test_samples_hold_latent_and_deterministic_sites(eight_schools_run):
    samples = eight_schools_run.samples
    assert set(samples) == {"mu", "tau", "eta", "theta"}
    assert samples["eta"].shape == (2, 100, 8) and samples["theta"].shape == (2, 100, 8)
    assert torch.allclose(samples["theta"], samples["mu"][..., None] + samples["tau"][..., None] * samples["eta"])


def test_inference_data_has_every_group_and_named_dims(eight_schools_run):
    idata = eight_schools_run.inference_data
    assert {"posterior", "sample_stats", "log_likelihood", "observed_data"} <= set(idata.groups())
    for stat in ("diverging", "energy", "tree_depth", "step_size", "acceptance_rate", "n_steps", "lp"):
        assert idata.sample_stats[stat].shape == (2, 100), stat
    assert idata.posterior["theta"].dims == ("chain", "draw", "school")
    assert idata.log_likelihood["obs"].shape == (2, 100, 8)
    assert np.all(np.isfinite(az.bfmi(idata)))
    assert eight_schools_run.num_divergences == int(idata.sample_stats["diverging"].sum())
    assert eight_schools_run.wall_time > 0


def test_pyro_backend_runs_chains_in_processes_and_records_stats():
    x = conjugate.default_normal_data()
    result = run_nuts(
        conjugate.normal_normal,
        20,
        x,
        num_samples=200,
        num_warmup=150,
        num_chains=2,
        backend="pyro",
        chain_method="parallel",
        progress=False,
    )
    assert result.config["backend"] == "pyro"
    assert result.samples["loc"].shape == (2, 200)
    assert result.sample_stats["tree_depth"].min() >= 1
    exact = conjugate.normal_normal_posterior(x)["loc"]
    _check_against(result.inference_data, "loc", float(exact.mean), float(exact.stddev))


def test_a_model_written_for_one_chain_runs_vectorized_under_vmap_and_samples_correctly():
    matrix = torch.tensor([[1.0, 0.5], [0.2, 1.0], [1.0, -1.0]])
    y = torch.tensor([0.3, -0.2, 1.0])

    def model():  # matrix algebra on a latent vector, no plates: not batchable by an outer plate
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(matrix @ z, 1.0).to_event(1), obs=y)

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        result = run_nuts(model, num_samples=400, num_warmup=200, num_chains=2, progress=False)
    assert result.config["backend"] == "vectorized" and result.config["batching"] == "vmap"
    exact = conjugate.linear_regression_posterior(matrix, y)["beta"]
    for j in range(2):
        _check_against(result.inference_data, "z", float(exact.mean[j]), float(exact.stddev[j]), (j,))


def test_python_control_flow_on_a_latent_falls_back_loudly_and_samples_correctly():
    def model(y):  # a branch on a latent's value: neither a chain plate nor vmap can batch it
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        scale = 1.0 if loc > 10.0 else 0.5  # the second branch has prior mass ~1e-23: exact posterior below
        pyro.sample("y", dist.Normal(loc, scale), obs=y)

    with pytest.warns(RuntimeWarning, match="falling back to Pyro's NUTS.*slower.*control flow"):
        result = run_nuts(model, torch.tensor(1.0), num_samples=400, num_warmup=200, num_chains=2, progress=False)
    # Normal(0, 1) prior, one observation with sd 0.5: posterior N(0.8, sqrt(0.2)).
    _check_against(result.inference_data, "loc", 0.8, 0.2**0.5)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(num_chains=0), "num_chains: expected an int >= 1; got 0"),
        (dict(num_samples=2.5), "num_samples: expected an int"),
        (dict(target_accept=1.5), r"target_accept: expected a number in \(0, 1\)"),
        (dict(backend="gpu"), "backend: expected 'auto', 'vectorized' or 'pyro'"),
        (dict(chain_method="threads"), "chain_method: expected"),
    ],
)
def test_bad_configuration_is_named(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        run_nuts(conjugate.normal_normal, 20, conjugate.default_normal_data(), progress=False, **bad)


def test_nan_data_is_named():
    x = conjugate.default_normal_data()
    x[0] = float("inf")
    with pytest.raises(ValueError, match=r"args\[1\]: expected finite data"):
        run_nuts(conjugate.normal_normal, 20, x, progress=False)


def _two_modes():
    # z**2 observed at 64: modes at -8 and +8 (sd about 1/16) with 2000 nats of barrier between.
    z = pyro.sample("z", dist.Normal(0.0, 10.0))
    pyro.sample("y", dist.Normal(z**2, 1.0), obs=torch.tensor(64.0))
    pyro.sample("scale", dist.HalfNormal(1.0))


@pytest.mark.parametrize("backend", ["vectorized", "pyro"])
def test_chains_start_where_init_values_put_them(backend):
    options = dict(
        num_samples=100, num_warmup=100, num_chains=2, progress=False, backend=backend, chain_method="sequential"
    )
    result = run_nuts(_two_modes, init_values={"z": torch.tensor([-8.0, 8.0])}, **options)
    means = result.samples["z"].mean(1)
    assert means[0] < -6 and means[1] > 6, means
    assert result.config["init_values"] == ["z"]
    same = run_nuts(_two_modes, init_values={"z": 8.0, "scale": 0.5}, **options)  # one value for every chain
    assert (same.samples["z"].mean(1) > 6).all()


@pytest.mark.parametrize(
    "init, match",
    [
        ({"w": 1.0}, r"init_values: 'w' is not a latent site.*\['scale', 'z'\]"),
        ({"z": torch.zeros(3)}, r"init_values\['z'\]: expected shape \(\) or \(2,\) \(one per chain\); got \(3,\)"),
        ({"scale": -1.0}, r"init_values\['scale'\]: outside the support of HalfNormal"),
        ([1.0], "init_values: expected a dict"),
        ({"z": 1e200, "scale": 0.5}, "init_values: the log density or its gradient is not finite at the given values"),
    ],
)
def test_bad_init_values_are_named(init, match):
    with pytest.raises((ValueError, TypeError), match=match):
        run_nuts(_two_modes, num_samples=10, num_warmup=10, num_chains=2, progress=False, init_values=init)


def test_a_covariance_that_fails_its_cholesky_is_a_divergence_not_a_crash():
    """A correlation with a Uniform(-1.5, 1.5) prior: where |rho| >= 1 the covariance is not
    positive-definite and MultivariateNormal's Cholesky raises. Stan and NumPyro count such a
    point as a divergence; the posterior is the one on |rho| < 1, computed here by quadrature."""
    x = torch.tensor([[1.0, 0.8], [-0.5, -0.7], [0.3, 0.1], [1.2, 1.5], [-1.0, -0.4]])

    def model(x):
        rho = pyro.sample("rho", dist.Uniform(-1.5, 1.5))
        cov = torch.stack([torch.stack([torch.ones(()), rho]), torch.stack([rho, torch.ones(())])])
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.MultivariateNormal(torch.zeros(2), covariance_matrix=cov), obs=x)

    grid = torch.linspace(-0.999, 0.999, 20001, dtype=torch.float64)
    log_lik = torch.stack(
        [dist.MultivariateNormal(torch.zeros(2), torch.tensor([[1.0, r], [r, 1.0]])).log_prob(x).sum() for r in grid]
    )
    weights = torch.softmax(log_lik, 0)
    mean = float((weights * grid).sum())
    sd = float((weights * (grid - mean) ** 2).sum().sqrt())
    result = run_nuts(model, x, num_samples=500, num_warmup=300, num_chains=2, seed=1, progress=False)
    draws = result.inference_data.posterior["rho"].values
    assert np.all(np.abs(draws) < 1.0)
    _check_against(result.inference_data, "rho", mean, sd)


def test_a_model_with_its_own_shape_asserts_runs_under_vmap_and_samples_correctly():
    """NumPyro's BNN example asserts its weights' shapes, which a chain plate breaks: the sampler
    and the draw evaluation must batch it with vmap, not crash."""
    y = torch.tensor([0.3, -0.2, 1.0, 0.8])

    def model(y):
        loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        assert loc.shape == (2,)
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(loc.sum(), 1.0), obs=y)

    result = run_nuts(model, y, num_samples=400, num_warmup=200, num_chains=2, progress=False)
    assert result.config["batching"] == "vmap"
    # loc_1 + loc_2 ~ N(0, 2) a priori; four N(s, 1) observations: s | y ~ N(2 * sum(y) / 9, sqrt(2 / 9)).
    draws = result.inference_data.posterior["loc"].values.sum(-1)
    ess = float(az.ess(draws))
    exact_mean, exact_sd = 2 * float(y.sum()) / 9, (2 / 9) ** 0.5
    assert abs(draws.mean() - exact_mean) < Z * exact_sd / math.sqrt(ess)
    assert abs(draws.std() - exact_sd) < Z * exact_sd / math.sqrt(2 * ess)


def test_chains_that_disagree_are_flagged_by_r_hat():
    """x^2 observed: two well-separated modes at +-20, one chain started in each. Every draw is
    from a mode, but the chains never mix, so the pooled draws are no posterior's; R-hat says so."""

    def model(y):
        x = pyro.sample("x", dist.Normal(0.0, 30.0))
        pyro.sample("y", dist.Normal(x**2, 1.0), obs=y)

    with pytest.warns(RuntimeWarning, match="R-hat .* > 1.01 at site 'x': the chains disagree"):
        run_nuts(
            model,
            torch.tensor(400.0),
            num_samples=200,
            num_warmup=200,
            num_chains=2,
            init_values={"x": torch.tensor([-20.0, 20.0])},
            progress=False,
        )
