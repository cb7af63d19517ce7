r"""Shrink a ``make_fx`` graph of small-tensor operations before it runs (as fx code, on the virtual machine or fused).

On the tensors of a small model (a few chains, tens to hundreds of numbers) every aten call costs
about the same microseconds whatever it computes, so the sampler's speed is the number of calls
in its traced leaf. Tracing Pyro through autograd leaves many calls that compute nothing new:
constants recomputed on every call (``log(scale)`` of a fixed prior), shape-only views and
expands, ``pow(x, 1)``, detaches, and reductions over a dimension of two or three entries, which
PyTorch's reduction kernels run ten times slower than the elementwise ops that can replace them.
:func:`simplify` removes or rewrites those, and runs the ops that read a broadcast parameter
on the parameter rather than its expanded copy (:mod:`~vilab.inference.engine.graph.expands`); every
rewrite keeps values equal up to rounding, and the caller still compares the simplified graph
with the eager computation before using it.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from vilab.inference.engine.backends.torch_internals import OpOverload

from vilab.inference.engine.graph.expands import BROADCASTING, ops_before_expands
from vilab.inference.engine.graph.masks import _val, data_dependent_shapes, mask_assignments_as_selects

__all__ = ["simplify", "data_dependent_shapes", "mask_assignments_as_selects"]

aten = torch.ops.aten

# Reductions over at most this many entries are unrolled into elementwise ops.
_MAX_UNROLL = 4

_SHAPE_ONLY = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.expand.default,
    aten.alias.default,
    aten.detach.default,
    aten.lift_fresh_copy.default,
    aten.clone.default,
    aten._to_copy.default,
}
_COPIES = {aten.clone.default, aten._to_copy.default, aten.lift_fresh_copy.default}
_LIKE = {aten.ones_like.default, aten.zeros_like.default, aten.full_like.default}


def _is_mutating(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _mutated(graph: fx.Graph) -> set:
    """Nodes written in place by some op: rewriting them could change what the write sees."""
    out = set()
    for node in graph.nodes:
        if _is_mutating(node):
            out.update(arg for arg in node.args if isinstance(arg, fx.Node))
    return out


def _same_meta(a, b) -> bool:
    va, vb = _val(a), _val(b)
    return (
        isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape and va.dtype == vb.dtype
    )


def _same_dtype(a, b) -> bool:
    va, vb = _val(a), _val(b)
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dtype == vb.dtype


def _contiguous(node) -> bool:
    value = _val(node)
    return isinstance(value, torch.Tensor) and value.is_contiguous()


def _replace(node: fx.Node, new) -> None:
    node.replace_all_uses_with(new)


def _fold_constants(gm: fx.GraphModule, mutated: set) -> None:
    """Evaluate once every op whose inputs are all constants (or only an input's shape)."""
    constant = {}
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and node not in mutated:
            constant[node] = getattr(gm, node.target)
            continue
        if node.op != "call_function" or node in mutated or _is_mutating(node):
            continue
        if not isinstance(node.target, OpOverload) or node.target is aten.new_empty.default:
            continue
        if node.target in _LIKE:
            value = _val(node)
            if not isinstance(value, torch.Tensor):
                continue
            fill = {aten.ones_like.default: 1, aten.zeros_like.default: 0}.get(node.target)
            fill = node.args[1] if fill is None else fill
            if not isinstance(fill, (bool, int, float)):
                continue
            result = torch.full(value.shape, fill, dtype=value.dtype)
        else:
            inputs = node.all_input_nodes
            if any(arg not in constant for arg in inputs):
                continue
            if torch.Tag.nondeterministic_seeded in node.target.tags or "empty" in str(node.target):
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: constant[n])
            result = node.target(*args, **kwargs)
            if not isinstance(result, torch.Tensor):
                continue
        name = f"_folded_{node.name}"
        gm.register_buffer(name, result.clone())
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        attr.meta["val"] = node.meta.get("val")
        _replace(node, attr)
        constant[attr] = result


