"""The virtual machine's views: ATen ops that only re-index a tensor (select, slice, transpose,\npermute, unsqueeze, squeeze, expand, reshape of a contiguous tensor, unbind, flip), translated\ninto strided views of the arena without copying."""

from __future__ import annotations


import math

import torch

from vilab.inference.engine.backends.vm_program import Unsupported, _contiguous_strides, _dim, _View

__all__ = ["HANDLERS", "cast_op", "check_reference"]

aten = torch.ops.aten


# -- views -------------------------------------------------------------------------------------


def _select(program, expected, a, dim, index):
    dim = _dim(dim, len(a.shape))
    index = index + a.shape[dim] if index < 0 else index
    return _View(a.off + index * a.st[dim], a.shape[:dim] + a.shape[dim + 1 :], a.st[:dim] + a.st[dim + 1 :], a.dtype)


def _slice(program, expected, a, dim=0, start=None, end=None, step=1):
    dim = _dim(dim, len(a.shape))
    start, end, _ = slice(start, end, step).indices(a.shape[dim])
    size = max(0, -(-(end - start) // step))
    shape = a.shape[:dim] + (size,) + a.shape[dim + 1 :]
    st = a.st[:dim] + (a.st[dim] * step,) + a.st[dim + 1 :]
    return _View(a.off + start * a.st[dim], shape, st, a.dtype)


def _transpose(program, expected, a, d0, d1):
    order = list(range(len(a.shape)))
    d0, d1 = _dim(d0, len(order)), _dim(d1, len(order))
    order[d0], order[d1] = order[d1], order[d0]
    return _permute(program, expected, a, order)


def _permute(program, expected, a, dims):
    dims = [_dim(d, len(a.shape)) for d in dims]
    return _View(a.off, [a.shape[d] for d in dims], [a.st[d] for d in dims], a.dtype)


def _t(program, expected, a):
    return _permute(program, expected, a, list(reversed(range(len(a.shape)))))


def _unsqueeze(program, expected, a, dim):
    dim = _dim(dim, len(a.shape) + 1)
    return _View(a.off, a.shape[:dim] + (1,) + a.shape[dim:], a.st[:dim] + (0,) + a.st[dim:], a.dtype)


def _squeeze(program, expected, a, dim=None):
    dims = (
        range(len(a.shape))
        if dim is None
        else [_dim(d, len(a.shape)) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
    )
    keep = [d for d in range(len(a.shape)) if not (d in dims and a.shape[d] == 1)]
    return _View(a.off, [a.shape[d] for d in keep], [a.st[d] for d in keep], a.dtype)


def _expand(program, expected, a, size, implicit=False):
    lead = len(size) - len(a.shape)
    shape, st = list(size[:lead]), [0] * lead
    for old, stride, new in zip(a.shape, a.st, size[lead:]):
        shape.append(old if new == -1 else new)
        st.append(stride if old == shape[-1] and old != 1 else 0)
    return _View(a.off, shape, st, a.dtype)


def _reshape(program, expected, a, shape):
    shape = tuple(expected.shape)
    if not a.contiguous():  # a copy first, as PyTorch's reshape of such a view
        copy = program.alloc(a.shape, a.dtype)
        program.emit("COPY", copy, a)
        a = copy
    return _View(a.off, shape, _contiguous_strides(shape), a.dtype)


def _unbind(program, expected, a, dim=0):
    return tuple(_select(program, None, a, dim, index) for index in range(a.shape[_dim(dim, len(a.shape))]))


def _flip(program, expected, a, dims):
    off, st = a.off, list(a.st)
    for d in (_dim(d, len(a.shape)) for d in dims):
        off += (a.shape[d] - 1) * st[d]
        st[d] = -st[d]
    return _View(off, a.shape, st, a.dtype)


def _noop(program, expected, a, *args, **kwargs):
    return a


# -- copies into views of a new value ----------------------------------------------------------


def _diagonal(program, expected, a, offset=0, dim1=0, dim2=1):
    d1, d2 = _dim(dim1, len(a.shape)), _dim(dim2, len(a.shape))
    start = offset * a.st[d2] if offset >= 0 else -offset * a.st[d1]
    length = max(0, min(a.shape[d1], a.shape[d2] - offset) if offset >= 0 else min(a.shape[d1] + offset, a.shape[d2]))
    keep = [d for d in range(len(a.shape)) if d not in (d1, d2)]
    shape = [a.shape[d] for d in keep] + [length]
    return _View(a.off + start, shape, [a.st[d] for d in keep] + [a.st[d1] + a.st[d2]], a.dtype)


def _diagonal_backward(program, expected, grad, input_sizes, offset, dim1, dim2):
    out = program.alloc(tuple(expected.shape), expected.dtype)
    program.emit("FILL", out, params=(0.0,))
    program.emit("COPY", _diagonal(program, None, out, offset, dim1, dim2), grad)
    return out


def _new_empty_strided(program, expected, a, size, stride, **options):
    """A fresh region laid out with ``stride`` (its contents undefined, as ``empty``'s)."""
    if any(st < 0 for st in stride):
        raise Unsupported(f"new_empty_strided with negative strides {tuple(stride)}")
    view = program.alloc(
        (1 + sum((n - 1) * st for n, st in zip(size, stride)),) if 0 not in size else (0,), expected.dtype
    )
    return _View(view.off, size, stride, expected.dtype)


def check_reference(node, values: dict) -> None:
    """Raise :class:`Unsupported` where ``node`` re-indexes storage in a way its arena view cannot
    follow: ``as_strided`` of a tensor that is not the whole of its own storage (contiguous, at
    offset 0), whose strides and offset would then count in another layout than the arena's."""
    if node.target is not aten.as_strided.default:
        return
    source = node.args[0]
    base = values.get(source)
    whole = (
        source.op != "placeholder"  # a caller's tensor may be a view of a larger one
        and isinstance(base, torch.Tensor)
        and base.is_contiguous()
        and base.storage_offset() == 0
        and base.untyped_storage().nbytes() == base.numel() * base.element_size()
    )
    if not whole:
        raise Unsupported("as_strided of a tensor that is not the whole of its storage")


def _as_strided(program, expected, a, size, stride, storage_offset=None):
    """A view of ``a`` (the whole of its storage: :func:`check_reference`), within ``a``."""
    offset = storage_offset or 0
    reach = offset + sum((n - 1) * st for n, st in zip(size, stride) if n > 0)
    if not a.contiguous() or any(st < 0 for st in stride) or (0 not in size and reach >= math.prod(a.shape)):
        raise Unsupported(
            f"as_strided{tuple(size), tuple(stride), offset} outside a contiguous tensor of shape {a.shape}"
        )
    return _View(a.off + offset, size, stride, a.dtype)


def cast_op(target: torch.dtype, source: torch.dtype) -> str:
    """The instruction that converts arena values of dtype ``source`` into ``target``'s."""
    if target == torch.bool:
        return "CAST_BOOL"
    if not target.is_floating_point:
        return "CAST_INT"
    return "CAST_F32" if target == torch.float32 and source != torch.float32 else "COPY"


def _copy_(program, expected, destination, source, non_blocking=False):
    """``destination[...] = source`` (broadcast, converted to the destination's dtype), in place:
    the value returned is the destination's view, which later nodes read. (PyTorch refuses a
    source that partly overlaps the destination, so a traced graph has none.)"""
    if any(st == 0 and n > 1 for n, st in zip(destination.shape, destination.st)):
        raise Unsupported("copy_ into a broadcast view")
    if program.overlaps_constant(destination):
        raise Unsupported("copy_ into a constant")
    program.emit(
        cast_op(destination.dtype, getattr(source, "dtype", torch.float64)), destination, program.operand(source)
    )
    return destination


HANDLERS: dict = {
    aten.diagonal.default: _diagonal,
    aten.diagonal_backward.default: _diagonal_backward,
    aten.new_empty_strided.default: _new_empty_strided,
    aten.as_strided.default: _as_strided,
    aten.copy_.default: _copy_,
    aten.fill_.Tensor: _copy_,
    aten.fill_.Scalar: _copy_,
}
