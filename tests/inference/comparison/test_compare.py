"""compare(): metrics against reference draws, the report record, and what save() writes."""

import json
import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.stats import norm

from vilab.inference import compare
from vilab.inference.comparison.api import reference_from_draws
from vilab.models import conjugate

Z = norm.ppf(1 - 0.001 / 2)
OPT_MEAN_TOL = 0.2  # sqrt(2 * 0.02 nats): the optimisation budget of tests/inference/svi/test_svi.py


@pytest.fixture(scope="module")
def regression_report():
    torch.set_default_dtype(torch.float64)
    features, y = conjugate.default_regression_data()
    exact = conjugate.linear_regression_posterior(features, y)["beta"]
    torch.manual_seed(0)
    reference = {"beta": exact.sample((4000,))}
    report = compare(
        conjugate.linear_regression,
        features,
        y,
        guides=("fullrank", "meanfield"),
        reference=reference,
        num_draws=2000,
        svi_options={"num_steps": 1500, "lr": 0.05, "lr_decay": 0.01, "early_stop": False},
        progress=False,
    )
    return report, exact


def test_table_has_a_row_per_method_and_parameter(regression_report):
    report, _ = regression_report
    assert len(report.table) == 2 * 3
    assert set(report.table["parameter"]) == {"beta[1]", "beta[2]", "beta[3]"}
    for column in ("mean_error_sd", "sd_ratio", "wasserstein_sd", "psis_mean_error_sd"):
        assert column in report.table.columns
    assert list(report.summary.index) == ["fullrank", "meanfield"]
    for column in ("k_hat", "k_hat_verdict", "elbo", "wall_time", "mean_abs_error_sd"):
        assert column in report.summary.columns


def test_fullrank_errors_are_within_monte_carlo_and_optimisation_error(regression_report):
    report, _ = regression_report
    rows = report.table[report.table["method"] == "fullrank"]
    bound = OPT_MEAN_TOL + Z * math.sqrt(1 / 2000 + 1 / 4000)
    assert (rows["mean_error_sd"].abs() < bound).all(), rows
    assert report.summary.loc["fullrank", "k_hat"] < 0.5


def test_meanfield_underestimates_the_sds_of_correlated_parameters(regression_report):
    report, _ = regression_report
    ratios = report.table[report.table["method"] == "meanfield"]["sd_ratio"]
    assert (ratios < 1.0).all()
    assert report.summary.loc["meanfield", "elbo"] < report.summary.loc["fullrank", "elbo"]


def test_save_writes_metrics_netcdf_figures_and_report(regression_report, tmp_path):
    report, _ = regression_report
    out = report.save(tmp_path / "run")
    metrics = json.loads((out / "metrics.json").read_text())
    assert {row["method"] for row in metrics["summary"]} == {"fullrank", "meanfield"}
    idata = az.from_netcdf(out / "fullrank.nc")
    assert idata.posterior["beta"].shape[:2] == (1, 2000)
    for name in ("marginals", "pairs", "forest", "elbo"):
        assert (out / f"{name}.png").stat().st_size > 1000, name
    assert "## Methods" in (out / "report.md").read_text()
    assert not list(out.glob(".*.tmp"))


def test_flat_reference_names_are_accepted():
    features, y = conjugate.default_regression_data()
    flat = reference_from_draws(
        conjugate.linear_regression, (features, y), {}, {"beta[2]": np.zeros((2, 10)), "beta": np.ones((10, 3))}
    )
    assert flat["beta[2]"].shape == (10,) and set(flat) == {"beta[1]", "beta[2]", "beta[3]"}


def test_reference_without_shared_names_is_a_clear_error():
    x = conjugate.default_normal_data()
    with pytest.raises(ValueError, match=r"reference: no parameter name matches the model's sites"):
        compare(
            conjugate.normal_normal,
            20,
            x,
            guides=("meanfield",),
            reference={"mu": np.zeros(100)},
            svi_options={"num_steps": 10},
            num_draws=20,
            progress=False,
        )


def test_guides_must_be_a_sequence():
    with pytest.raises(TypeError, match="guides: expected a sequence"):
        compare(
            conjugate.normal_normal,
            20,
            conjugate.default_normal_data(),
            guides="meanfield",
            reference={"loc": np.zeros(10)},
            progress=False,
        )


def _flat_ridge():
    """log p(a, b) = -(a + b)^2 / 2: the Hessian at any mode is [[1, 1], [1, 1]], singular."""
    a = pyro.sample("a", dist.Normal(torch.tensor(0.0), 1.0))
    b = pyro.sample("b", dist.Normal(torch.tensor(0.0), 1.0))
    pyro.factor("ridge", 0.5 * (a**2 + b**2) - 0.5 * (a + b) ** 2)


def test_a_guide_that_cannot_be_fitted_is_reported_and_the_others_kept():
    from vilab.inference import LaplaceError, fit_svi

    with pytest.raises(LaplaceError, match="positive-definite Hessian"):
        fit_svi(_flat_ridge, "laplace", num_steps=50, progress=False)
    reference = {"a": np.random.default_rng(0).normal(size=500), "b": np.random.default_rng(1).normal(size=500)}
    with pytest.warns(RuntimeWarning, match="guide 'laplace' failed and is left out"):
        report = compare(
            _flat_ridge,
            guides=("laplace", "meanfield"),
            reference=reference,
            svi_options={"num_steps": 50},
            num_draws=200,
        )
    assert list(report.methods) == ["meanfield"]
    assert "positive-definite Hessian" in report.failures["laplace"]
    from vilab.inference.report.save import warnings_for

    assert any(note.startswith("laplace: could not be fitted") for note in warnings_for(report))


