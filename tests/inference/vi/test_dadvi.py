"""DADVI against closed forms.

For a Gaussian posterior :math:`\\mathcal N(m, P^{-1})` the DADVI objective on draws :math:`z_m` is
quadratic in :math:`\\mu`: stationarity gives :math:`\\hat\\mu = m - \\hat\\sigma \\odot \\bar z` exactly,
and the :math:`\\mu` block of its Hessian is :math:`P`, with cross block
:math:`P\\,\\mathrm{diag}(\\sigma \\odot \\bar z)`. So with antithetic draws (:math:`\\bar z = 0`)
:math:`\\hat\\mu = m` and the LRVB covariance is :math:`P^{-1}` for any draws; with i.i.d. draws
:math:`\\hat\\mu` is off by exactly :math:`\\hat\\sigma \\odot \\bar z`, and in one dimension
:math:`\\hat\\sigma = (P S)^{-1/2}` with :math:`S` the draws' (1/M) variance.

Tolerances: a converged fit has Newton decrement :math:`\\delta < 10^{-5}`, the distance to the
optimum in the metric of the Hessian, so each coordinate is within :math:`\\delta` times its
sd under :math:`H^{-1}` (the LRVB sd for a mean); 1e-4 of a posterior sd leaves a margin of 10.
"""

import math
import os
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from vilab.inference.comparison.api import compare
from vilab.inference.svi.api import fit_svi
from vilab.inference.vi.dadvi import DADVIObjective, fit_dadvi
from vilab.models.conjugate import (
    linear_regression,
    linear_regression_posterior,
    normal_normal,
    default_normal_data,
    normal_normal_posterior,
)

TOLERANCE_SD = 1e-4  # see the module docstring


@pytest.fixture
def regression_data():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(40, 3, generator=generator)
    features[:, 2] += 0.8 * features[:, 0]  # correlated coefficients: mean field alone misses them
    y = features @ torch.tensor([1.0, -2.0, 0.5]) + torch.randn(40, generator=generator)
    return features, y


def test_normal_normal_antithetic_mean_and_lrvb_are_exact():
    x = torch.randn(20, generator=torch.Generator().manual_seed(1)) + 1.0
    posterior = normal_normal_posterior(x)["loc"]
    result = fit_svi(normal_normal, "dadvi", 20, x, progress=False)
    assert result.converged and result.name == "dadvi"
    sd = float(posterior.stddev)
    assert abs(float(result.guide.loc.detach()[0]) - float(posterior.mean)) < TOLERANCE_SD * sd
    assert result.config["lrvb_covariance"][0][0] == pytest.approx(sd**2, rel=1e-9)


def test_normal_normal_iid_draws_match_the_fixed_draw_closed_form():
    x = torch.randn(20, generator=torch.Generator().manual_seed(1)) + 1.0
    posterior = normal_normal_posterior(x)["loc"]
    draws = torch.randn(30, 1, generator=torch.Generator().manual_seed(7))
    result = fit_dadvi(normal_normal, 20, x, draws=draws, progress=False)
    precision, mean_z = float(posterior.stddev) ** -2, float(draws.mean())
    scale = 1.0 / math.sqrt(precision * float(draws.var(unbiased=False)))
    sd = float(posterior.stddev)
    assert result.converged
    assert float(result.guide.scale.detach()[0]) == pytest.approx(scale, rel=TOLERANCE_SD)
    assert abs(float(result.guide.loc.detach()[0]) - (float(posterior.mean) - scale * mean_z)) < TOLERANCE_SD * sd
    assert abs(mean_z) > 0.05  # so the check above tells the fixed-draw error from none


def test_linear_regression_mean_and_lrvb_covariance_are_exact(regression_data):
    features, y = regression_data
    posterior = linear_regression_posterior(features, y)["beta"]
    result = fit_svi(linear_regression, "dadvi", features, y, progress=False)
    sd = posterior.stddev
    assert result.converged
    assert ((result.guide.loc.detach() - posterior.mean).abs() < TOLERANCE_SD * sd).all()
    np.testing.assert_allclose(result.config["lrvb_covariance"], posterior.covariance_matrix.numpy(), rtol=1e-8)
    # The mean-field sd alone under-states the spread of correlated coefficients; LRVB restores it.
    assert (result.guide.scale.detach() < 0.95 * sd).any()


