"""The virtual machine's views: ATen ops that only re-index a tensor (select, slice, transpose,\npermute, unsqueeze, squeeze, expand, reshape of a contiguous tensor, unbind, flip), translated\ninto strided views of the arena without copying."""

from __future__ import annotations


from vilab.inference.engine.backends.vm_program import _contiguous_strides, _dim, _View

__all__ = []


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