def _remove_no_ops(graph: fx.Graph, mutated: set) -> None:
    for node in list(graph.nodes):
        if node.op != "call_function" or node in mutated:
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or source in mutated:
            continue
        target = node.target
        if target in _COPIES and (mutated or not _contiguous(source)):
            # A copy may protect its value from a later in-place write to its source, or make an
            # expanded tensor contiguous for a view that follows (a batched matmul's reshape).
            continue
        if target in _SHAPE_ONLY and _same_meta(node, source):
            _replace(node, source)
        elif target is aten.expand.default and source.target is aten.expand.default:
            node.args = (source.args[0], *node.args[1:])
        elif (
            target in (aten.mean.default, aten.sum.default)
            and len(node.args) == 1
            and not node.kwargs
            and isinstance(_val(source), torch.Tensor)
            and _val(source).numel() == 1
            and _val(source).dtype.is_floating_point
            and _same_dtype(node, source)
        ):
            # The mean or sum of one number is that number (a single particle's ELBO).
            with graph.inserting_before(node):
                new = graph.call_function(aten.view.default, (source, []))
            new.meta.update(node.meta)
            _replace(node, new)
        elif (
            target is aten.permute.default
            and list(node.args[1]) == list(range(len(node.args[1])))
            and _same_meta(node, source)
        ):
            _replace(node, source)
        elif target is aten.pow.Tensor_Scalar and node.args[1] == 1 and _same_meta(node, source):
            _replace(node, source)
        elif (
            target in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)
            and not isinstance(node.args[1], fx.Node)
            and node.args[1] == 1
            and _same_meta(node, source)
        ):
            _replace(node, source)
        elif (
            target in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar)
            and len(node.args) == 2
            and not node.kwargs
            and not isinstance(node.args[1], fx.Node)
            and node.args[1] == 0
            and _same_meta(node, source)
        ):
            _replace(node, source)


def _drop_broadcast_expands(graph: fx.Graph, mutated: set) -> None:
    """An expand feeding a broadcasting op is redundant when the op's output shape does not
    change without it."""
    for node in list(graph.nodes):
        if node.target is not aten.expand.default or node in mutated:
            continue
        source = node.args[0]
        for user in list(node.users):
            if user.target not in BROADCASTING or not isinstance(_val(user), torch.Tensor):
                continue
            shapes = [
                (_val(source) if arg is node else _val(arg)).shape
                for arg in user.args
                if isinstance(_val(arg), torch.Tensor)
            ]
            shapes += [() for arg in user.args if not isinstance(arg, fx.Node)]
            if torch.broadcast_shapes(*shapes) == _val(user).shape:
                user.replace_input_with(node, source)


def _slices(graph: fx.Graph, source: fx.Node, dim: int, size: int) -> list:
    return [graph.call_function(aten.select.int, (source, dim, i)) for i in range(size)]


def _fold(graph: fx.Graph, op, items: list) -> fx.Node:
    total = items[0]
    for item in items[1:]:
        total = graph.call_function(op, (total, item))
    return total


def _small_dim(node: fx.Node, dims) -> int | None:
    """The reduced dimension when it is a single one of at most ``_MAX_UNROLL`` entries."""
    value = _val(node.args[0])
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        return None
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or len(dims) != 1:
        return None
    dim = dims[0] % value.dim() if value.dim() else None
    if dim is None or not 1 <= value.shape[dim] <= _MAX_UNROLL:  # an empty sum has no first term
        return None
    return dim


def _unrolled(graph: fx.Graph, source: fx.Node, dim: int, op, keepdim: bool) -> fx.Node:
    size = _val(source).shape[dim]
    result = _fold(graph, op, _slices(graph, source, dim, size))
    return graph.call_function(aten.unsqueeze.default, (result, dim)) if keepdim else result


# Reductions written as a chain of their pairwise elementwise op.
_PAIRWISE = {aten.sum.dim_IntList: aten.add.Tensor, aten.logsumexp.default: aten.logaddexp.default}


def _unroll_small_reductions(graph: fx.Graph) -> None:
    """``sum``, ``logsumexp`` and ``log_softmax`` over 2 to 4 entries as elementwise ops."""
    for node in list(graph.nodes):
        target = node.target
        if target in _PAIRWISE and 2 <= len(node.args) <= 3 and not node.kwargs:
            dim = _small_dim(node, node.args[1])
            if dim is None:
                continue
            keepdim = len(node.args) > 2 and node.args[2]
            with graph.inserting_before(node):
                new = _unrolled(graph, node.args[0], dim, _PAIRWISE[target], keepdim)
        elif target is aten._log_softmax.default:
            dim = _small_dim(node, node.args[1])
            if dim is None:
                continue
            with graph.inserting_before(node):
                norm = _unrolled(graph, node.args[0], dim, aten.logaddexp.default, True)
                new = graph.call_function(aten.sub.Tensor, (node.args[0], norm))
        elif target is aten._log_softmax_backward_data.default:
            grad, output, dim = node.args[:3]
            if _small_dim(node, dim) is None:
                continue
            dim = _small_dim(node, dim)
            with graph.inserting_before(node):
                total = _unrolled(graph, grad, dim, aten.add.Tensor, True)
                weight = graph.call_function(aten.exp.default, (output,))
                new = graph.call_function(
                    aten.sub.Tensor, (grad, graph.call_function(aten.mul.Tensor, (weight, total)))
                )
        else:
            continue
        _replace(node, new)


