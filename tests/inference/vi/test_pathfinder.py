"""Pathfinder and multi-path Pathfinder against closed-form posteriors.

Tolerances: a guide's ``N`` draws and ``N_ref`` exact draws; the difference of their means is
``sd * sqrt(1/N + 1/N_ref)`` in sd, that of their sds about ``sd * sqrt(1/(2N) + 1/(2N_ref))``.
``Z = 4.5`` gives a failure budget below 1e-5 per check.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from vilab.inference import compare, fit_svi, run_nuts
from vilab.inference.vi.density import LogDensity
from vilab.inference.vi.lbfgs_path import inverse_hessian_estimates, lbfgs_path
from vilab.inference.vi.mixture import GaussianMixtureGuide
from vilab.inference.vi.pathfinder import resample_draws
from vilab.models.conjugate import (
    default_normal_data,
    default_regression_data,
    linear_regression,
    linear_regression_posterior,
    normal_normal,
    normal_normal_log_evidence,
    normal_normal_posterior,
)

Z = 4.5
NUM_DRAWS, NUM_REFERENCE = 4000, 10000


def _assert_matches(report, method):
    table = report.table[report.table["method"] == method]
    mean_tolerance = Z * math.sqrt(1 / NUM_DRAWS + 1 / NUM_REFERENCE)
    sd_tolerance = Z * math.sqrt(1 / (2 * NUM_DRAWS) + 1 / (2 * NUM_REFERENCE))
    assert (table["mean_error_sd"].abs() < mean_tolerance).all(), table
    assert ((table["sd_ratio"] - 1).abs() < sd_tolerance).all(), table


def test_pathfinder_and_multipathfinder_match_the_normal_normal_posterior_through_compare():
    x = default_normal_data()
    reference = {"loc": normal_normal_posterior(x)["loc"].sample((NUM_REFERENCE,))}
    report = compare(
        normal_normal,
        20,
        x,
        guides=("pathfinder", "multipathfinder"),
        reference=reference,
        num_draws=NUM_DRAWS,
        progress=False,
    )
    for method in ("pathfinder", "multipathfinder"):
        _assert_matches(report, method)
        result = report.methods[method].result
        assert result.converged and result.config["gradient_evaluations"] > 0
        assert report.summary.loc[method, "gradient_evaluations"] == result.config["gradient_evaluations"]
        # Exact up to round-off: every draw's log weight is log p(x), so the ELBO is the evidence.
        assert report.summary.loc[method, "elbo"] == pytest.approx(normal_normal_log_evidence(x), abs=1e-8)
    assert report.methods["multipathfinder"].result.config["k_hat"] < 0.5


def test_pathfinder_matches_the_linear_regression_posterior():
    features, y = default_regression_data()
    posterior = linear_regression_posterior(features, y)["beta"]
    reference = {"beta": posterior.sample((NUM_REFERENCE,))}
    report = compare(
        linear_regression, features, y, guides=("pathfinder",), reference=reference, num_draws=NUM_DRAWS, progress=False
    )
    _assert_matches(report, "pathfinder")


def test_gradient_evaluations_count_every_objective_call():
    x = default_normal_data()
    result = fit_svi(normal_normal, "pathfinder", 20, x, progress=False)
    config = result.config
    # L-BFGS calls the objective at least once per iteration, plus the start.
    assert config["gradient_evaluations"] >= config["lbfgs_iterations"] + 1
    assert config["density_evaluations"] == config["num_elbo_draws"] * config["lbfgs_iterations"]
    assert result.name == "pathfinder" and 1 <= config["best_iteration"] <= config["lbfgs_iterations"]


def test_the_inverse_hessian_estimate_is_the_exact_inverse_on_a_one_dimensional_quadratic():
    x = default_normal_data()
    density = LogDensity(normal_normal, (20, x), {})
    path = lbfgs_path(
        density,
        torch.tensor([-1.5]),
        history_size=6,
        max_iterations=100,
        relative_tolerance=1e-12,
        gradient_tolerance=1e-10,
    )
    variance = normal_normal_posterior(x)["loc"].variance
    for estimate in inverse_hessian_estimates(path, 6):
        assert estimate.item() == pytest.approx(float(variance), rel=1e-8)


def test_multipathfinder_resampled_draws_match_the_linear_regression_posterior():
    features, y = default_regression_data()
    posterior = linear_regression_posterior(features, y)["beta"]
    result = fit_svi(linear_regression, "multipathfinder", features, y, progress=False)
    assert isinstance(result.guide, GaussianMixtureGuide) and result.converged
    assert result.config["k_hat"] < 0.5
    draws = resample_draws(result, 2000, seed=1)["beta"]
    # Resampling with replacement from 8000 proposals: ESS at least ~1400 of the 2000 draws
    # when the weights are near uniform; the tolerance uses 1000.
    sd = posterior.stddev
    assert ((draws.mean(0) - posterior.mean).abs() < Z * sd / math.sqrt(1000)).all()
    assert ((draws.std(0) - sd).abs() < Z * sd / math.sqrt(2 * 1000)).all()


def _unbatchable_model(x):
    """Normal-normal with a Python branch on the latent: neither an outer plate nor vmap runs it."""
    loc = pyro.sample("loc", dist.Normal(torch.tensor(0.0), 1.0))
    scale = 1.0 if loc < 1e6 else 2.0  # always 1 where the posterior lives
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(loc, scale), obs=x)


def test_a_model_that_refuses_batching_is_evaluated_point_by_point():
    x = default_normal_data()
    density = LogDensity(_unbatchable_model, (x,), {})
    assert not density.batched
    result = fit_svi(_unbatchable_model, "pathfinder", x, progress=False)
    exact = normal_normal_posterior(x)["loc"]
    assert not result.config["batched_density"]
    assert result.guide.loc.item() == pytest.approx(float(exact.mean), abs=1e-6)
    assert result.guide.scale.item() == pytest.approx(float(exact.stddev), rel=1e-6)


def test_bad_options_are_refused_before_any_work():
    x = default_normal_data()
    with pytest.raises(ValueError, match="history_size"):
        fit_svi(normal_normal, "pathfinder", 20, x, guide_options={"history_size": 0}, progress=False)
    with pytest.raises(ValueError, match="num_elbo_draws"):
        fit_svi(normal_normal, "pathfinder", 20, x, guide_options={"num_elbo_draws": 1}, progress=False)
    with pytest.raises(ValueError, match="num_paths"):
        fit_svi(normal_normal, "multipathfinder", 20, x, guide_options={"num_paths": 0}, progress=False)


def test_a_discrete_latent_is_refused():
    def model():
        pyro.sample("k", dist.Poisson(3.0).mask(False))
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="discrete"):
        LogDensity(model, (), {})


@pytest.mark.slow
def test_nuts_starts_from_pathfinder_and_samples_the_posterior():
    x = default_normal_data()
    result = run_nuts(
        normal_normal,
        20,
        x,
        init="pathfinder",
        num_warmup=150,
        num_samples=500,
        num_chains=2,
        chain_method="sequential",
        progress=False,
    )
    assert result.config["pathfinder"]["gradient_evaluations"] > 0
    exact = normal_normal_posterior(x)["loc"]
    draws = result.samples["loc"].reshape(-1)
    import arviz as az

    ess = float(az.ess(result.samples["loc"].numpy()))
    assert abs(draws.mean().item() - float(exact.mean)) < Z * float(exact.stddev) / math.sqrt(ess)


def test_nuts_init_is_checked():
    x = default_normal_data()
    with pytest.raises(ValueError, match="init: expected None or 'pathfinder'"):
        run_nuts(normal_normal, 20, x, init="laplace", progress=False)
    with pytest.raises(ValueError, match="init_values or init, not both"):
        run_nuts(normal_normal, 20, x, init="pathfinder", init_values={"loc": torch.tensor(0.0)}, progress=False)


def test_svi_options_a_method_does_not_run_are_refused_not_ignored():
    x = default_normal_data()
    with pytest.raises(TypeError, match="lr, num_steps: options of SVI on a guide.*'pathfinder'.*guide_options"):
        fit_svi(normal_normal, "pathfinder", 20, x, num_steps=5, lr=0.1, progress=False)


def test_compare_gives_svi_options_to_the_svi_guides_only():
    x = default_normal_data()
    reference = {"loc": normal_normal_posterior(x)["loc"].sample((2000,))}
    report = compare(
        normal_normal,
        20,
        x,
        guides=("pathfinder", "meanfield"),
        reference=reference,
        svi_options={"num_steps": 300},
        num_draws=200,
        progress=False,
    )
    assert not report.failures and report.summary.loc["meanfield", "num_steps"] <= 300


def test_a_failed_start_is_replaced_by_a_fresh_one_and_reported(monkeypatch):
    from vilab.inference.vi import pathfinder

    real, calls = pathfinder.pathfinder_path, []

    def fails_first(density, start, generator, **options):
        calls.append(start.clone())
        if len(calls) == 1:
            raise RuntimeError("pathfinder: none of the 2 L-BFGS iterates gave a Gaussian with a finite ELBO")
        return real(density, start, generator, **options)

    monkeypatch.setattr(pathfinder, "pathfinder_path", fails_first)
    x = default_normal_data()
    with pytest.warns(RuntimeWarning, match="1 start.s. failed and were replaced"):
        result = fit_svi(normal_normal, "pathfinder", 20, x, seed=0, progress=False)
    assert len(calls) == 2 and not torch.equal(calls[0], calls[1])
    assert result.config["failed_starts"] == 1
    posterior = normal_normal_posterior(x)["loc"]
    # Gaussian posterior: Pathfinder's best iterate is exact up to L-BFGS's tolerance.
    assert torch.allclose(result.guide.median()["loc"], posterior.mean, atol=1e-4 * float(posterior.stddev))


def test_every_start_failing_is_an_error_naming_each_failure(monkeypatch):
    from vilab.inference.vi import pathfinder

    def always_fails(density, start, generator, **options):
        raise RuntimeError("no finite ELBO")

    monkeypatch.setattr(pathfinder, "pathfinder_path", always_fails)
    with pytest.raises(RuntimeError, match="every one of 3 start.s. failed: no finite ELBO; no finite ELBO"):
        fit_svi(normal_normal, "pathfinder", 20, default_normal_data(), guide_options={"max_starts": 3})
    with pytest.raises(ValueError, match="max_starts"):
        fit_svi(normal_normal, "pathfinder", 20, default_normal_data(), guide_options={"max_starts": 0})


def test_pathfinder_recovers_from_a_plateau_start_on_posteriordb_hmm_example(posteriordb_path):
    """Seed 1's uniform start lies where L-BFGS stops after two iterates with no finite ELBO."""
    from vilab.inference.sweep.problems import load_problem

    problem = load_problem("posteriordb/hmm_example-hmm_example", posteriordb_path)
    with pytest.warns(RuntimeWarning, match="start.s. failed"):
        result = fit_svi(problem.model, "pathfinder", *problem.args, seed=1, **problem.kwargs)
    assert result.config["failed_starts"] >= 1 and math.isfinite(result.config["elbo"])
