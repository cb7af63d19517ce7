r"""The virtual machine's matrix ops: products (``mm``, ``bmm``, ``addmm``), triangular solves
and Cholesky factors, and the small network ops around them in flows (``relu``, ``softmax`` and
their backwards, ``index_select``/``index_add`` by a constant index, as a flow's permutation,
``gather``/``scatter_add`` by a computed one, as a spline's bin).

A product is one multiply-accumulate instruction over ``(batch, n, m, k)``. A triangular solve
and a Cholesky factor are one instruction each (``SOLVE_TRIANGULAR``, ``CHOLESKY`` in ``vm.c``)
whose loop ends with three matrix dimensions: the operands' row and column strides sit there,
so any batch broadcast, transposed or strided operand is read in place.
"""

from __future__ import annotations

import math

import torch

from vilab.inference.engine.backends.vm_program import Program, Unsupported, _dim, _View

__all__ = ["HANDLERS"]

aten = torch.ops.aten
# A constant index becomes one copy per run of evenly spaced entries (a flow's reversal is
# one run); an index with more runs than this is left to the traced step.
MAX_INDEX_RUNS = 64


def _out(program: Program, expected) -> _View:
    return program.alloc(tuple(expected.shape), expected.dtype)


def _transposed(view: _View) -> _View:
    """The view with its last two dimensions swapped (``.mT``)."""
    return _View(
        view.off,
        (*view.shape[:-2], view.shape[-1], view.shape[-2]),
        (*view.st[:-2], view.st[-1], view.st[-2]),
        view.dtype,
    )


def _matrix_view(view: _View, rows: int, cols: int, middle: int) -> _View:
    r"""``view`` ``(*batch, r, c)`` seen over a loop ending ``(rows, middle, cols)``: its row stride
    on the first of the three dimensions, its column stride on the one named by ``middle`` (1 or 2)
    and stride 0 on the other."""
    st = [view.st[-2], 0, 0]
    st[middle] = view.st[-1]
    shape = [rows, 1, 1]
    shape[middle] = cols
    return _View(view.off, (*view.shape[:-2], *shape), (*view.st[:-2], *st), view.dtype)


def _bmm(program, expected, left, right):
    # out[b, i, j] += left[b, i, k] * right[b, k, j], looping over (b, i, j, k)
    out = _out(program, expected)
    program.emit("FILL", out, params=(0.0,))
    batch = left.shape[:-2]
    (n, k), m = left.shape[-2:], right.shape[-1]
    lead = len(batch)
    out_view = _View(out.off, (*batch, n, m, k), (*out.st[:lead], out.st[-2], out.st[-1], 0), out.dtype)
    left_view = _View(left.off, (*batch, n, m, k), (*left.st[:lead], left.st[-2], 0, left.st[-1]), left.dtype)
    right_view = _View(right.off, (*batch, n, m, k), (*right.st[:lead], 0, right.st[-1], right.st[-2]), right.dtype)
    program.emit("MUL_ACC", out_view, left_view, right_view)
    return out


def _addmm(program, expected, bias, left, right, *, beta=1, alpha=1):
    r""":math:`\beta\,\mathrm{bias} + \alpha\,\mathrm{left}\,\mathrm{right}`; with :math:`\beta = 0`
    the bias is not read (a NaN there does not propagate), as in PyTorch."""
    out = _bmm(program, expected, left, right)
    if alpha != 1:
        program.emit("MUL", out, out, program.operand(alpha))
    if beta != 0:  # bias is a tensor (addmm's signature)
        if beta != 1:
            scaled = program.alloc(bias.shape, bias.dtype)
            program.emit("MUL", scaled, bias, program.operand(beta))
            bias = scaled
        program.emit("ADD", out, out, bias)
    return out