def _slice_pieces(node: fx.Node) -> list | None:
    """The ``slice_backward`` nodes summed by a tree of ``add`` nodes rooted at ``node``.

    Iterative: an ODE solver's loop unrolls into add chains thousands of nodes deep."""
    pieces, stack = [], [(node, True)]
    while stack:
        current, root = stack.pop()
        if not root and len(current.users) != 1:
            return None
        if current.target is aten.slice_backward.default and len(current.args) == 6 and current.args[5] == 1:
            pieces.append(current)
        elif (
            current.target is aten.add.Tensor
            and len(current.args) == 2
            and not current.kwargs
            and all(isinstance(arg, fx.Node) for arg in current.args)
        ):
            stack.extend((arg, False) for arg in reversed(current.args))
        else:
            return None
    return pieces


def _tiles(pieces: list) -> tuple | None:
    """``(dim, pieces by start)`` when the slices tile one dimension of one shape exactly."""
    sizes, dim = pieces[0].args[1], pieces[0].args[2]
    if any(list(p.args[1]) != list(sizes) or p.args[2] != dim for p in pieces):
        return None
    dim = dim % len(sizes)
    ordered = sorted(pieces, key=lambda p: p.args[3])
    position = 0
    for piece in ordered:
        start, end = piece.args[3], min(piece.args[4], sizes[dim])
        if start != position or end <= start:
            return None
        position = end
    return (dim, ordered) if position == sizes[dim] else None


def _join_slice_gradients(graph: fx.Graph) -> None:
    """The gradient of slicing a vector into blocks is a sum of zero-padded blocks
    (``slice_backward``); when the blocks tile the vector it is their concatenation."""
    for node in reversed(list(graph.nodes)):
        if node.target is not aten.add.Tensor or node.graph is None:
            continue
        pieces = _slice_pieces(node)
        tiling = _tiles(pieces) if pieces and len(pieces) > 1 else None
        if tiling is None:
            continue
        dim, ordered = tiling
        with graph.inserting_before(node):
            new = graph.call_function(aten.cat.default, ([piece.args[0] for piece in ordered], dim))
        _replace(node, new)


def _key(value):
    """A hashable stand-in for an op argument (nodes by identity); ``None`` if there is none."""
    if isinstance(value, (list, tuple)):
        items = tuple(_key(item) for item in value)
        return (
            None
            if any(item is None and orig is not None for item, orig in zip(items, value))
            else (type(value).__name__, items)
        )
    if isinstance(value, float):
        # NaN never equals itself (never merge on it); str() tells 0.0 from -0.0.
        return None if value != value else ("float", str(value))
    try:
        hash(value)
    except TypeError:
        return None
    return (type(value).__name__, value)


def _eliminate_common_subexpressions(graph: fx.Graph, mutated: set) -> None:
    """Merge pure ops with the same target and arguments (autograd's backward recomputes
    ``neg``, ``unsqueeze`` and ``mul`` of values the forward pass already has)."""
    seen = {}
    for node in list(graph.nodes):
        if node.op == "get_attr":
            key = ("get_attr", node.target)
        elif node.op == "call_function" and isinstance(node.target, OpOverload):
            # An input written in place between two identical ops gives them different values.
            if (
                node in mutated
                or _is_mutating(node)
                or "empty" in str(node.target)
                or torch.Tag.nondeterministic_seeded in node.target.tags
                or any(arg in mutated for arg in node.all_input_nodes)
            ):
                continue
            key = (node.target, _key(node.args), _key(node.kwargs))
            if key[1] is None or key[2] is None:
                continue
        else:
            continue
        if key in seen:
            _replace(node, seen[key])
        else:
            seen[key] = node


