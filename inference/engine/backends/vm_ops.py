"""ATen ops as instructions of the virtual machine (:mod:`~vilab.inference.engine.backends.vm`).

Views (select, slice, transpose, expand, reshape of a contiguous value, flip) cost nothing: they
change an operand's offset and strides. Elementwise ops are one instruction each; a reduction is
a fill and an accumulation into an output whose strides are 0 along the reduced dimensions;
concatenation, padding and the backward of slicing write into views of a filled output. Each
node's shape and dtype are checked against the graph run on the example inputs.
"""

from __future__ import annotations

import math
import operator
from typing import Callable, Sequence

import torch

from vilab.inference.engine.backends.vm_program import _DTYPE, Program, Unsupported, _contiguous_strides, _dim, _View

from vilab.inference.engine.backends import vm_matrix, vm_views

__all__ = ["translate"]

aten = torch.ops.aten
_UNARY = {
    aten.neg.default: "NEG",
    aten.exp.default: "EXP",
    aten.log.default: "LOG",
    aten.log1p.default: "LOG1P",
    aten.sqrt.default: "SQRT",
    aten.sigmoid.default: "SIGMOID",
    aten.abs.default: "ABS",
    aten.tanh.default: "TANH",
    aten.expm1.default: "EXPM1",
    aten.reciprocal.default: "RECIPROCAL",
    aten.sign.default: "SIGN",
    aten.isnan.default: "ISNAN",
    aten.isinf.default: "ISINF",
    aten.bitwise_not.default: "NOT",
    aten.logical_not.default: "NOT",
    aten.erf.default: "ERF",
    aten.erfc.default: "ERFC",
    aten.lgamma.default: "LGAMMA",
    aten.digamma.default: "DIGAMMA",
    aten.atan.default: "ATAN",
    aten.sin.default: "SIN",
    aten.cos.default: "COS",
}
_BINARY = {
    aten.mul.Tensor: "MUL",
    aten.mul.Scalar: "MUL",
    aten.div.Tensor: "DIV",
    aten.div.Scalar: "DIV",
    aten.fmin.default: "FMIN",
    aten.fmax.default: "FMAX",
    aten.maximum.default: "MAXIMUM",
    aten.minimum.default: "MINIMUM",
    aten.logaddexp.default: "LOGADDEXP",
    aten.xlogy.Tensor: "XLOGY",
    aten.sigmoid_backward.default: "SIGMOID_BACKWARD",
    aten.log_sigmoid_backward.default: "LOG_SIGMOID_BACKWARD",
}
for _name, _code in (("lt", "LT"), ("le", "LE"), ("gt", "GT"), ("ge", "GE"), ("eq", "EQ"), ("ne", "NE")):
    _BINARY[getattr(aten, _name).Tensor] = _BINARY[getattr(aten, _name).Scalar] = _code
_LOGICAL = {
    aten.bitwise_and.Tensor: "AND",
    aten.bitwise_or.Tensor: "OR",
    aten.bitwise_xor.Tensor: "LOGICAL_XOR",
    aten.logical_and.default: "AND",
    aten.logical_or.default: "OR",
    aten.logical_xor.default: "LOGICAL_XOR",
}
_INPLACE = {
    aten.clamp_.default: aten.clamp.default,
    aten.masked_fill_.Scalar: aten.masked_fill.Scalar,
    aten.logical_and_.default: aten.logical_and.default,
    aten.mul_.Tensor: aten.mul.Tensor,
    aten.add_.Tensor: aten.add.Tensor,
}
_NOOP_VIEWS = {aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default}


