r"""The virtual machine's instruction set and the builder of its programs.

An instruction (:class:`_Ins`, laid out as ``vm.c``'s ``struct``) is one strided N-d loop
(at most :data:`MAXD` dimensions) over up to four operands in one arena of doubles;
:class:`Program` allocates the arena's regions and emits instructions, with each operand
broadcast to the loop's shape and the loop's dimensions coalesced where the strides allow.
The translator (:mod:`~vilab.inference.engine.backends.vm_ops`) fills a program node by node and
:mod:`~vilab.inference.engine.backends.vm` runs it.
"""

from __future__ import annotations

import ctypes
import math
from typing import Optional, Sequence

import torch

__all__ = ["MAXD", "OP", "Unsupported", "Program"]

MAXD = 6
_OPS = (
    "ADD SUB MUL DIV NEG EXP LOG LOG1P SQRT SIGMOID SOFTPLUS LOGADDEXP FMIN FMAX POW CLAMP WHERE "
    "LT LE GT GE EQ NE AND OR NOT XLOGY NAN_TO_NUM SIGMOID_BACKWARD SOFTPLUS_BACKWARD LOG_SIGMOID "
    "LOG_SIGMOID_BACKWARD COPY FILL SUM_ACC MAX_ACC OR_ACC ARGMAX CUMSUM CUMPROD CAST_F32 CAST_INT "
    "CAST_BOOL LOAD STORE ABS TANH EXPM1 RECIPROCAL PROD_ACC MIN_ACC LOG_SIGMOID_BUFFER LOGICAL_XOR "
    "ISNAN ISINF SIGN MUL_ACC MAXIMUM MINIMUM ERF ERFC LGAMMA DIGAMMA ATAN SIN COS SOLVE_TRIANGULAR "
    "CHOLESKY GATHER SCATTER_ADD"
).split()
OP = {name: code for code, name in enumerate(_OPS, start=1)}
_DTYPE = {torch.float64: 0, torch.float32: 1, torch.int64: 2, torch.int32: 3, torch.bool: 4}


class Unsupported(Exception):
    """The graph uses something the virtual machine does not run (the message says what)."""


class _Ins(ctypes.Structure):
    _fields_ = [
        ("op", ctypes.c_int32),
        ("nd", ctypes.c_int32),
        ("io", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("shape", ctypes.c_int64 * MAXD),
        ("off", ctypes.c_int64 * 4),
        ("st", (ctypes.c_int64 * MAXD) * 4),
        ("p", ctypes.c_double * 4),
    ]


class _View:
    """A strided view of the arena: element offset, shape and strides (in doubles)."""

    __slots__ = ("off", "shape", "st", "dtype")

    def __init__(self, off: int, shape: Sequence[int], st: Sequence[int], dtype: torch.dtype) -> None:
        self.off, self.shape, self.st, self.dtype = off, tuple(shape), tuple(st), dtype

    def contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.st)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


def _contiguous_strides(shape: Sequence[int]) -> tuple:
    strides, running = [], 1
    for size in reversed(shape):
        strides.append(running)
        running *= size
    return tuple(reversed(strides))


def _dim(dim: int, nd: int) -> int:
    return dim + nd if dim < 0 else dim


