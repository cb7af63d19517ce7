"""Shared pieces of the fused-kernel tests."""

import math

import pytest
import torch


def _leaf_like_step(x, y, flag):
    """Elementwise, reduction, select and a graph constant: the kinds of op a leaf has."""
    weights = torch.tensor([0.5, -1.0, 2.0], dtype=x.dtype)
    total = (torch.log(x) * weights).sum(-1)
    return torch.where(flag.unsqueeze(-1), x * 2.0, y), torch.logaddexp(total, y.sum(-1)), flag & (total > 0)


@pytest.fixture
def leaf_like():
    """``(step, inputs)``: a small step and inputs with NaN, inf and a log of zero."""
    x = torch.tensor([[1.0, 0.0, 2.0], [math.inf, 3.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([[0.1, 0.2, 0.3], [math.nan, 0.5, 0.6]], dtype=torch.float64)
    return _leaf_like_step, (x, y, torch.tensor([True, False]))


@pytest.fixture
def normal_normal_check():
    """:func:`_assert_normal_normal_posterior`, for tests of samplers."""
    return _assert_normal_normal_posterior


def _assert_normal_normal_posterior(draws: torch.Tensor, data: torch.Tensor, min_ess: float, z: float = 4.5) -> None:
    """Draws of ``loc`` under ``loc ~ N(0, 2)``, ``data ~ N(loc, 1)`` match the closed-form
    posterior: ESS above ``min_ess``, mean within ``z`` Monte Carlo SEs, sd within ``z`` SEs of
    the sd (about ``sd / sqrt(2 ESS)``)."""
    import arviz as az

    precision = 1 / 2.0**2 + data.shape[0]
    mean, sd = data.sum().item() / precision, precision**-0.5
    ess = float(az.ess(draws.numpy()))
    assert ess > min_ess
    assert abs(draws.mean().item() - mean) < z * sd / ess**0.5
    assert abs(draws.std().item() - sd) < z * sd / (2 * ess) ** 0.5