def translate(graph: torch.fx.GraphModule, example: Sequence[torch.Tensor], program: Program) -> tuple:
    """Emit ``graph`` into ``program``; returns ``(program, [(shape, dtype) per output])``."""
    values = _reference_values(graph, example)
    env: dict = {}
    placeholders = [node for node in graph.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != len(example):
        raise Unsupported(f"{len(placeholders)} graph inputs for {len(example)} example inputs")
    for index, (node, tensor) in enumerate(zip(placeholders, example)):
        if tensor.dtype not in _DTYPE:
            raise Unsupported(f"input dtype {tensor.dtype}")
        view = program.alloc(tuple(tensor.shape), tensor.dtype)
        source = _View(0, tensor.shape, tensor.stride(), tensor.dtype)
        program.emit("LOAD", view, source, io=index, dtype=_DTYPE[tensor.dtype])
        env[node] = view
    outputs: list[tuple] = []
    for node in graph.graph.nodes:
        if node.op == "get_attr":
            env[node] = program.constant(getattr(graph, node.target))
        elif node.op == "call_function":
            vm_views.check_reference(node, values)
            env[node] = _call(node, env, values[node], program)
            _check(node, env[node], values[node])
        elif node.op == "output":
            results = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            for result in results:
                value = env[result] if isinstance(result, torch.fx.Node) else None
                if not isinstance(value, _View):
                    raise Unsupported("an output that is not a tensor")
                expected = values[result]
                store = _View(0, expected.shape, _contiguous_strides(expected.shape), expected.dtype)
                program.emit("STORE", store, value, io=len(example) + len(outputs), dtype=_DTYPE[expected.dtype])
                outputs.append((tuple(expected.shape), expected.dtype))
    return program, outputs


def _reference_values(graph: torch.fx.GraphModule, example: Sequence[torch.Tensor]) -> dict:
    """Each node's value on the example inputs (for shapes and dtypes)."""
    values = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            values[node] = result
            return result

    with torch.no_grad():
        Recorder(graph).run(*[tensor.clone() for tensor in example])
    return values


def _check(node: torch.fx.Node, value, expected) -> None:
    pairs = zip(value, expected) if isinstance(value, tuple) else [(value, expected)]
    for got, want in pairs:
        if isinstance(want, torch.Tensor):
            if not isinstance(got, _View) or tuple(got.shape) != tuple(want.shape):
                raise Unsupported(
                    f"{node.target}: translated shape {getattr(got, 'shape', None)}, expected {tuple(want.shape)}"
                )
            if want.dtype not in _DTYPE:
                raise Unsupported(f"{node.target}: dtype {want.dtype}")
            got.dtype = want.dtype


def _call(node: torch.fx.Node, env: dict, expected, program: Program):
    target = node.target
    args = torch.fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
    if target is operator.getitem:
        return args[0][args[1]]
    if target in _INPLACE:
        destination = args[0]
        if 0 in destination.st and math.prod(destination.shape) > 1:
            raise Unsupported(f"{target} writes into a broadcast view")
        result = _call_function(_INPLACE[target], args, kwargs, expected, program)
        program.emit("COPY", destination, result)
        return destination
    return _call_function(target, args, kwargs, expected, program)


def _call_function(target, args, kwargs, expected, program: Program):
    handler = _HANDLERS.get(target)
    if handler is not None:
        return handler(program, expected, *args, **kwargs)
    if target in _UNARY:
        return _elementwise(program, expected, _UNARY[target], args[0])
    if target in _BINARY:
        return _elementwise(program, expected, _BINARY[target], args[0], args[1])
    if target in _LOGICAL:
        if any(isinstance(a, _View) and a.dtype != torch.bool for a in args[:2]):
            raise Unsupported(f"{target} on integers (bitwise)")
        return _elementwise(program, expected, _LOGICAL[target], args[0], args[1])
    raise Unsupported(f"op {target}")


def _out(program: Program, expected) -> _View:
    return program.alloc(tuple(expected.shape), expected.dtype)


def _elementwise(program: Program, expected, op: str, *operands, params=()) -> _View:
    out = _out(program, expected)
    program.emit(op, out, *[program.operand(value) for value in operands], params=params)
    return out


def _scaled(program: Program, value, alpha) -> object:
    if alpha == 1:
        return value
    if not isinstance(value, _View):
        return value * alpha
    out = program.alloc(value.shape, value.dtype)
    program.emit("MUL", out, value, program.operand(alpha))
    return out


def _add(program, expected, a, b, alpha=1):
    return _elementwise(program, expected, "ADD", a, _scaled(program, b, alpha))


def _sub(program, expected, a, b, alpha=1):
    return _elementwise(program, expected, "SUB", a, _scaled(program, b, alpha))


def _rsub(program, expected, a, b, alpha=1):
    return _elementwise(program, expected, "SUB", b, _scaled(program, a, alpha))


def _pow(program, expected, a, exponent):
    return _elementwise(program, expected, "POW", a, params=(exponent,))


def _clamp(program, expected, a, min=None, max=None):
    if isinstance(min, _View) or isinstance(max, _View):
        raise Unsupported("clamp with tensor bounds")
    flags = (min is not None) + 2 * (max is not None)
    return _elementwise(program, expected, "CLAMP", a, params=(min or 0.0, max or 0.0, flags))


def _where(program, expected, condition, a, b):
    return _elementwise(program, expected, "WHERE", condition, a, b)


def _masked_fill(program, expected, a, mask, value):
    return _elementwise(program, expected, "WHERE", mask, value, a)


def _softplus(program, expected, a, beta=1, threshold=20):
    return _elementwise(program, expected, "SOFTPLUS", a, params=(beta, threshold))


def _softplus_backward(program, expected, grad, a, beta=1, threshold=20):
    return _elementwise(program, expected, "SOFTPLUS_BACKWARD", grad, a, params=(beta, threshold))


def _log_sigmoid_forward(program, expected, a):
    out = _elementwise(program, expected[0], "LOG_SIGMOID", a)
    return out, _elementwise(program, expected[1], "LOG_SIGMOID_BUFFER", a)


def _log_sigmoid_backward(program, expected, grad, a, buffer):
    return _elementwise(program, expected, "LOG_SIGMOID_BACKWARD", grad, a)


def _nan_to_num(program, expected, a, nan=None, posinf=None, neginf=None):
    info = torch.finfo(expected.dtype)
    params = (
        0.0 if nan is None else nan,
        info.max if posinf is None else posinf,
        info.min if neginf is None else neginf,
    )
    return _elementwise(program, expected, "NAN_TO_NUM", a, params=params)


def _to_copy(program, expected, a, dtype=None, **options):
    if options.get("device") not in (None, torch.device("cpu"), "cpu"):
        raise Unsupported(f"_to_copy to {options['device']}")
    op = vm_views.cast_op(expected.dtype, a.dtype)
    return _elementwise(program, expected, op, a)


def _clone(program, expected, a, **options):
    return _elementwise(program, expected, "COPY", a)


def _filled(program, expected, value) -> _View:
    out = _out(program, expected)
    program.emit("FILL", out, params=(value,))
    return out


def _mean(program, expected, a, dims=None, keepdim=False, dtype=None):
    total = _sum(program, expected, a, dims, keepdim)
    count = math.prod(a.shape) // max(1, math.prod(expected.shape))
    program.emit("DIV", total, total, program.operand(float(count)))
    return total


def _full(program, expected, size, fill_value, **kwargs):
    return _filled(program, expected, fill_value)


def _scalar_tensor(program, expected, value, **kwargs):
    return _filled(program, expected, value)


def _cat(program, expected, tensors, dim=0):
    out = _out(program, expected)
    dim = _dim(dim, len(out.shape))
    start = 0
    for tensor in tensors:
        if len(tensor.shape) == 1 and tensor.shape[0] == 0 and len(out.shape) != 1:
            continue  # an empty 1-d tensor, which cat skips
        size = tensor.shape[dim]
        program.emit("COPY", vm_views._slice(program, None, out, dim, start, start + size), tensor)
        start += size
    return out


def _stack(program, expected, tensors, dim=0):
    out = _out(program, expected)
    dim = _dim(dim, len(out.shape))
    for index, tensor in enumerate(tensors):
        program.emit("COPY", vm_views._select(program, None, out, dim, index), tensor)
    return out


def _constant_pad_nd(program, expected, a, pad, value=0.0):
    out = _filled(program, expected, value)
    source, target = a, out
    for pair in range(len(pad) // 2):
        dim = len(out.shape) - 1 - pair
        left, right = pad[2 * pair], pad[2 * pair + 1]
        size = out.shape[dim] - max(left, 0) - max(right, 0)
        target = vm_views._slice(program, None, target, dim, max(left, 0), max(left, 0) + size)
        source = vm_views._slice(program, None, source, dim, max(-left, 0), max(-left, 0) + size)
    program.emit("COPY", target, source)
    return out


def _slice_backward(program, expected, grad, input_sizes, dim, start, end, step):
    out = _filled(program, expected, 0.0)
    program.emit("COPY", vm_views._slice(program, None, out, dim, start, end, step), grad)
    return out


def _select_backward(program, expected, grad, input_sizes, dim, index):
    out = _filled(program, expected, 0.0)
    program.emit("COPY", vm_views._select(program, None, out, dim, index), grad)
    return out


# -- reductions, scans and products ------------------------------------------------------------


def _reduced(program, expected, a, dims, keepdim, op: str, identity: float, dtype=None) -> _View:
    """Fill the output with ``identity`` and accumulate ``a`` into it with ``op``."""
    nd = len(a.shape)
    dims = range(nd) if dims is None or len(dims) == 0 else sorted({_dim(d, nd) for d in dims})
    out = _filled(program, expected, identity)
    program.emit(op, _keepdim_view(out, a, dims), a, shape=a.shape)
    return out


def _keepdim_view(out: _View, a: _View, dims) -> _View:
    """``out`` (the reduction of ``a`` over ``dims``, kept or not) with ``a``'s dimensions, of
    stride 0 along ``dims``."""
    st, source = [], iter(zip(out.shape, out.st)) if len(out.shape) != len(a.shape) else None
    for d in range(len(a.shape)):
        if source is None:
            st.append(0 if d in dims else out.st[d])
        elif d in dims:
            st.append(0)
        else:
            st.append(next(source)[1])
    return _View(out.off, [1 if d in dims else size for d, size in enumerate(a.shape)], st, out.dtype)


def _sum(program, expected, a, dims=None, keepdim=False, dtype=None):
    return _reduced(program, expected, a, dims, keepdim, "SUM_ACC", 0.0)


def _prod(program, expected, a, dim=None, keepdim=False, dtype=None):
    return _reduced(program, expected, a, None if dim is None else [dim], keepdim, "PROD_ACC", 1.0)


def _any(program, expected, a, dim=None, keepdim=False):
    dims = None if dim is None else (dim if isinstance(dim, (list, tuple)) else [dim])
    return _reduced(program, expected, a, dims, keepdim, "OR_ACC", 0.0)


def _amax(program, expected, a, dims=(), keepdim=False):
    return _reduced(program, expected, a, dims, keepdim, "MAX_ACC", -math.inf)


def _amin(program, expected, a, dims=(), keepdim=False):
    return _reduced(program, expected, a, dims, keepdim, "MIN_ACC", math.inf)


def _max_all(program, expected, a):
    return _amax(program, expected, a, None)


def _min_all(program, expected, a):
    return _amin(program, expected, a, None)


def _max_dim(program, expected, a, dim, keepdim=False):
    dim = _dim(dim, len(a.shape))
    values = _amax(program, expected[0], a, [dim], keepdim)
    indices = _filled(program, expected[1], -1.0)
    program.emit(
        "ARGMAX", _keepdim_view(indices, a, [dim]), a, _keepdim_view(values, a, [dim]), shape=a.shape, params=(dim,)
    )
    return values, indices


def _scan(op: str) -> Callable:
    def scan(program, expected, a, dim, dtype=None):
        out = _out(program, expected)
        program.emit(op, out, a, params=(_dim(dim, len(a.shape)),))
        return out

    return scan


_HANDLERS: dict = {
    aten.add.Tensor: _add,
    aten.add.Scalar: _add,
    aten.sub.Tensor: _sub,
    aten.sub.Scalar: _sub,
    aten.rsub.Scalar: _rsub,
    aten.rsub.Tensor: _rsub,
    aten.pow.Tensor_Scalar: _pow,
    aten.clamp.default: _clamp,
    aten.clamp_min.default: lambda p, e, a, m: _clamp(p, e, a, min=m),
    aten.clamp_max.default: lambda p, e, a, m: _clamp(p, e, a, max=m),
    aten.where.self: _where,
    aten.masked_fill.Scalar: _masked_fill,
    aten.masked_fill.Tensor: _masked_fill,
    aten.softplus.default: _softplus,
    aten.softplus_backward.default: _softplus_backward,
    aten.log_sigmoid_forward.default: _log_sigmoid_forward,
    aten.log_sigmoid_backward.default: _log_sigmoid_backward,
    aten.nan_to_num.default: _nan_to_num,
    aten._to_copy.default: _to_copy,
    aten.clone.default: _clone,
    aten.new_ones.default: lambda p, e, *a, **k: _filled(p, e, 1.0),
    aten.new_zeros.default: lambda p, e, *a, **k: _filled(p, e, 0.0),
    aten.full.default: _full,
    aten.zeros.default: lambda p, e, *a, **k: _filled(p, e, 0.0),
    aten.scalar_tensor.default: _scalar_tensor,
    aten.ones_like.default: lambda p, e, *a, **k: _filled(p, e, 1.0),
    aten.zeros_like.default: lambda p, e, *a, **k: _filled(p, e, 0.0),
    aten.full_like.default: lambda p, e, a, value, **k: _filled(p, e, value),
    aten.mean.dim: _mean,
    aten.mean.default: _mean,
    aten.select.int: vm_views._select,
    aten.slice.Tensor: vm_views._slice,
    aten.transpose.int: vm_views._transpose,
    aten.permute.default: vm_views._permute,
    aten.t.default: vm_views._t,
    aten.unsqueeze.default: vm_views._unsqueeze,
    aten.squeeze.dim: vm_views._squeeze,
    aten.squeeze.dims: vm_views._squeeze,
    aten.squeeze.default: vm_views._squeeze,
    aten.expand.default: vm_views._expand,
    aten.view.default: vm_views._reshape,
    aten._unsafe_view.default: vm_views._reshape,
    aten.reshape.default: vm_views._reshape,
    aten.unbind.int: vm_views._unbind,
    aten.flip.default: vm_views._flip,
    aten.cat.default: _cat,
    aten.stack.default: _stack,
    aten.constant_pad_nd.default: _constant_pad_nd,
    aten.slice_backward.default: _slice_backward,
    aten.select_backward.default: _select_backward,
    aten.sum.dim_IntList: _sum,
    aten.sum.default: _sum,
    aten.prod.dim_int: _prod,
    aten.prod.default: _prod,
    aten.any.default: _any,
    aten.any.dim: _any,
    aten.any.dims: _any,
    aten.amax.default: _amax,
    aten.amin.default: _amin,
    aten.max.default: _max_all,
    aten.min.default: _min_all,
    aten.max.dim: _max_dim,
    aten.cumsum.default: _scan("CUMSUM"),
    aten.cumprod.default: _scan("CUMPROD"),
    **vm_matrix.HANDLERS,
    **vm_views.HANDLERS,
    **{view: vm_views._noop for view in _NOOP_VIEWS},
}
