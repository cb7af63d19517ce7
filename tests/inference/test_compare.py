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
from vilab.inference.compare import reference_from_draws
from vilab.models import conjugate

Z = norm.ppf(1 - 0.001 / 2)
OPT_MEAN_TOL = 0.2  # sqrt(2 * 0.02 nats): the optimisation budget of tests/inference/test_svi.py


@pytest.fixture(scope="module")
def regression_report():
    torch.set_default_dtype(torch.float64)
    features, y = conjugate.default_regression_data()
    exact = conjugate.linear_regression_posterior(features, y)["beta"]
    torch.manual_seed(0)
    reference = {"beta": exact.sample((4000,))}
    report = compare(conjugate.linear_regression, features, y, guides=("fullrank", "meanfield"),
                     reference=reference, num_draws=2000,
                     svi_options={"num_steps": 1500, "lr": 0.05, "lr_decay": 0.01, "early_stop": False},
                     progress=False)
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
    flat = reference_from_draws(conjugate.linear_regression, (features, y), {},
                                {"beta[2]": np.zeros((2, 10)), "beta": np.ones((10, 3))})
    assert flat["beta[2]"].shape == (10,) and set(flat) == {"beta[1]", "beta[2]", "beta[3]"}


def test_reference_without_shared_names_is_a_clear_error():
    x = conjugate.default_normal_data()
    with pytest.raises(ValueError, match=r"reference: no parameter name matches the model's sites"):
        compare(conjugate.normal_normal, 20, x, guides=("meanfield",), reference={"mu": np.zeros(100)},
                svi_options={"num_steps": 10}, num_draws=20, progress=False)


def test_guides_must_be_a_sequence():
    with pytest.raises(TypeError, match="guides: expected a sequence"):
        compare(conjugate.normal_normal, 20, conjugate.default_normal_data(), guides="meanfield",
                reference={"loc": np.zeros(10)}, progress=False)


def _flat_ridge():
    """log p(a, b) = -(a + b)^2 / 2: the Hessian at any mode is [[1, 1], [1, 1]], singular."""
    a = pyro.sample("a", dist.Normal(torch.tensor(0.0), 1.0))
    b = pyro.sample("b", dist.Normal(torch.tensor(0.0), 1.0))
    pyro.factor("ridge", 0.5 * (a ** 2 + b ** 2) - 0.5 * (a + b) ** 2)


def test_a_guide_that_cannot_be_fitted_is_reported_and_the_others_kept():
    from vilab.inference import LaplaceError, fit_svi

    with pytest.raises(LaplaceError, match="positive-definite Hessian"):
        fit_svi(_flat_ridge, "laplace", num_steps=50, progress=False)
    reference = {"a": np.random.default_rng(0).normal(size=500), "b": np.random.default_rng(1).normal(size=500)}
    with pytest.warns(RuntimeWarning, match="guide 'laplace' failed and is left out"):
        report = compare(_flat_ridge, guides=("laplace", "meanfield"), reference=reference,
                         svi_options={"num_steps": 50}, num_draws=200)
    assert list(report.methods) == ["meanfield"]
    assert "positive-definite Hessian" in report.failures["laplace"]
    from vilab.inference.report import warnings_for
    assert any(note.startswith("laplace: could not be fitted") for note in warnings_for(report))
