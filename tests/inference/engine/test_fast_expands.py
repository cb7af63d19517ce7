"""Ops move in front of expands (``fast_expands``, run by ``fast_graph.simplify``) with the same
values, and never where a user could not take the stride-0 result."""

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from vilab.inference.engine.graph.simplify import simplify

aten = torch.ops.aten


def _shapes(graph, target):
    return sorted(tuple(node.meta["val"].shape) for node in graph.graph.nodes if node.target is target)


def test_elementwise_ops_of_a_broadcast_parameter_run_once_per_chain():
    def normal_log_density(scale, data):
        # What Pyro's Normal(loc, scale).log_prob does after broadcasting scale to the data.
        wide = scale.expand(scale.shape[0], data.shape[-1])
        log_density = -((data / wide) ** 2) / (2 * wide**2) - wide.log()
        return (log_density.sum(-1), wide.exp().reshape(-1), wide.log())

    scale, data = torch.rand(4, 1, dtype=torch.float64) + 0.5, torch.randn(7, dtype=torch.float64)
    graph = simplify(make_fx(normal_log_density)(scale, data))
    # The log of the density reads the (4, 1) scale; the one returned keeps its (4, 7) shape,
    # and so does the exp that a view reads.
    assert _shapes(graph, aten.log.default) == [(4, 1), (4, 7)]
    assert _shapes(graph, aten.exp.default) == [(4, 7)]
    scale[0, 0] = 0.0  # log 0 and division by zero go through unchanged
    for got, expected in zip(graph(scale, data), normal_log_density(scale, data)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def test_mixing_weights_are_normalised_once_per_chain_not_once_per_point():
    def mixture_log_density(logits, locs, data):
        # MixtureSameFamily: mixing logits and component means expanded to (chains, points, K).
        wide_logits = logits.unsqueeze(1).expand(-1, data.shape[0], -1)
        log_weights = wide_logits - torch.logsumexp(wide_logits, -1, keepdim=True)
        components = -0.5 * (data.unsqueeze(-1) - locs.unsqueeze(1)) ** 2
        return (torch.logsumexp(log_weights + components, -1).sum(-1), torch.select(wide_logits, 2, 1) * 3)

    logits, locs = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    data = torch.randn(9, dtype=torch.float64)
    graph = simplify(make_fx(mixture_log_density)(logits, locs, data))
    # One pairwise logaddexp normalises the (4, 1) logits, one mixes the (4, 9) components.
    assert _shapes(graph, aten.logaddexp.default) == [(4, 1), (4, 9)]
    logits[1, 0] = -float("inf")
    for got, expected in zip(graph(logits, locs, data), mixture_log_density(logits, locs, data)):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-15, atol=0, equal_nan=True)


def test_a_select_of_a_stretched_dimension_and_a_written_expand_stay():
    def stretched(x):
        wide = x.expand(3, 5)
        picked = wide.select(0, 2) + 1  # dimension 0 was stretched from 1: nothing to gain
        copy = wide.clone()
        copy.mul_(2)  # written in place: its readers keep the dense tensor
        return picked, copy.exp()

    x = torch.randn(1, 5, dtype=torch.float64)
    graph = simplify(make_fx(stretched)(x))
    for got, expected in zip(graph(x), stretched(x)):
        assert got.shape == expected.shape and torch.equal(got, expected)
