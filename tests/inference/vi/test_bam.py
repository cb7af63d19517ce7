"""Batch-and-match and Gaussian score matching against closed-form posteriors.

For a Gaussian target the exact posterior is a fixed point of the BaM update for any batch
(the batch's score divergence is zero there and the KL term is zero at q_t), so BaM's
Gaussian is checked against the exact one to round-off, and its draws through ``compare``
with Monte Carlo tolerances: means within ``Z * sd * sqrt(1/N + 1/N_ref)``, sds within
``Z * sd * sqrt(1/(2N) + 1/(2N_ref))``, ``Z = 4.5`` (failure budget below 1e-5 per check).
"""

import math

import pytest
import torch

from vilab.inference import compare, fit_svi
from vilab.inference.vi.bam import bam_update, gsm_update
from vilab.models.conjugate import (
    default_normal_data,
    default_regression_data,
    linear_regression,
    linear_regression_posterior,
    normal_normal,
    normal_normal_posterior,
)

Z = 4.5


def _covariance(guide):
    scale_tril = guide.scale[:, None] * guide.scale_tril
    return (scale_tril @ scale_tril.T).detach()


@pytest.mark.parametrize("method,init", [("bam", "lbfgs"), ("bam", "uniform"), ("gsm", "lbfgs")])
def test_score_matching_finds_the_exact_linear_regression_posterior(method, init):
    features, y = default_regression_data()
    exact = linear_regression_posterior(features, y)["beta"]
    result = fit_svi(linear_regression, method, features, y, guide_options={"init": init}, progress=False)
    assert result.converged and result.config["init"] == init
    assert torch.allclose(result.guide.loc.detach(), exact.mean, atol=1e-8)
    assert torch.allclose(_covariance(result.guide), exact.covariance_matrix, atol=1e-10)
    assert result.config["gradient_evaluations"] >= result.config["batch_size"] * result.config["iterations"]


def test_the_exact_gaussian_is_a_fixed_point_of_the_update_for_any_batch():
    generator = torch.Generator().manual_seed(1)
    loc = torch.tensor([0.5, -1.0, 2.0])
    root = torch.randn(3, 3, generator=generator)
    covariance = root @ root.T + 0.5 * torch.eye(3)
    precision = torch.linalg.inv(covariance)
    draws = loc + torch.randn(4, 3, generator=generator) @ torch.linalg.cholesky(covariance).T
    scores = -(draws - loc) @ precision
    for learning_rate in (0.1, 1.0, 100.0):
        new_loc, new_covariance = bam_update(loc, covariance, draws, scores, learning_rate)
        assert torch.allclose(new_loc, loc, atol=1e-10)
        assert torch.allclose(new_covariance, covariance, atol=1e-10)
    new_loc, new_covariance = gsm_update(loc, covariance, draws, scores)
    assert torch.allclose(new_loc, loc, atol=1e-10) and torch.allclose(new_covariance, covariance, atol=1e-10)


def test_bam_draws_match_the_normal_normal_posterior_through_compare():
    x = default_normal_data()
    num_draws, num_reference = 4000, 10000
    reference = {"loc": normal_normal_posterior(x)["loc"].sample((num_reference,))}
    report = compare(normal_normal, 20, x, guides=("bam",), reference=reference, num_draws=num_draws, progress=False)
    row = report.table.iloc[0]
    assert abs(row["mean_error_sd"]) < Z * math.sqrt(1 / num_draws + 1 / num_reference)
    assert abs(row["sd_ratio"] - 1) < Z * math.sqrt(1 / (2 * num_draws) + 1 / (2 * num_reference))


def test_bad_options_are_refused():
    x = default_normal_data()
    with pytest.raises(ValueError, match="batch_size"):
        fit_svi(normal_normal, "bam", 20, x, guide_options={"batch_size": 0}, progress=False)
    with pytest.raises(ValueError, match="learning_rate"):
        fit_svi(normal_normal, "bam", 20, x, guide_options={"learning_rate": -1.0}, progress=False)
    with pytest.raises(ValueError, match="init: expected one of"):
        fit_svi(normal_normal, "bam", 20, x, guide_options={"init": "prior"}, progress=False)
    with pytest.raises(ValueError, match="init: expected one of"):
        fit_svi(normal_normal, "gsm", 20, x, guide_options={"init": "prior"}, progress=False)