def _solve_triangular(program, expected, a, b, *, upper, left=True, unitriangular=False):
    r"""``X`` with :math:`A X = B` (``left``) or :math:`X A = B`, the latter solved as
    :math:`A^\top X^\top = B^\top` (the transposed views, ``upper`` flipped)."""
    out = _out(program, expected)
    x = out
    if not left:
        a, b, x, upper = _transposed(a), _transposed(b), _transposed(out), not upper
    n, k = x.shape[-2:]
    program.emit(
        "SOLVE_TRIANGULAR",
        _matrix_view(x, n, k, 2),
        _matrix_view(a, n, n, 1),
        _matrix_view(b, n, k, 2),
        shape=(*x.shape[:-2], n, n, k),
        params=(float(upper), float(unitriangular)),
    )
    return out


def _cholesky_ex(program, expected, a, *, upper=False, check_errors=False):
    r"""``(L, info)``: the Cholesky factor (``upper``: its transpose, from ``a``'s upper triangle) and
    LAPACK's info per matrix. Where a matrix is not positive definite its factor is all NaN (as in
    JAX) and no error is raised, ``check_errors`` or not: the NaN reaches the step's loss."""
    factor, info = _out(program, expected[0]), _out(program, expected[1])
    lower, source = (_transposed(factor), _transposed(a)) if upper else (factor, a)
    n = a.shape[-1]
    info_view = _View(info.off, (*info.shape, 1, 1, 1), (*info.st, 0, 0, 0), info.dtype)
    program.emit(
        "CHOLESKY",
        _matrix_view(lower, n, n, 1),
        _matrix_view(source, n, n, 1),
        info_view,
        shape=(*factor.shape[:-2], n, n, 1),
    )
    return factor, info


def _check_errors(program, expected, info, api_name, *, is_matrix):
    """Nothing: a failed factorization is NaN on the virtual machine (see :func:`_cholesky_ex`)."""
    return None


def _relu(program, expected, a):
    out = _out(program, expected)
    program.emit("MAXIMUM", out, a, program.operand(0.0))
    return out


def _threshold_backward(program, expected, grad, a, threshold):
    """``grad`` where ``a > threshold``, else 0 (``a <= threshold`` picks 0, so a NaN ``a`` passes ``grad``)."""
    mask = program.alloc(tuple(expected.shape), torch.bool)
    program.emit("LE", mask, a, program.operand(threshold))
    out = _out(program, expected)
    program.emit("WHERE", out, mask, program.operand(0.0), grad)
    return out


def _index_runs(program: Program, index: _View, size: int) -> list[tuple[int, int, int, int]]:
    """``(position, first, step, length)`` per run of evenly spaced entries of a constant index."""
    value = program.constant_value(index)
    if value is None:
        raise Unsupported("an index that is not a constant")
    entries = [entry + size if entry < 0 else entry for entry in value.reshape(-1).tolist()]
    runs, position = [], 0
    while position < len(entries):
        step = entries[position + 1] - entries[position] if position + 1 < len(entries) else 1
        length = 1
        if step != 0:
            while (
                position + length < len(entries) and entries[position + length] - entries[position + length - 1] == step
            ):
                length += 1
        runs.append((position, entries[position], step if length > 1 else 1, length))
        position += length
    if len(runs) > MAX_INDEX_RUNS:
        raise Unsupported(f"an index of {len(runs)} runs (at most {MAX_INDEX_RUNS})")
    return runs


def _strided(view: _View, dim: int, first: int, step: int, length: int) -> _View:
    shape, st = list(view.shape), list(view.st)
    shape[dim], st[dim] = length, view.st[dim] * step
    return _View(view.off + first * view.st[dim], shape, st, view.dtype)


def _index_select(program, expected, a, dim, index):
    dim = _dim(dim, len(a.shape))
    out = _out(program, expected)
    for position, first, step, length in _index_runs(program, index, a.shape[dim]):
        program.emit("COPY", _strided(out, dim, position, 1, length), _strided(a, dim, first, step, length))
    return out


