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
