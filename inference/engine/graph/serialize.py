r"""An ATen graph sent to another process node for node.

Pickling a ``torch.fx.GraphModule`` sends its generated Python code, which the receiver traces
again: a regression's NUTS leaf came back with 200 nodes instead of 196, and Inductor compiled that
graph into a kernel that failed the eager check, where the original graph compiles right. These
functions send the nodes themselves (operation, name, target, arguments) and the tensors of the
graph's attributes, so that the receiver rebuilds the same graph. Node metadata (fake values,
stack traces) stays behind: the compiler traces the graph again on its example inputs.
"""

from __future__ import annotations

import builtins
import operator
import pickle
from typing import Any

import torch

from vilab.inference.engine.backends.torch_internals import OpOverload

__all__ = ["dumps_graph", "loads_graph"]

_PRIMITIVES = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def dumps_graph(graph_module: torch.fx.GraphModule) -> bytes:
    """``graph_module``'s nodes and attribute tensors as bytes for :func:`loads_graph`. Raises
    ``TypeError`` for a node target or argument that is not an ATen operator, a function of
    :mod:`operator` or :mod:`builtins`, a node, or a plain value."""
    nodes, attributes = [], {}
    for node in graph_module.graph.nodes:
        if node.op == "get_attr":
            attributes[node.target] = _attribute(graph_module, node.target)
        target = node.target if node.op in ("placeholder", "get_attr", "output") else _target(node.target)
        nodes.append((node.op, node.name, target, _encode(node.args), _encode(node.kwargs)))
    return pickle.dumps((nodes, attributes))


def loads_graph(blob: bytes) -> torch.fx.GraphModule:
    """The graph module :func:`dumps_graph` sent: the same nodes, in the same order."""
    nodes, attributes = pickle.loads(blob)
    graph, made = torch.fx.Graph(), {}
    for op, name, target, args, kwargs in nodes:
        if op not in ("placeholder", "get_attr", "output"):
            target = _resolve(target)
        node = graph.create_node(op, target, _decode(args, made), _decode(kwargs, made), name=name)
        if node.name != name:
            raise ValueError(f"blob: node {name!r} came back as {node.name!r}")
        made[name] = node
    root = torch.nn.Module()
    for path, tensor in attributes.items():
        _set_attribute(root, path, tensor)
    return torch.fx.GraphModule(root, graph)


def _attribute(module: torch.nn.Module, path: str) -> torch.Tensor:
    value = operator.attrgetter(path)(module)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"graph_module: expected a tensor attribute at {path!r}; got {type(value).__name__}")
    return value.detach()


def _set_attribute(root: torch.nn.Module, path: str, tensor: torch.Tensor) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        if not hasattr(root, part):
            root.add_module(part, torch.nn.Module())
        root = getattr(root, part)
    root.register_buffer(leaf, tensor)


def _target(target: Any) -> tuple[str, ...]:
    if isinstance(target, OpOverload):
        namespace, name = target._schema.name.split("::")
        return ("op", namespace, name, target._overloadname)
    for module in (operator, builtins):
        if getattr(module, getattr(target, "__name__", ""), None) is target:
            return ("function", module.__name__, target.__name__)
    raise TypeError(
        f"graph_module: expected ATen operators and operator/builtins functions as node targets; got {target!r}"
    )


def _resolve(target: tuple[str, ...]) -> Any:
    if target[0] == "op":
        _, namespace, name, overload = target
        return getattr(getattr(getattr(torch.ops, namespace), name), overload)
    _, module, name = target
    return getattr(operator if module == "operator" else builtins, name)


def _encode(value: Any) -> Any:
    if isinstance(value, torch.fx.Node):
        return ("node", value.name)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_encode(item) for item in value])
    if isinstance(value, dict):
        return ("dict", [(key, _encode(item)) for key, item in value.items()])
    if isinstance(value, slice):
        return ("slice", [_encode(value.start), _encode(value.stop), _encode(value.step)])
    if isinstance(value, _PRIMITIVES):
        return ("value", value)
    raise TypeError(f"graph_module: cannot send a node argument of type {type(value).__name__}")


def _decode(encoded: Any, made: dict[str, torch.fx.Node]) -> Any:
    kind, payload = encoded
    if kind == "node":
        return made[payload]
    if kind in ("list", "tuple", "immutable_list"):
        items = [_decode(item, made) for item in payload]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return {key: _decode(item, made) for key, item in payload}
    if kind == "slice":
        return slice(*(_decode(item, made) for item in payload))
    return payload