class Program:
    """A virtual-machine program under construction: the arena's layout (one region per value
    and per constant, in the order they are made) and the instructions.
    :mod:`~vilab.inference.engine.backends.vm_ops` emits them node by node."""

    def __init__(self) -> None:
        self.size = 0
        self.instructions: list[_Ins] = []
        self.initial: list[tuple[int, torch.Tensor]] = []  # arena contents written once
        self._numbers: dict[tuple, _View] = {}  # one region per distinct scalar operand
        self._constants: dict[int, torch.Tensor] = {}  # each constant's value by its offset

    def alloc(self, shape: Sequence[int], dtype: torch.dtype) -> _View:
        """A fresh contiguous region of the arena."""
        view = _View(self.size, shape, _contiguous_strides(shape), dtype)
        self.size += max(1, math.prod(shape))
        return view

    def constant(self, value, dtype: Optional[torch.dtype] = None) -> _View:
        """A constant (a Python number or a tensor) in the arena."""
        tensor = torch.as_tensor(value).detach()
        view = self.alloc(tuple(tensor.shape), dtype or tensor.dtype)
        self.initial.append((view.off, tensor.to(torch.float64).contiguous().view(-1)))
        self._constants[view.off] = tensor
        return view

    def constant_value(self, view: _View) -> Optional[torch.Tensor]:
        """The value of ``view`` where it is a whole constant as :meth:`constant` made it, else ``None``."""
        value = self._constants.get(view.off)
        if value is None or tuple(value.shape) != view.shape or view.st != _contiguous_strides(view.shape):
            return None
        return value

    def overlaps_constant(self, view: _View) -> bool:
        """Whether ``view`` reaches into a constant's region (written once, so never to be written)."""
        low = view.off + sum(min(0, (size - 1) * st) for size, st in zip(view.shape, view.st))
        high = view.off + sum(max(0, (size - 1) * st) for size, st in zip(view.shape, view.st))
        return any(offset <= high and low < offset + max(1, values.numel()) for offset, values in self.initial)

    def operand(self, value, dtype: torch.dtype = torch.float64) -> _View:
        """``value`` as a view: a view already, or a number made a constant."""
        if isinstance(value, _View):
            return value
        if isinstance(value, (bool, int, float)):
            dtype = torch.bool if isinstance(value, bool) else dtype
            key = (float(value), dtype)
            if key not in self._numbers:
                self._numbers[key] = self.constant(float(value), dtype)
            return self._numbers[key]
        raise Unsupported(f"operand of type {type(value).__name__}")

    def emit(
        self,
        op: str,
        out: _View,
        *inputs: _View,
        shape: Optional[Sequence[int]] = None,
        params: Sequence[float] = (),
        io: int = 0,
        dtype: int = 0,
    ) -> None:
        """One instruction looping over ``shape`` (default: the output's); every operand is
        broadcast to it from the right (missing and size-1 dimensions get stride 0)."""
        shape = tuple(out.shape if shape is None else shape)
        if len(shape) > MAXD:
            raise Unsupported(f"{len(shape)} dimensions (at most {MAXD})")
        if 0 in shape:
            return
        operands = (out, *inputs)
        strides = [_broadcast_strides(view, shape) for view in operands]
        if op not in _DIMENSION_OPS:
            shape, strides = _longest_inside(*_coalesce(shape, strides))
        ins = _Ins()
        ins.op, ins.nd, ins.io, ins.dtype = OP[op], len(shape), io, dtype
        for d, size in enumerate(shape):
            ins.shape[d] = size
        for slot, (view, view_strides) in enumerate(zip(operands, strides)):
            ins.off[slot] = view.off
            for d, stride in enumerate(view_strides):
                ins.st[slot][d] = stride
        for index, value in enumerate(params):
            ins.p[index] = float(value)
        self.instructions.append(ins)


# Instructions that index one dimension by its position (params[0]) or work on the last three
# as matrices (vm_matrix.py): their loops keep the shape.
_DIMENSION_OPS = {"ARGMAX", "CUMSUM", "CUMPROD", "SOLVE_TRIANGULAR", "CHOLESKY"}


def _coalesce(shape: Sequence[int], strides: list[list[int]]) -> tuple[tuple, list[list[int]]]:
    """The same loop over fewer dimensions: size-1 dimensions dropped, and neighbours merged
    where every operand steps over both as over one (``stride[d] == stride[d + 1] * size[d + 1]``;
    broadcast dimensions, stride 0, merge with each other). An HMM leaf's ``(2, 100, 2, 2)``
    operands ran as 400 rows of 2 and become one row of 800."""
    keep = [d for d, size in enumerate(shape) if size != 1]
    merged_shape: list[int] = []
    merged = [[] for _ in strides]
    for d in keep:
        if merged_shape and all(st[-1] == view[d] * shape[d] for st, view in zip(merged, strides)):
            merged_shape[-1] *= shape[d]
            for st, view in zip(merged, strides):
                st[-1] = view[d]
        else:
            merged_shape.append(shape[d])
            for st, view in zip(merged, strides):
                st.append(view[d])
    return tuple(merged_shape), merged


def _longest_inside(shape: tuple, strides: list[list[int]]) -> tuple[tuple, list[list[int]]]:
    """The loop with its longest dimension innermost where the innermost is short (fewer than
    8): each row of the loop costs an odometer step, and an HMM leaf's batched 2x2 matrix
    products, ``(100, 2, 2, 2)``, ran as 400 rows of 2. Only the nesting of the loops changes:
    each output element accumulates its terms in the same order, except that a reduction which
    becomes innermost keeps its row's total in registers, in four running totals for sums (a
    different rounding, as any reordered sum)."""
    if len(shape) < 2 or shape[-1] >= 8:
        return shape, strides
    longest = max(range(len(shape)), key=lambda d: shape[d])
    if shape[longest] <= shape[-1]:
        return shape, strides
    order = [d for d in range(len(shape)) if d != longest] + [longest]
    return _coalesce(tuple(shape[d] for d in order), [[view[d] for d in order] for view in strides])


def _broadcast_strides(view: _View, shape: Sequence[int]) -> list[int]:
    lead = len(shape) - len(view.shape)
    if lead < 0:
        raise Unsupported(f"an operand of shape {view.shape} in a loop over {tuple(shape)}")
    strides = [0] * lead
    for size, stride, target in zip(view.shape, view.st, shape[lead:]):
        if size == target:
            strides.append(stride if size != 1 else 0)
        elif size == 1:
            strides.append(0)
        else:
            raise Unsupported(f"an operand of shape {view.shape} does not broadcast to {tuple(shape)}")
    return strides