def test_linear_regression_iid_means_are_off_by_exactly_sigma_times_mean_draw(regression_data):
    features, y = regression_data
    posterior = linear_regression_posterior(features, y)["beta"]
    draws = torch.randn(30, 3, generator=torch.Generator().manual_seed(5))
    result = fit_dadvi(linear_regression, features, y, draws=draws, progress=False)
    expected = posterior.mean - result.guide.scale.detach() * draws.mean(0)
    assert result.converged
    assert ((result.guide.loc.detach() - expected).abs() < TOLERANCE_SD * posterior.stddev).all()


def test_gradient_evaluations_count_draws_and_twice_the_draws_per_hessian_vector_product():
    calls = {"points": 0}

    def log_density(z):
        calls["points"] += z.shape[0]
        return -0.5 * (z**2).sum(-1)

    objective = DADVIObjective(log_density, torch.randn(6, 2))
    x = np.zeros(4)
    objective.value_and_grad(x)
    objective.value_and_grad(x)  # the same point: cached, not evaluated again
    objective.hessp(x, np.ones(4))
    assert calls["points"] == 6 and objective.gradient_evaluations == 6 + 2 * 6
    # F = 1/2 |mu|^2 + 1/2 sum sigma^2 mean(z^2) - sum log sigma - const: Hessian blocks I and
    # 2 diag(mean z^2) at sigma = 1, cross block diag(mean z).
    hessian = objective.hessian(x)
    draws = objective.draws
    expected = np.block(
        [
            [np.eye(2), np.diag(draws.mean(0).numpy())],
            [np.diag(draws.mean(0).numpy()), np.diag(2 * (draws**2).mean(0).numpy())],
        ]
    )
    np.testing.assert_allclose(hessian, expected, atol=1e-12)


def test_result_counts_and_records_the_optimiser(regression_data):
    features, y = regression_data
    result = fit_dadvi(linear_regression, features, y, num_draws=10, progress=False)
    config = result.config
    assert config["gradient_evaluations"] > 0 and config["gradient_evaluations"] % 10 == 0
    assert config["newton_decrement"] < config["tolerance"] and config["vectorized"]
    assert set(config["lrvb_sd"]) == {"beta[1]", "beta[2]", "beta[3]"}
    assert len(result.losses) == config["iterations"] + config["newton_steps"]


def test_improper_posterior_is_not_converged():
    def flat_only():  # log p(a) = a with a flat prior: no maximum, nothing to converge to
        a = pyro.sample("a", dist.Normal(0.0, 1.0).mask(False))
        pyro.factor("tilt", a)

    with pytest.warns(RuntimeWarning, match="no LRVB covariance"):
        result = fit_dadvi(flat_only, max_iterations=5, progress=False)
    assert not result.converged and result.config["lrvb_error"] and result.config["lrvb_sd"] is None


