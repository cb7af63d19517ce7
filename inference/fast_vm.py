r"""Traced sampler steps run by a small virtual machine: a kernel for a new model in milliseconds.

A fused Inductor kernel (:mod:`~vilab.inference.fast_inductor`) runs a NUTS leaf 10-50x faster
than the traced graph, but compiling it takes 3-10 s: on a model's first run much of a
2000-iteration run is over before it arrives. This module translates the same ATen graph into a
program for a virtual machine written in C (``fast_vm.c``: about 70 instructions, each a strided
N-d loop over one arena of doubles), built once per installation (:func:`build_library`).
Translating takes milliseconds. A call costs one C call, the loops' arithmetic and about 0.5 µs
per output tensor; NUTS leaves of the posteriordb problems ran in 24-66 µs where Static Runtime,
at about 1 µs of dispatch per op, took 60-600 µs (hmm, with 513 instructions, is the slowest).
The sampler runs the program until Inductor's kernel is ready, and keeps it where that kernel is
no faster.

Every value lives in the arena as a double (booleans as 0/1, integers exactly up to
:math:`2^{53}`); inputs are converted on load and outputs on store, so a float32 step computes in
double and rounds at the end. A graph with an op the translator does not know, or more than six
dimensions, raises :class:`Unsupported`; the caller keeps its traced step. As for any fused
step, the caller checks the program against its eager reference before using it.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence

import torch

from .fast_cache import cache_root, private_directory

__all__ = ["Unsupported", "vm_step", "vm_unavailable", "build_library"]

MAXD = 6
_SOURCE = Path(__file__).with_name("fast_vm.c")
_OPS = ("ADD SUB MUL DIV NEG EXP LOG LOG1P SQRT SIGMOID SOFTPLUS LOGADDEXP FMIN FMAX POW CLAMP WHERE "
        "LT LE GT GE EQ NE AND OR NOT XLOGY NAN_TO_NUM SIGMOID_BACKWARD SOFTPLUS_BACKWARD LOG_SIGMOID "
        "LOG_SIGMOID_BACKWARD COPY FILL SUM_ACC MAX_ACC OR_ACC ARGMAX CUMSUM CUMPROD CAST_F32 CAST_INT "
        "CAST_BOOL LOAD STORE ABS TANH EXPM1 RECIPROCAL PROD_ACC MIN_ACC LOG_SIGMOID_BUFFER LOGICAL_XOR "
        "ISNAN ISINF SIGN MUL_ACC MAXIMUM MINIMUM ERF ERFC LGAMMA DIGAMMA ATAN SIN COS").split()
OP = {name: code for code, name in enumerate(_OPS, start=1)}
# Calls whose inputs' shapes and strides are checked (each check costs about 0.3 µs per input).
CHECKED_CALLS = 8
_DTYPE = {torch.float64: 0, torch.float32: 1, torch.int64: 2, torch.int32: 3, torch.bool: 4}


class Unsupported(Exception):
    """The graph uses something the virtual machine does not run (the message says what)."""


class _Ins(ctypes.Structure):
    _fields_ = [("op", ctypes.c_int32), ("nd", ctypes.c_int32), ("io", ctypes.c_int32), ("dtype", ctypes.c_int32),
                ("shape", ctypes.c_int64 * MAXD), ("off", ctypes.c_int64 * 4),
                ("st", (ctypes.c_int64 * MAXD) * 4), ("p", ctypes.c_double * 4)]


_library: Optional[ctypes.CDLL] = None
_library_error = ""


def _cache_dir() -> Path:
    return cache_root()


# For this machine's vector units (the loops of the nes leaf ran 15% faster with AVX2 than with
# SSE2), without contracting a * b + c into one rounding, which the eager step does not do.
_NATIVE_FLAGS = ("-march=native", "-ffp-contract=off")


def _machine() -> bytes:
    """What a natively built library depends on: the CPU's model and features (a cache
    directory shared with another machine gets a library per CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine().encode() + platform.processor().encode()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))})).encode()


def _library_path() -> Path:
    digest = hashlib.sha256(_SOURCE.read_bytes() + repr(_NATIVE_FLAGS).encode() + _machine()).hexdigest()
    return _cache_dir() / f"fast_vm-{digest[:16]}.so"