def _index_add(program, expected, a, dim, index, source, *, alpha=1):
    dim = _dim(dim, len(a.shape))
    out = _out(program, expected)
    program.emit("COPY", out, a)
    for position, first, step, length in _index_runs(program, index, a.shape[dim]):
        target = _strided(out, dim, first, step, length)
        term = _strided(source, dim, position, 1, length) if len(source.shape) else source
        if alpha != 1:
            scaled = program.alloc(term.shape, term.dtype)
            program.emit("MUL", scaled, term, program.operand(alpha))
            term = scaled
        program.emit("ADD", target, target, term)
    return out


def _indexed_view(view: _View, shape, dim: int) -> _View:
    """``view`` over an index's ``shape``, with stride 0 along ``dim`` (the instruction adds
    index times ``view``'s stride there)."""
    return _View(view.off, shape, [0 if d == dim else st for d, st in enumerate(view.st)], view.dtype)


def _gather(program, expected, a, dim, index, *, sparse_grad=False):
    dim = _dim(dim, len(a.shape))
    out = _out(program, expected)
    program.emit("GATHER", out, _indexed_view(a, index.shape, dim), index, params=(a.st[dim],))
    return out


def _scatter_add(program, expected, a, dim, index, source):
    dim = _dim(dim, len(a.shape))
    out = _out(program, expected)
    program.emit("COPY", out, a)
    source = _View(source.off, index.shape, source.st, source.dtype)  # the part the index covers
    program.emit(
        "SCATTER_ADD", _indexed_view(out, index.shape, dim), source, index, shape=index.shape, params=(out.st[dim],)
    )
    return out


def _one_tensor_index(program, a: _View, indices) -> tuple[int, torch.Tensor]:
    """``(dim, flat index)`` of an advanced index by one constant integer tensor (the others
    ``None``), its entries wrapped into ``[0, a.shape[dim])``: ``beta[g]`` under ``vmap`` is
    ``index.Tensor(beta, [None, g])``. A computed, boolean, out-of-range or second index is
    refused: the instruction reads memory at the index unchecked."""
    present = [(dim, index) for dim, index in enumerate(indices) if index is not None]
    if len(present) != 1:
        raise Unsupported(f"advanced indexing by {len(present)} tensors (one is translated)")
    dim, index = present[0]
    value = program.constant_value(index) if isinstance(index, _View) else None
    if value is None or value.dtype == torch.bool or value.is_floating_point():
        raise Unsupported("an advanced index that is not a constant integer tensor")
    size = a.shape[dim]
    flat = torch.where(value < 0, value + size, value).reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= size):
        raise Unsupported(f"an advanced index out of range for a dimension of {size}")
    return dim, flat


def _spread(program, flat: torch.Tensor, shape: list, dim: int) -> _View:
    """The flat index as a view over ``shape`` that varies along ``dim`` only (stride 0 elsewhere)."""
    index = program.constant(flat)
    return _View(index.off, shape, [1 if d == dim else 0 for d in range(len(shape))], index.dtype)


def _flat_over_index(view: _View, dim: int, index_ndim: int) -> _View:
    """``view`` (shape ``a[:dim] + index + a[dim + 1:]``) with the index's dims as one, or refused
    where they are not one strided run."""
    shape, st = list(view.shape), list(view.st)
    sizes, strides = shape[dim : dim + index_ndim], st[dim : dim + index_ndim]
    for d in range(index_ndim - 1):
        if sizes[d + 1] != 1 and strides[d] != strides[d + 1] * sizes[d + 1]:
            raise Unsupported("an operand whose index dimensions are not one strided run")
    inner = strides[-1] if sizes else 1
    return _View(
        view.off,
        shape[:dim] + [math.prod(sizes)] + shape[dim + index_ndim :],
        st[:dim] + [inner] + st[dim + index_ndim :],
        view.dtype,
    )


def _index(program, expected, a, indices):
    """``a[..., index, ...]`` by one constant index (:func:`_one_tensor_index`), one GATHER."""
    dim, flat = _one_tensor_index(program, a, indices)
    index_ndim = len(expected.shape) - len(a.shape) + 1
    out = _out(program, expected)
    flat_out = _flat_over_index(out, dim, index_ndim)
    shape = list(flat_out.shape)
    program.emit(
        "GATHER", flat_out, _indexed_view(a, shape, dim), _spread(program, flat, shape, dim), params=(a.st[dim],)
    )
    return out


