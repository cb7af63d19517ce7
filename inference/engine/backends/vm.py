r"""Traced sampler steps run by a small virtual machine: a kernel for a new model in milliseconds.

A fused Inductor kernel (:mod:`~vilab.inference.engine.backends.inductor`) runs a NUTS leaf 10-50x faster
than the traced graph, but compiling it takes 3-10 s: on a model's first run much of a
2000-iteration run is over before it arrives. This module translates the same ATen graph into a
program for a virtual machine written in C (``vm.c``: about 70 instructions, most a strided
N-d loop over one arena of doubles), built once per installation (:func:`build_library`).
Translating takes milliseconds. A call costs one C call, the loops' arithmetic and about 0.5 µs
per output tensor; NUTS leaves of the posteriordb problems ran in 24-66 µs where PyTorch's
former Static Runtime, at about 1 µs of dispatch per op, took 60-600 µs (an HMM's, with 513 instructions, is the slowest).
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
import os
import platform
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from vilab.inference.engine.backends import torch_internals
from vilab.inference.engine.cache import cache_root, private_directory
from vilab.inference.engine.backends.vm_program import Program, Unsupported, _contiguous_strides, _Ins

__all__ = ["Unsupported", "vm_step", "vm_unavailable", "build_library"]

_SOURCE = Path(__file__).with_name("vm.c")
# Calls whose inputs' shapes and strides are checked (each check costs about 0.3 µs per input).
CHECKED_CALLS = 8

_library: Optional[ctypes.CDLL] = None
_library_error = ""


def _cache_dir() -> Path:
    return cache_root()


# For this machine's vector units (the loops of a regression's leaf ran 15% faster with AVX2 than with
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
    """Compile ``vm.c`` (once per source version; about 10 s) into the cache directory
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
        _remove_stale_libraries(target)
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(f"cannot build {_SOURCE.name}: {type(error).__name__}: {error}") from error
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


# Libraries of other versions of vm.c are removed only once unused this long: two installations
# (two virtualenvs, two checkouts) share the cache and must not delete each other's library.
STALE_LIBRARY_SECONDS = 30 * 24 * 3600


def _remove_stale_libraries(target: Path) -> None:
    now = time.time()
    for stale in target.parent.glob("fast_vm-*.so"):
        try:
            if stale != target and now - max(stale.stat().st_atime, stale.stat().st_mtime) > STALE_LIBRARY_SECONDS:
                stale.unlink(missing_ok=True)
        except OSError:  # removed meanwhile by another process
            continue


_build: Optional[threading.Thread] = None
_build_pid = 0  # the process that started ``_build``: a forked child inherits the object, not the thread


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
    global _library, _library_error, _build, _build_pid
    if _library is not None or _library_error:
        return _library_error
    if not _library_path().exists():
        if _build is None or _build_pid != os.getpid():
            # In a child forked mid-build the inherited thread reads as finished although the
            # library is not there yet: build again here (builds are atomic renames, so the
            # parent's and the child's never clash).
            _build = threading.Thread(target=_build_in_background, name="vilab-vm-build", daemon=True)
            _build_pid = os.getpid()
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


# Inductor's wrappers allocate with it: 0.5 µs against torch.empty's 1.6 (torch.empty_strided
# where PyTorch's internals are unavailable).
_empty = torch_internals.empty_strided_cpu()


class VMStep:
    """A translated graph as ``step(*inputs) -> tuple of tensors``: the inputs' data pointers go
    to the program, which loads, computes and stores into new output tensors (or, with
    ``recycle``, into two sets of buffers used in turn: a call's outputs are overwritten by the
    call after next)."""

    def __init__(
        self, program: Program, inputs: Sequence[torch.Tensor], outputs: Sequence[tuple], recycle: bool
    ) -> None:
        if vm_unavailable():
            raise Unsupported(f"the virtual machine is unavailable: {vm_unavailable()}")
        count = len(program.instructions)
        self._program = (_Ins * max(count, 1))(*program.instructions)
        self._count = count
        self._arena = torch.zeros(max(program.size, 1), dtype=torch.float64)
        for offset, values in program.initial:
            self._arena[offset : offset + values.numel()] = values
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
            table[self._base :] = [tensor.data_ptr() for tensor in outputs]
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
                raise ValueError(
                    f"input {index}: expected shape {shape} and strides {stride}; "
                    f"got {tuple(tensor.shape)} and {tensor.stride()}"
                )

    def __call__(self, *inputs: torch.Tensor) -> tuple:
        # The caller's layouts are fixed by construction (as for Inductor's kernels, whose size
        # asserts are off); the first calls, which include the caller's checks, verify them.
        if self._checked_calls < CHECKED_CALLS:
            self._check_inputs(inputs)
            self._checked_calls += 1
        table = self._tables[self._turn]
        table[: self._base] = [tensor.data_ptr() for tensor in inputs]
        if self._sets is None:
            outputs = self._new_outputs()
            table[self._base :] = [tensor.data_ptr() for tensor in outputs]
        else:
            outputs, self._turn = self._sets[self._turn], 1 - self._turn
        self._run(self._addresses[0], self._count, self._addresses[1], table)
        return outputs


def vm_step(graph: torch.fx.GraphModule, example: Sequence[torch.Tensor], recycle: bool = False) -> VMStep:
    """``graph`` (ATen ops, fixed shapes, as traced by ``make_fx``) as a virtual-machine program
    (:class:`VMStep`). Raises :class:`Unsupported` naming the first op it cannot translate; the
    caller must check the result against its reference before using it."""
    from vilab.inference.engine.backends.vm_ops import translate

    program, outputs = translate(graph, example, Program())
    return VMStep(program, example, outputs, recycle)
