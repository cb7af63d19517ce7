"""Checks shared by the amortized guides' contract tests."""

import pytest


@pytest.fixture
def parameters_without_gradient():
    """Names of an amortized guide's parameters that get no gradient from a reparameterized sample.

    The loss touches both the sample and its log-density, so a parameter that reaches neither (a
    dead flow step, a context that is never used) shows up by name.
    """

    def check(guide, x):
        q = guide.distribution(x)
        z = q.rsample()
        (z.pow(2).sum() + q.log_prob(z).sum()).backward()
        return [name for name, p in guide.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]

    return check