def test_model_written_for_one_point_is_vectorised_under_vmap(regression_data):
    features, y = regression_data

    def matrix_regression(features, y):  # features @ beta cannot take a plate of beta; vmap can
        beta = pyro.sample("beta", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(features @ beta, 1.0).to_event(1), obs=y)

    posterior = linear_regression_posterior(features, y)["beta"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = fit_dadvi(matrix_regression, features, y, num_draws=6, progress=False)
    assert result.converged and result.config["vectorized"]
    assert ((result.guide.loc.detach() - posterior.mean).abs() < TOLERANCE_SD * posterior.stddev).all()


def test_model_with_control_flow_on_a_latent_is_evaluated_point_by_point(regression_data):
    features, y = regression_data

    def branching_regression(features, y):  # a Python branch on a latent: neither a plate nor vmap
        beta = pyro.sample("beta", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        noise = 1.0 if beta[0] < 1e6 else 2.0  # always 1 where the posterior lives
        pyro.sample("y", dist.Normal(features @ beta, noise).to_event(1), obs=y)

    posterior = linear_regression_posterior(features, y)["beta"]
    with pytest.warns(RuntimeWarning, match="one point at a time"):
        result = fit_dadvi(branching_regression, features, y, num_draws=6, progress=False)
    assert result.converged and not result.config["vectorized"]
    assert ((result.guide.loc.detach() - posterior.mean).abs() < TOLERANCE_SD * posterior.stddev).all()


def test_compare_reports_the_lrvb_sd_beside_the_mean_field_sd(regression_data):
    features, y = regression_data
    posterior = linear_regression_posterior(features, y)["beta"]
    reference = {"beta": posterior.sample((10000,))}
    report = compare(
        linear_regression, features, y, guides=("dadvi",), reference=reference, num_draws=1000, progress=False
    )
    table = report.table.set_index("parameter")
    # sd ratio error: 10000 reference draws and 4000 LRVB draws, relative sd errors
    # 1/sqrt(2 n) each; z = 4.
    tolerance = 4 * math.sqrt(1 / 20000 + 1 / 8000)
    assert (table["lrvb_sd_ratio"] - 1).abs().max() < tolerance
    assert "mean_abs_log_lrvb_sd_ratio" in report.summary.columns and report.summary.loc["dadvi", "converged"]
    from vilab.inference.report.save import markdown_report
    from vilab.inference.report.html import render_comparison_html

    assert "lrvb_sd_ratio" in markdown_report(report, {}) and "LRVB sd ratio" in render_comparison_html(report, {})


@pytest.mark.parametrize(
    "options,match",
    [
        ({"num_draws": 7}, "num_draws: expected an even number"),
        ({"optimizer": "adam"}, "optimizer: expected one of"),
        ({"gtol": 0.0}, "gtol: expected a positive number"),
        ({"draws": torch.zeros(4, 2)}, r"draws: expected shape \(M, 1\)"),
    ],
)
def test_bad_options_are_refused_before_any_work(options, match):
    with pytest.raises(ValueError, match=match):
        fit_dadvi(normal_normal, 5, torch.zeros(5), progress=False, **options)


def test_discrete_latents_are_refused():
    def discrete():
        pyro.sample("k", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match="DADVI needs continuous latent sites"):
        fit_dadvi(discrete, progress=False)


PORTED = os.path.join(os.path.dirname(__file__), "..", "..", "data", "posteriordb")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "kidiq-kidscore_interaction",
        "kidiq-kidscore_momhsiq",
        "kidiq_with_mom_work-kidscore_interaction_z",
        "earnings-earn_height",
        "earnings-logearn_interaction_z",
        "earnings-logearn_logheight_male",
        "mesquite-mesquite",
        "mesquite-logmesquite_logvash",
        "kilpisjarvi_mod-kilpisjarvi",
    ],
)
def test_dadvi_on_ported_regressions_is_within_a_tenth_of_a_reference_sd(name):
    from vilab.inference.common.diagnostics import psis
    from vilab.samples import flatten_samples
    from vilab.posteriordb import load_posteriordb

    problem = load_posteriordb(PORTED, name)
    result = fit_svi(problem.model, "dadvi", *problem.args, progress=False, **problem.kwargs)
    assert result.converged
    draws = result.draws(4000, seed=1)
    flat = flatten_samples(draws.samples, 1)
    summary = problem.reference_summary["parameters"]
    # The issue asks for means within 0.1 sd where k-hat < 0.5; on these near-Gaussian
    # regressions DADVI's means meet it whatever the k-hat of its mean-field guide (which misses
    # the correlations), and the LRVB sd must be within 10% everywhere. Monte Carlo error of a
    # mean of 4000 guide draws: at most 0.016 sd.
    k_hat = psis(draws.log_weights.numpy()).k_hat
    for key, reference in summary.items():
        assert 0.9 < result.config["lrvb_sd"][key] / reference["sd"] < 1.1, key
        assert abs(flat[key].mean() - reference["mean"]) < 0.1 * reference["sd"], (key, k_hat)


def test_stalled_conjugate_gradients_go_on_with_trust_exact_and_say_so(monkeypatch):
    """scipy's trust-ncg loops for ever on a non-finite Hessian-vector product (posteriordb's
    arma11, seed 1, hung a sweep): the run must end, from the last iterate, with trust-exact."""
    from vilab.inference.vi import dadvi

    real = dadvi.DADVIObjective.hessp
    calls = []

    def overflowing(self, x, vector):
        calls.append(1)
        product = real(self, x, vector)
        return product * np.inf if len(calls) == 3 else product

    monkeypatch.setattr(dadvi.DADVIObjective, "hessp", overflowing)
    x = default_normal_data()
    with pytest.warns(
        RuntimeWarning,
        match="trust-ncg stalled after .* iterations .non-finite Hessian-vector product.; went on with trust-exact",
    ):
        result = fit_svi(normal_normal, "dadvi", 20, x, progress=False)
    assert "trust-exact" in result.config["optimizer_fallback"]
    posterior = normal_normal_posterior(x)["loc"]
    assert abs(float(result.guide.median()["loc"]) - float(posterior.mean)) < 1e-6