def build_library() -> Path:
    """Compile ``fast_vm.c`` (once per source version; about 10 s) into the cache directory
    (``$VILAB_CACHE_DIR``, default ``~/.cache/vilab``) and return the shared library's path.
    ``make install`` runs it. Raises ``RuntimeError`` where there is no C compiler or it fails."""
    target = _library_path()
    if target.exists():
        return target
    try:
        private_directory(target.parent)
    except OSError as error:
        raise RuntimeError(f"cannot build {_SOURCE.name}: {error}") from error
    compiler = os.environ.get("CC", "cc")
    handle, partial = tempfile.mkstemp(prefix=".fast_vm-build-", suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        command = [compiler, "-O3", "-shared", "-fPIC", str(_SOURCE), "-o", partial, "-lm"]
        done = subprocess.run([*command, *_NATIVE_FLAGS], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:  # a compiler without these flags: portable code
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {_SOURCE.name}: {done.stderr.strip()[:300]}")
        os.replace(partial, target)  # atomic: another process never loads half a library
        for stale in target.parent.glob("fast_vm-*.so"):  # earlier versions of the source
            if stale != target:
                stale.unlink(missing_ok=True)
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(f"cannot build {_SOURCE.name}: {type(error).__name__}: {error}") from error
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


_build: Optional[threading.Thread] = None


def _build_in_background() -> None:
    global _library_error
    try:
        build_library()
    except RuntimeError as error:
        _library_error = str(error)


def vm_unavailable(wait: bool = False) -> str:
    """Why the virtual machine cannot run here (empty if it can). Where its library has not been
    built on this installation, the build starts in a background thread and, unless ``wait``,
    this returns at once saying so: the run that asks first goes on without it."""
    global _library, _library_error, _build
    if _library is not None or _library_error:
        return _library_error
    if not _library_path().exists():
        if _build is None:
            _build = threading.Thread(target=_build_in_background, name="vilab-vm-build", daemon=True)
            _build.start()
        if _build.is_alive() and not wait:
            return "its library is being built (once per installation, about 10 s; `make install` builds it)"
        _build.join()
        if _library_error:
            return _library_error
    try:
        private_directory(_library_path().parent)  # loading a library runs its code
        library = ctypes.CDLL(str(_library_path()))
        if library.vilab_vm_instruction_size() != ctypes.sizeof(_Ins):
            raise RuntimeError("the library's instruction layout differs from this module's")
        library.vilab_vm_run.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        library.vilab_vm_run.restype = None
        _library = library
    except (RuntimeError, OSError, AttributeError) as error:
        _library_error = str(error)
    return _library_error


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


try:  # Inductor's wrappers allocate with it: 0.5 µs against torch.empty's 1.6
    from torch._C._dynamo.guards import _empty_strided_cpu as _empty
except ImportError:  # pragma: no cover -- another PyTorch
    def _empty(shape: tuple, strides: tuple, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty_strided(shape, strides, dtype=dtype)


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
    :mod:`~vilab.inference.fast_vm_ops` emits them node by node."""

    def __init__(self) -> None:
        self.size = 0
        self.instructions: list[_Ins] = []
        self.initial: list[tuple[int, torch.Tensor]] = []  # arena contents written once
        self._numbers: dict[tuple, _View] = {}  # one region per distinct scalar operand

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
        return view

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

    def emit(self, op: str, out: _View, *inputs: _View, shape: Optional[Sequence[int]] = None,
             params: Sequence[float] = (), io: int = 0, dtype: int = 0) -> None:
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


# Instructions that index one dimension by its position (params[0]): their loops keep the shape.
_DIMENSION_OPS = {"ARGMAX", "CUMSUM", "CUMPROD"}


def _coalesce(shape: Sequence[int], strides: list[list[int]]) -> tuple[tuple, list[list[int]]]:
    """The same loop over fewer dimensions: size-1 dimensions dropped, and neighbours merged
    where every operand steps over both as over one (``stride[d] == stride[d + 1] * size[d + 1]``;
    broadcast dimensions, stride 0, merge with each other). The hmm leaf's ``(2, 100, 2, 2)``
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
    8): each row of the loop costs an odometer step, and the hmm leaf's batched 2x2 matrix
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


class VMStep:
    """A translated graph as ``step(*inputs) -> tuple of tensors``: the inputs' data pointers go
    to the program, which loads, computes and stores into new output tensors (or, with
    ``recycle``, into two sets of buffers used in turn: a call's outputs are overwritten by the
    call after next)."""

    def __init__(self, program: Program, inputs: Sequence[torch.Tensor], outputs: Sequence[tuple],
                 recycle: bool) -> None:
        if vm_unavailable():
            raise Unsupported(f"the virtual machine is unavailable: {vm_unavailable()}")
        count = len(program.instructions)
        self._program = (_Ins * max(count, 1))(*program.instructions)
        self._count = count
        self._arena = torch.zeros(max(program.size, 1), dtype=torch.float64)
        for offset, values in program.initial:
            self._arena[offset:offset + values.numel()] = values
        self._inputs = [(tuple(t.shape), t.stride()) for t in inputs]
        self._outputs = [(shape, _contiguous_strides(shape), dtype) for shape, dtype in outputs]
        self._checked_calls = 0
        self._run = _library.vilab_vm_run
        self._addresses = (ctypes.addressof(self._program), self._arena.data_ptr())
        self._base = len(inputs)
        self._sets = [self._new_outputs(), self._new_outputs()] if recycle else None
        # One pointer table per buffer set, its output pointers written once.
        self._tables = [self._table(outputs) for outputs in self._sets or [()]]
        self._turn = 0
        self.recycled = recycle

    def _table(self, outputs: Sequence[torch.Tensor]):
        table = (ctypes.c_void_p * (self._base + len(self._outputs)))()
        if outputs:
            table[self._base:] = [tensor.data_ptr() for tensor in outputs]
        return table

    def unrecycled(self) -> "VMStep":
        """The same program returning new tensors, for calls that must leave this step's
        buffers alone (timing it while its caller holds outputs; the arena holds only values
        each call recomputes, so the two may share it)."""
        if self._sets is None:
            return self
        twin = object.__new__(VMStep)
        twin.__dict__.update(self.__dict__)
        twin._sets, twin.recycled, twin._turn = None, False, 0
        twin._tables = [twin._table(())]
        return twin

    def _new_outputs(self) -> tuple:
        return tuple(_empty(shape, strides, dtype) for shape, strides, dtype in self._outputs)

    def _check_inputs(self, inputs: Sequence[torch.Tensor]) -> None:
        if len(inputs) != len(self._inputs):
            raise ValueError(f"inputs: expected {len(self._inputs)} tensors; got {len(inputs)}")
        for index, (tensor, (shape, stride)) in enumerate(zip(inputs, self._inputs)):
            if tensor.stride() != stride or tensor.shape != shape:
                raise ValueError(f"input {index}: expected shape {shape} and strides {stride}; "
                                 f"got {tuple(tensor.shape)} and {tensor.stride()}")

    def __call__(self, *inputs: torch.Tensor) -> tuple:
        # The caller's layouts are fixed by construction (as for Inductor's kernels, whose size
        # asserts are off); the first calls, which include the caller's checks, verify them.
        if self._checked_calls < CHECKED_CALLS:
            self._check_inputs(inputs)
            self._checked_calls += 1
        table = self._tables[self._turn]
        table[:self._base] = [tensor.data_ptr() for tensor in inputs]
        if self._sets is None:
            outputs = self._new_outputs()
            table[self._base:] = [tensor.data_ptr() for tensor in outputs]
        else:
            outputs, self._turn = self._sets[self._turn], 1 - self._turn
        self._run(self._addresses[0], self._count, self._addresses[1], table)
        return outputs


def vm_step(graph: torch.fx.GraphModule, example: Sequence[torch.Tensor], recycle: bool = False) -> VMStep:
    """``graph`` (ATen ops, fixed shapes, as traced by ``make_fx``) as a virtual-machine program
    (:class:`VMStep`). Raises :class:`Unsupported` naming the first op it cannot translate; the
    caller must check the result against its reference before using it."""
    from .fast_vm_ops import translate

    program, outputs = translate(graph, example, Program())
    return VMStep(program, example, outputs, recycle)