# ---- issue 26: learned params, guide names, per-guide failures, obs_mask -------------------------


def _scale_as_param(y):
    """A model that learns its noise scale as a point estimate (``pyro.param``)."""
    sigma = pyro.param("sigma", torch.tensor(1.0), constraint=dist.constraints.positive)
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(mu, sigma), obs=y)


def test_a_model_with_a_learned_param_is_refused_before_any_fit():
    from vilab.inference import run_nuts

    y = 2.0 + 3.0 * torch.randn(50)
    with pytest.raises(ValueError, match="learned parameter.*'sigma'.*sample site with a prior.*as data"):
        compare(_scale_as_param, y, guides=("meanfield",), progress=False)
    with pytest.raises(ValueError, match="run_nuts: the model has learned parameter.*'sigma'"):
        run_nuts(_scale_as_param, y, progress=False)


def test_two_guides_of_one_class_keep_their_own_names_and_rows():
    from pyro.infer.autoguide import AutoDiagonalNormal

    x = conjugate.default_normal_data()
    exact = conjugate.normal_normal_posterior(x)["loc"]
    reference = {"loc": exact.sample((4000,))}
    model = conjugate.normal_normal
    report = compare(
        model,
        20,
        x,
        guides=(AutoDiagonalNormal(model), AutoDiagonalNormal(model)),
        reference=reference,
        num_draws=500,
        progress=False,
        svi_options={"num_steps": 300, "lr": 0.05, "early_stop": False},
    )
    names = ["AutoDiagonalNormal", "AutoDiagonalNormal_2"]
    assert list(report.methods) == names and list(report.summary.index) == names
    for name in names:
        rows = report.table[report.table["method"] == name]
        assert list(rows["parameter"]) == ["loc"]
        assert np.isfinite(rows["mean_error_sd"]).all()
        assert report.methods[name].name == name


def radon(county, log_radon=None):
    """Varying-intercept radon model (Gelman & Hill; Pyro/NumPyro tutorials' indexing ``a[county]``)."""
    mu_a = pyro.sample("mu_a", dist.Normal(0.0, 10.0))
    sigma_a = pyro.sample("sigma_a", dist.HalfCauchy(5.0))
    with pyro.plate("county", 5):
        a = pyro.sample("a", dist.Normal(mu_a, sigma_a))
    sigma_y = pyro.sample("sigma_y", dist.HalfCauchy(5.0))
    with pyro.plate("data", len(county)):
        pyro.sample("obs", dist.Normal(a[county], sigma_y), obs=log_radon)


def _radon_data():
    generator = torch.Generator().manual_seed(0)
    county = torch.randint(0, 5, (40,), generator=generator)
    return county, torch.randn(5, generator=generator)[county] + 0.3 * torch.randn(40, generator=generator)


def test_a_guide_failing_with_any_error_keeps_the_others():
    county, log_radon = _radon_data()

    def crashing_guide(county, log_radon=None):
        raise IndexError("index 4 is out of bounds for dimension 0 with size 1")

    reference = {"mu_a": np.random.default_rng(0).normal(size=200)}
    with pytest.warns(RuntimeWarning, match="guide 'function' failed and is left out: IndexError"):
        report = compare(
            radon,
            county,
            log_radon,
            guides=("meanfield", crashing_guide),
            reference=reference,
            num_draws=50,
            progress=False,
            svi_options={"num_steps": 50},
        )
    assert list(report.methods) == ["meanfield"]
    assert report.failures["function"].startswith("IndexError: index 4")


def _masked_normal(y, mask):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y, obs_mask=mask)


_MASK = torch.tensor([True, True, False, True, True, False, True, True])


def test_obs_mask_reference_with_data_entries_gives_a_table():
    """Reference draws of the deterministic ``obs`` site hold the data where it is observed:
    constants, with no error in units of their zero sd."""
    y = torch.randn(8, generator=torch.Generator().manual_seed(0))
    precision = 1 / 100 + int(_MASK.sum())
    mu = y[_MASK].sum() / precision + torch.randn(2000) / precision**0.5
    obs = torch.where(_MASK, y, mu.unsqueeze(-1) + torch.randn(2000, 8))
    report = compare(
        _masked_normal,
        y,
        _MASK,
        guides=("meanfield",),
        reference={"mu": mu, "obs": obs},
        num_draws=200,
        progress=False,
        svi_options={"num_steps": 300, "lr": 0.05, "backend": "pyro"},
    )
    rows = report.table[report.table["method"] == "meanfield"]
    assert set(rows["parameter"]) == {"mu", "obs[3]", "obs[6]"}
    assert np.isfinite(rows["mean_error_sd"]).all()


@pytest.mark.slow
def test_obs_mask_model_compares_on_its_posterior_quantities():
    y = torch.randn(8, generator=torch.Generator().manual_seed(0))
    report = compare(
        _masked_normal,
        y,
        _MASK,
        guides=("meanfield",),
        num_draws=200,
        progress=False,
        svi_options={"num_steps": 300, "lr": 0.05},
        nuts_options={"num_samples": 300, "num_warmup": 300, "num_chains": 2},
    )
    rows = report.table[report.table["method"] == "meanfield"]
    # Observed entries are data (no error in sd units); the masked-out half of obs_unobserved
    # is no part of the posterior.
    assert set(rows["parameter"]) == {"mu", "obs_unobserved[3]", "obs_unobserved[6]", "obs[3]", "obs[6]"}
    assert np.isfinite(rows["mean_error_sd"]).all()
    # Those never-used elements have a proper density, so they no longer wander and spoil R-hat.
    assert report.summary.loc["nuts", "r_hat_max"] < 1.05
