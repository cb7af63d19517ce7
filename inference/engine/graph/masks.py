r"""Value-dependent shapes in a ``make_fx`` graph: find them, and remove the common kind.

Boolean-mask indexing (``y[mask]``) has as many entries as the mask has ``True`` values, so
``make_fx`` records one particular count and the graph is wrong for the next input. Most such
indexing in models and flows is an *assignment* through a mask, ``y[mask] = x[mask]`` or
``y[mask] = 0`` (Pyro's rational-quadratic spline writes the identity outside its box so), and
autograd's backward of it. Those have a fixed-shape equivalent, ``where(mask, x, y)``, which
:func:`mask_assignments_as_selects` substitutes; :func:`data_dependent_shapes` then reports
whatever value-dependent op is left.
"""

from __future__ import annotations

import torch
import torch.fx as fx

__all__ = ["data_dependent_shapes", "mask_assignments_as_selects"]

aten = torch.ops.aten

_MASK_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_DATA_SHAPED = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten.unique_dim.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
}
_ZEROS = {aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default}


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def data_dependent_shapes(graph: fx.Graph) -> list[str]:
    """Ops whose output shape depends on the inputs' values (boolean-mask indexing, ``nonzero``...
    on a tensor computed from the inputs).

    ``make_fx`` records such a shape as a constant, so the graph is only right for inputs
    that select the same number of entries; a traced function containing one must not be reused.
    """
    varying = _input_dependent(graph)
    found = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _DATA_SHAPED and node in varying:
            found.append(node.name)
        elif node.target in _MASK_INDEXING:
            indices = node.args[1] if len(node.args) > 1 else []
            if any(
                index in varying and _val(index) is not None and _val(index).dtype == torch.bool for index in indices
            ):
                found.append(node.name)
    return found


def _input_dependent(graph: fx.Graph) -> set:
    """The nodes whose values depend on the graph's inputs. A mask computed from constants only
    (the lower triangle an LKJ Cholesky factor's density selects) selects the same number of
    entries for every input, so the recorded shape stays right."""
    varying: set = set()
    for node in graph.nodes:  # in topological order
        if node.op == "placeholder" or any(arg in varying for arg in node.all_input_nodes):
            varying.add(node)
    return varying


def _full_mask(node: fx.Node, target: fx.Node) -> fx.Node | None:
    """The one boolean index of ``node`` when it has ``target``'s full shape, else ``None``."""
    indices = node.args[1]
    if not isinstance(indices, (list, tuple)) or len(indices) != 1:
        return None
    mask, value = indices[0], _val(target)
    mask_value = _val(mask)
    if not (isinstance(mask_value, torch.Tensor) and isinstance(value, torch.Tensor)):
        return None
    if mask_value.dtype != torch.bool or mask_value.shape != value.shape:
        return None
    return mask


def _gathered_from(node, mask: fx.Node) -> fx.Node | None:
    """``src`` when ``node`` is ``src[mask]`` (an ``index`` with the same full-shape mask)."""
    if (
        isinstance(node, fx.Node)
        and node.target is aten.index.Tensor
        and _same_value(_full_mask(node, node.args[0]), mask)
    ):
        return node.args[0]
    return None


def _same_value(a, b) -> bool:
    """``a`` and ``b`` are one node, or the same pure op of the same inputs (``~mask`` written
    twice in ``y[~mask] = x[~mask]``)."""
    if a is b:
        return True
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a.op != "call_function":
        return False
    schema = getattr(a.target, "_schema", None)
    return (
        a.target == b.target
        and schema is not None
        and not schema.is_mutable
        and a.kwargs == b.kwargs
        and len(a.args) == len(b.args)
        and all(_same_value(x, y) if isinstance(x, fx.Node) else x == y for x, y in zip(a.args, b.args))
    )


def _is_zeros(node) -> bool:
    """Whether ``node`` is a tensor of zeros: a ``zeros`` op or a zero constant."""
    if not isinstance(node, fx.Node):
        return False
    if node.target in _ZEROS:
        return True
    if node.target is aten.lift_fresh_copy.default:
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = getattr(node.graph.owning_module, node.target, None)
        return isinstance(value, torch.Tensor) and bool((value == 0).all())
    return False


def _scalar(node) -> fx.Node | None:
    """``node`` when it is a one-number constant that broadcasts into any shape."""
    value = _val(node)
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return node
    return None


def _select_for(node: fx.Node) -> tuple | None:
    """``(mask, new, old)`` such that ``node`` equals ``where(mask, new, old)``, or ``None``."""
    target = node.target
    if target not in (aten.index_put.default, aten.index_put_.default) or node.kwargs:
        return None
    dst, _, values = node.args[:3]
    accumulate = len(node.args) > 3 and node.args[3]
    mask = _full_mask(node, dst)
    if mask is None:
        return None
    source = _gathered_from(values, mask)
    if source is not None and not accumulate:
        return mask, source, dst  # y[mask] = x[mask]
    if source is not None and _is_zeros(dst):
        # The backward of x[mask]: zeros.index_put([mask], g[mask], accumulate=True).
        return mask, source, 0.0
    if not accumulate and _scalar(values) is not None:
        return mask, values, dst  # y[mask] = c
    if not accumulate and _is_zeros(values):
        # y[mask] = zeros(k): the backward of an assignment, with k the number of True entries.
        return mask, 0.0, dst
    return None


def _aliased(node: fx.Node, after: int, order: dict) -> bool:
    """Whether an in-place write to ``node`` could be seen through a view (of it, or it of
    another tensor): then redirecting ``node``'s own readers would not be enough."""
    if node.op != "call_function" or _is_view(node):
        return True
    return any(_is_view(user) and order.get(user, -1) < after for user in node.users)


def _is_view(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(
        arg.alias_info is not None and not arg.alias_info.is_write for arg in schema.arguments
    )


def _constant(graph: fx.Graph, value, dtype: torch.dtype):
    """``value`` itself if it is a node, else a 0-d tensor node holding it."""
    if isinstance(value, fx.Node):
        return value
    node = graph.call_function(aten.scalar_tensor.default, (value,), {"dtype": dtype})
    node.meta["val"] = torch.zeros((), dtype=dtype)
    return node


def mask_assignments_as_selects(gm: fx.GraphModule) -> int:
    """Rewrite boolean-mask assignments (and their backward) as ``where``; return how many.

    An in-place ``index_put_`` also redirects the later users of the tensor it wrote to the
    select, so every reader after the write sees the assigned values, as before.
    """
    graph, count = gm.graph, 0
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        found = _select_for(node)
        if found is None:
            continue
        mask, new, old = found
        if node.target is aten.index_put_.default and (
            not isinstance(old, fx.Node) or _aliased(old, order[node], order)
        ):
            continue
        if any(isinstance(value, fx.Node) and _val(value).dtype != _val(node).dtype for value in (new, old)):
            continue  # a where over mixed dtypes would promote; the assignment keeps the dtype
        with graph.inserting_before(node):
            dtype = _val(node).dtype
            new, old = (_constant(graph, value, dtype) for value in (new, old))
            select = graph.call_function(aten.where.self, (mask, new, old))
        select.meta.update(node.meta)
        if node.target is aten.index_put_.default:
            for user in list(old.users):
                if user is not select and user is not node and order.get(user, -1) > order[node]:
                    user.replace_input_with(old, select)
        node.replace_all_uses_with(select)
        graph.erase_node(node)
        count += 1
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return count
