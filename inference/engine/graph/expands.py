r"""Graph passes that keep broadcast parameters small in a traced ``make_fx`` graph.

Pyro's distributions broadcast their parameters to the batch shape (``Normal(loc, scale)``
expands a per-chain ``scale`` to one per data point; ``MixtureSameFamily`` expands its mixing
logits likewise), so a traced log density computes ``log(scale)`` or the normalisation of the
mixing weights once per data point. For an elementwise ``f``,

.. math::
    f(\operatorname{expand}(a), \operatorname{expand}(b)) = \operatorname{expand}(f(a, b)),

and the same holds for a ``select`` or ``unsqueeze`` of a dimension that the expand did not
stretch, so these ops move in front of the expand and run on the small tensors. The values are
the same numbers, element by element. A rewritten node's users see a stride-0 view, so every
user must be an op that takes any strides (elementwise, broadcasting, ``select``,
``unsqueeze``, reductions); a ``view``, an in-place write or a graph output keeps the original.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from vilab.inference.engine.graph.masks import _val

__all__ = ["ops_before_expands", "BROADCASTING", "ONE_TENSOR_ELEMENTWISE"]

aten = torch.ops.aten

# Elementwise ops that broadcast their tensor arguments.
BROADCASTING = {
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.rsub.Tensor,
    aten.pow.Tensor_Tensor,
    aten.where.self,
    aten.lt.Tensor,
    aten.le.Tensor,
    aten.gt.Tensor,
    aten.ge.Tensor,
    aten.eq.Tensor,
    aten.maximum.default,
    aten.minimum.default,
    aten.logaddexp.default,
    aten.xlogy.Tensor,
    aten.logical_and.default,
    aten.logical_or.default,
    aten.bitwise_and.Tensor,
    aten.bitwise_or.Tensor,
}
# Elementwise ops of one tensor argument (any others Python numbers).
ONE_TENSOR_ELEMENTWISE = {
    aten.log.default,
    aten.exp.default,
    aten.neg.default,
    aten.sqrt.default,
    aten.rsqrt.default,
    aten.log1p.default,
    aten.expm1.default,
    aten.reciprocal.default,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.abs.default,
    aten.pow.Tensor_Scalar,
    aten.mul.Scalar,
    aten.add.Scalar,
    aten.sub.Scalar,
    aten.div.Scalar,
    aten.rsub.Scalar,
    aten.lt.Scalar,
    aten.le.Scalar,
    aten.gt.Scalar,
    aten.ge.Scalar,
}
_VIEWS = {aten.select.int, aten.unsqueeze.default}
# Users that take a stride-0 input as readily as a dense one.
_STRIDE_SAFE = (
    BROADCASTING
    | ONE_TENSOR_ELEMENTWISE
    | _VIEWS
    | {aten.sum.dim_IntList, aten.expand.default, aten.clone.default, aten.cat.default, aten.stack.default}
)


def _meta(value):
    return (
        torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
        if isinstance(value, torch.Tensor)
        else value
    )


def _value(node):
    """``meta["val"]``, or for a node an earlier pass added, its shape and dtype worked out on
    the meta device (the arguments' values may come from different fake-tensor modes)."""
    value = _val(node)
    if value is None and isinstance(node, fx.Node) and node.op == "call_function":
        args = [_value(a) if isinstance(a, fx.Node) else a for a in node.args]
        if all(a is not None for a in args) and not node.kwargs:
            try:
                value = node.target(*[_meta(a) for a in args])
            except (RuntimeError, TypeError, ValueError, NotImplementedError):
                return None
            if isinstance(value, torch.Tensor):
                node.meta["val"] = value
    return value if isinstance(value, torch.Tensor) else None


def _is_expand(node, mutated: set) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.target is aten.expand.default
        and node not in mutated
        and _value(node.args[0]) is not None
    )


def _small_elementwise(node: fx.Node, mutated: set):
    """``(op, args)`` on the expands' sources where that is smaller, else ``None``."""
    if node.target not in BROADCASTING and node.target not in ONE_TENSOR_ELEMENTWISE:
        return None
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if not any(_is_expand(a, mutated) for a in tensors) or any(_value(a) is None for a in tensors):
        return None
    args = tuple(a.args[0] if _is_expand(a, mutated) else a for a in node.args)
    shape = torch.broadcast_shapes(*[_value(a).shape for a in args if isinstance(a, fx.Node)])
    return (node.target, args) if math.prod(shape) < _value(node).numel() else None


def _small_view(node: fx.Node, mutated: set):
    """A ``select``/``unsqueeze`` of an expand, on its source, where the expand added no
    leading dimension and (``select``) did not stretch the selected one."""
    if node.target not in _VIEWS or not _is_expand(node.args[0], mutated):
        return None
    source = node.args[0].args[0]
    big, small = _value(node.args[0]).shape, _value(source).shape
    if len(big) != len(small):
        return None
    dim = node.args[1] % (len(big) + (node.target is aten.unsqueeze.default))
    if node.target is aten.select.int and small[dim] != big[dim]:
        return None
    return node.target, (source, *node.args[1:])


def ops_before_expands(graph: fx.Graph, mutated: set) -> None:
    """Move elementwise ops, selects and unsqueezes in front of expands (see the module)."""
    for node in list(graph.nodes):  # topological: a chain of ops moves up one op at a time
        if (
            node.op != "call_function"
            or node.kwargs
            or node in mutated
            or _value(node) is None
            or not all(user.target in _STRIDE_SAFE for user in node.users)
        ):
            continue
        found = _small_elementwise(node, mutated) or _small_view(node, mutated)
        if found is None:
            continue
        target, args = found
        with graph.inserting_before(node):
            small = graph.call_function(target, args)
            if _value(small) is None or _value(small).dtype != _value(node).dtype:
                graph.erase_node(small)  # a type promotion of its own: keep the original
                continue
            new = graph.call_function(aten.expand.default, (small, list(_value(node).shape)))
        new.meta["val"] = _value(node)
        node.replace_all_uses_with(new)
