r"""ATen graphs sent node for node (:mod:`vilab.inference.engine.graph.serialize`).

Exact checks: the rebuilt graph has the same nodes and code as the original (a pickled
``GraphModule`` does not: it is traced again), keeps its tensor attributes and returns the same
values; targets it cannot name are refused with a ``TypeError``.
"""

import operator

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from vilab.inference.engine.graph.serialize import dumps_graph, loads_graph


def _step(z, x):
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)  # a lifted constant
    parts = torch.unbind(z, -1)
    scaled = (x[:, 1:] * weights[1:]).sum(-1, keepdim=True)
    return (parts[0] * 2.0 + scaled.mean(), torch.clamp(z, min=-1.0).to(torch.float32), z.new_zeros(2, 3))


def test_the_rebuilt_graph_has_the_same_nodes_constants_and_values():
    z, x = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    graph = make_fx(_step)(z, x)
    assert any(node.op == "get_attr" for node in graph.graph.nodes)
    assert any(node.target is operator.getitem for node in graph.graph.nodes)
    rebuilt = loads_graph(dumps_graph(graph))
    assert rebuilt.code == graph.code
    assert [(node.op, node.name, node.target) for node in rebuilt.graph.nodes] == [
        (node.op, node.name, node.target) for node in graph.graph.nodes
    ]
    for got, expected in zip(rebuilt(z, x), _step(z, x)):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_targets_that_cannot_be_named_are_refused():
    graph = torch.fx.symbolic_trace(torch.nn.Linear(3, 2))  # a call_module node
    with pytest.raises(TypeError, match="graph_module"):
        dumps_graph(graph)

    def local(x):
        return x * 2

    traced = make_fx(lambda x: (x + 1,))(torch.ones(2))
    node = next(node for node in traced.graph.nodes if node.op == "call_function")
    node.target = local
    with pytest.raises(TypeError, match="node targets"):
        dumps_graph(traced)
