r"""The small models: closed forms checked by the product rule, shapes, batching, bad input.

For any parameter value :math:`\theta`, :math:`\log p(x) = \log p(x \mid \theta) + \log p(\theta)
- \log p(\theta \mid x)`; the closed-form evidence and posterior must satisfy it exactly.
"""

import warnings

import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from vilab.inference.common.tracing import evaluate_draws
from vilab.models import conjugate, eight_schools_noncentered, get_model, list_models


def _log_joint(model, args, value_by_site):
    trace = poutine.trace(poutine.condition(model, data=value_by_site)).get_trace(*args)
    return float(trace.log_prob_sum())


@pytest.mark.parametrize("theta", [-1.0, 0.3, 2.0])
def test_normal_normal_closed_forms_satisfy_the_product_rule(theta):
    x = conjugate.default_normal_data()
    posterior = conjugate.normal_normal_posterior(x)["loc"]
    value = torch.tensor(theta)
    identity = _log_joint(conjugate.normal_normal, (20, x), {"loc": value}) - float(posterior.log_prob(value))
    assert identity == pytest.approx(conjugate.normal_normal_log_evidence(x), abs=1e-8)


@pytest.mark.parametrize("theta", [0.1, 0.3, 0.8])
def test_beta_bernoulli_closed_forms_satisfy_the_product_rule(theta):
    x = conjugate.default_bernoulli_data()
    posterior = conjugate.beta_bernoulli_posterior(x)["probs"]
    value = torch.tensor(theta)
    identity = _log_joint(conjugate.beta_bernoulli, (30, x), {"probs": value}) - float(posterior.log_prob(value))
    assert identity == pytest.approx(conjugate.beta_bernoulli_log_evidence(x), abs=1e-8)


def test_linear_regression_closed_forms_satisfy_the_product_rule():
    features, y = conjugate.default_regression_data()
    posterior = conjugate.linear_regression_posterior(features, y)["beta"]
    for value in (torch.zeros(3), torch.tensor([0.5, -1.0, 2.0])):
        identity = _log_joint(conjugate.linear_regression, (features, y), {"beta": value}) - float(
            posterior.log_prob(value)
        )
        assert identity == pytest.approx(conjugate.linear_regression_log_evidence(features, y), abs=1e-7)


@pytest.mark.parametrize("name", [s.name for s in list_models() if "posteriordb" not in s.tags])
def test_every_small_model_batches_over_draws_without_falling_back(name):
    model, args, kwargs = get_model(name).load()
    trace = poutine.trace(model).get_trace(*args, **kwargs)
    latent = {
        n: s["value"]
        for n, s in trace.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    }
    # a second draw inside the support: scaled towards zero (positive and ordered values stay so)
    draws = {n: torch.stack([v, v * 0.9]) for n, v in latent.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        evaluation = evaluate_draws(model, args, kwargs, draws)
    assert evaluation["log_joint"].shape == (2,)


def test_prior_predictive_samples_the_observations():
    data = get_model("eight_schools").load()[1]
    trace = poutine.trace(eight_schools_noncentered).get_trace(*data)
    assert trace.nodes["obs"]["value"].shape == (8,) and not trace.nodes["obs"]["is_observed"]


def test_wrong_shapes_are_named():
    with pytest.raises(ValueError, match=r"sigma: expected shape \(8,\); got \(7,\)"):
        eight_schools_noncentered(8, torch.ones(7))
    with pytest.raises(ValueError, match=r"features: expected shape \(N, D\)"):
        conjugate.linear_regression(torch.ones(5))
    with pytest.raises(ValueError, match="unknown model 'nope'; known models:"):
        get_model("nope")