def _index_put(program, expected, a, indices, values, accumulate=False):
    """``a.index_put(indices, values, accumulate=True)``, the gradient of :func:`_index`: ``a``
    plus ``values`` added at the index (repeats add up), one SCATTER_ADD."""
    if not accumulate:
        raise Unsupported("index_put without accumulate (a write whose repeats would race)")
    dim, flat = _one_tensor_index(program, a, indices)
    index_ndim = len(values.shape) - len(a.shape) + 1
    shape = list(a.shape[:dim]) + [flat.numel()] + list(a.shape[dim + 1 :])
    if index_ndim < 1 or len(values.shape) != len(shape) + index_ndim - 1:
        raise Unsupported("index_put values that broadcast")
    try:
        source = _flat_over_index(values, dim, index_ndim)
    except Unsupported:  # a broadcast or permuted gradient: copied to one run first
        dense = program.alloc(values.shape, values.dtype)
        program.emit("COPY", dense, values)
        source = _flat_over_index(dense, dim, index_ndim)
    if list(source.shape) != shape:
        raise Unsupported("index_put values that broadcast")
    out = _out(program, expected)
    program.emit("COPY", out, a)
    index = _spread(program, flat, shape, dim)
    program.emit("SCATTER_ADD", _indexed_view(out, shape, dim), source, index, shape=shape, params=(out.st[dim],))
    return out


def _row_total(program, value: _View, dim: int, op: str, identity: float) -> _View:
    """``value`` reduced along ``dim`` with ``op``, the dimension kept (size 1)."""
    shape = [1 if d == dim else size for d, size in enumerate(value.shape)]
    total = program.alloc(shape, value.dtype)
    program.emit("FILL", total, params=(identity,))
    program.emit(op, total, value, shape=value.shape)
    return total


def _softmax(program, expected, a, dim, half_to_float=False):
    r""":math:`e^{x - \max x} / \sum e^{x - \max x}` along ``dim``, as PyTorch computes it."""
    dim = _dim(dim, len(a.shape))
    shifted = program.alloc(a.shape, a.dtype)
    program.emit("SUB", shifted, a, _row_total(program, a, dim, "MAX_ACC", -math.inf))
    program.emit("EXP", shifted, shifted)
    out = _out(program, expected)
    program.emit("DIV", out, shifted, _row_total(program, shifted, dim, "SUM_ACC", 0.0))
    return out


def _softmax_backward_data(program, expected, grad, output, dim, input_dtype):
    r""":math:`y \odot (g - \sum g \odot y)` along ``dim``, for the softmax ``y``."""
    dim = _dim(dim, len(output.shape))
    product = program.alloc(output.shape, output.dtype)
    program.emit("MUL", product, grad, output)
    out = _out(program, expected)
    program.emit("SUB", out, grad, _row_total(program, product, dim, "SUM_ACC", 0.0))
    program.emit("MUL", out, out, output)
    return out


def _sign(program, expected, a):
    out = _out(program, expected)
    program.emit("SIGN", out, a)
    return out


HANDLERS: dict = {
    aten.bmm.default: _bmm,
    aten.mm.default: _bmm,
    aten.addmm.default: _addmm,
    aten.linalg_solve_triangular.default: _solve_triangular,
    aten.linalg_cholesky_ex.default: _cholesky_ex,
    aten._linalg_check_errors.default: _check_errors,
    aten.relu.default: _relu,
    aten.threshold_backward.default: _threshold_backward,
    aten.index_select.default: _index_select,
    aten.index_add.default: _index_add,
    aten.gather.default: _gather,
    aten.index.Tensor: _index,
    aten.index_put.default: _index_put,
    aten.scatter_add.default: _scatter_add,
    aten._softmax.default: _softmax,
    aten._softmax_backward_data.default: _softmax_backward_data,
    aten.sgn.default: _sign,  # of a real tensor
}