def _constant(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = getattr(gm, node.target, None)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _is_filled(gm: fx.GraphModule, node, fill: float) -> bool:
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return node == fill
    value = _constant(gm, node)
    return value is not None and value.numel() > 0 and bool((value == fill).all())


def _drop_identity_constants(gm: fx.GraphModule, mutated: set) -> None:
    """``x + 0``, ``x - 0``, ``x * 1`` and ``x / 1`` with constant zeros or ones (a prior's
    folded log-Jacobian of an identity transform) that do not change ``x``'s shape or dtype."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node in mutated or node.kwargs or len(node.args) != 2:
            continue
        first, second = node.args
        if node.target in (aten.add.Tensor, aten.mul.Tensor):
            fill = 0.0 if node.target is aten.add.Tensor else 1.0
            pairs = [(first, second), (second, first)]
        elif node.target in (aten.sub.Tensor, aten.div.Tensor):
            fill = 0.0 if node.target is aten.sub.Tensor else 1.0
            pairs = [(first, second)]
        else:
            continue
        for kept, other in pairs:
            if (
                isinstance(kept, fx.Node)
                and kept not in mutated
                and _is_filled(gm, other, fill)
                and _same_meta(node, kept)
            ):
                _replace(node, kept)
                break


def _negations_into_subtractions(gm: fx.GraphModule, mutated: set) -> None:
    """``a + b * -1`` -> ``a - b`` and ``a + (-b)`` -> ``a - b`` (how autograd and Pyro's
    sums write differences), and ``-(-x)`` -> ``x``."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node in mutated:
            continue
        if (
            node.target is aten.neg.default
            and isinstance(node.args[0], fx.Node)
            and node.args[0].target is aten.neg.default
            and node.args[0].args[0] not in mutated
            and _same_meta(node, node.args[0].args[0])
        ):
            _replace(node, node.args[0].args[0])
            continue
        if node.target is not aten.add.Tensor or node.kwargs or len(node.args) != 2:
            continue
        for kept, negated in (node.args, node.args[::-1]):
            if not (isinstance(kept, fx.Node) and isinstance(negated, fx.Node)) or negated in mutated:
                continue
            if negated.target is aten.neg.default:
                inner = negated.args[0]
            elif (
                negated.target in (aten.mul.Tensor, aten.mul.Scalar)
                and not negated.kwargs
                and isinstance(negated.args[1], (int, float))
                and negated.args[1] == -1
            ):
                inner = negated.args[0]
            else:
                continue
            # The subtraction reads its inputs later than the negation did: not if written between.
            if not isinstance(inner, fx.Node) or inner in mutated or kept in mutated or not _same_meta(negated, inner):
                continue
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(aten.sub.Tensor, (kept, inner))
            new.meta.update(node.meta)
            _replace(node, new)
            break


def _triangles_as_selects(gm: fx.GraphModule) -> None:
    """``tril``/``triu`` as a ``where`` with a constant mask: the same values, but PyTorch's
    triangle kernels cost about ten elementwise ops on the small matrices of a full-rank guide."""
    for node in list(gm.graph.nodes):
        if node.target not in (aten.tril.default, aten.triu.default) or node.kwargs:
            continue
        value = _val(node.args[0])
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            continue
        diagonal = node.args[1] if len(node.args) > 1 else 0
        rows, cols = value.shape[-2:]
        mask = torch.ones(rows, cols, dtype=torch.bool)
        mask = mask.tril(diagonal) if node.target is aten.tril.default else mask.triu(diagonal)
        names = (f"_mask_{node.name}", f"_zero_{node.name}")
        gm.register_buffer(names[0], mask)
        gm.register_buffer(names[1], torch.zeros((), dtype=value.dtype))
        with gm.graph.inserting_before(node):
            mask_node, zero_node = (gm.graph.get_attr(name) for name in names)
            new = gm.graph.call_function(aten.where.self, (mask_node, node.args[0], zero_node))
        new.meta.update(node.meta)
        _replace(node, new)


def simplify(gm: fx.GraphModule) -> fx.GraphModule:
    """Simplify a ``make_fx`` graph (with ``meta["val"]`` on its nodes) in place and return it."""
    graph = gm.graph
    mutated = _mutated(graph)
    _fold_constants(gm, mutated)
    _remove_no_ops(graph, mutated)
    ops_before_expands(graph, mutated)
    _drop_broadcast_expands(graph, mutated)
    _remove_no_ops(graph, mutated)
    _drop_identity_constants(gm, mutated)
    _eliminate_common_subexpressions(graph, mutated)
    _negations_into_subtractions(gm, mutated)
    _unroll_small_reductions(graph)
    ops_before_expands(graph, mutated)  # the unrolled reductions' selects and pairwise ops
    _drop_broadcast_expands(graph, mutated)
    _join_slice_gradients(graph)
    _triangles_as_selects(gm)
    graph.eliminate_dead_code()
    _eliminate_common_subexpressions(graph, _mutated(graph))
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm
