"""PSIS k-hat at its edges: equal weights, round-off, heavy tails."""

import numpy as np

from vilab.inference.common.diagnostics import k_hat_verdict, psis


def test_weights_equal_up_to_round_off_are_an_exact_guide_not_an_unreliable_one():
    rng = np.random.default_rng(0)
    log_weights = -12.3 + 1e-14 * rng.standard_normal(4000)  # an exact guide's log p(x)
    result = psis(log_weights)
    assert result.k_hat == -np.inf and result.ess == 4000
    assert k_hat_verdict(result.k_hat).startswith("good")


def test_identical_weights_are_a_point_estimate():
    assert np.isnan(psis(np.zeros(100)).k_hat)


def test_heavy_tailed_weights_are_flagged():
    rng = np.random.default_rng(1)
    log_weights = np.log(rng.pareto(1.0, 4000) + 1.0)  # weights with tail index 1: k = 1
    assert psis(log_weights).k_hat > 0.7
