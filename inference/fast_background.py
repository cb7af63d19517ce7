r"""Fused kernels compiled in a forked process while the sampler keeps running.

Compiling a NUTS leaf with Inductor takes 3-6 s (14 s for the HMM example), and importing
Inductor about 2 s more: as long as a whole NUTS run of a small model. The sampler runs on
one thread, so on a machine with a second core the compilation can run beside it. A child
forked for the graph (it shares the traced graph without pickling it, and imports nothing the
caller has imported) compiles it and reports where Inductor wrote the generated wrapper and the
compiled C++ extension. The caller loads those two files itself, without importing Inductor,
and keeps stepping its traced graph meanwhile. The caller checks the loaded kernel against its eager
reference before using it, as for a kernel compiled in-process.

Loading reads the generated ``call`` with ``ast`` and runs it with a namespace of the few names
Inductor's CPU wrappers use (buffer allocation and views from ``torch._C``, the compiled kernels,
``aten`` ops and matrix products); a wrapper needing anything else is reported as a failure and the
traced step stays.
"""
from __future__ import annotations

import ast
import builtins
import hashlib
import importlib.util
import math
import multiprocessing
import os
import pickle
import sys
import types
import warnings
from typing import Callable, Optional, Sequence

import torch

from .fast_recycle import recycled_call

__all__ = ["BackgroundCompile", "background_available", "load_artifact"]

# Inductor's ``extern_kernels`` that are plain ``torch`` functions with an ``out=`` argument.
_EXTERN = ("mm", "bmm", "addmm", "baddbmm")


def background_available() -> bool:
    """Whether a compilation can run beside the caller: ``fork`` exists, this process may use
    at least two cores, and it has not initialised CUDA (which a forked child cannot use)."""
    if torch.cuda.is_initialized():
        return False
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return cores >= 2 and "fork" in multiprocessing.get_all_start_methods()


class BackgroundCompile:
    """One graph compiled by :func:`~vilab.inference.fast_inductor.compile_artifact` in a child
    forked for it, while the caller goes on.

    The child inherits the graph as it is in memory: a pickled ``GraphModule`` is re-traced from
    its code on loading, and for at least one NUTS leaf (sblrc) Inductor compiled that re-traced
    graph into a kernel that failed the eager check, where the original graph compiles right.

    Args:
        graph: ATen graph with fixed shapes.
        example: its example inputs.
        recycle: load the kernel as a buffer-reusing call
            (:func:`~vilab.inference.fast_recycle.recycled_call`).
    """

    def __init__(self, graph: torch.fx.GraphModule, example: Sequence[torch.Tensor], recycle: bool = False) -> None:
        self.example, self.recycle = tuple(example), recycle
        context = multiprocessing.get_context("fork")
        self._conn, child = context.Pipe(duplex=False)
        self._process = context.Process(target=_compile_in_child, args=(child, graph, self.example), daemon=True)
        with warnings.catch_warnings():
            # JAX, when imported, warns on every fork; the child never touches JAX.
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            self._process.start()
        child.close()  # the child's end: EOF here once the child is gone
        self._done = False

    def result(self) -> Optional[tuple[Optional[Callable], str]]:
        """``None`` while compiling; then ``(fused call, "")`` or ``(None, why not)``, once."""
        if self._done:
            raise RuntimeError("BackgroundCompile.result: the result was already taken")
        try:
            if not self._conn.poll():
                return None
            status, payload = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            status, payload = "error", f"the compiling process ended (exit code {self._process.exitcode})"
        self.close()
        if status != "ok":
            return None, payload
        try:
            return load_artifact(payload, self.example, recycle=self.recycle), ""
        except (RuntimeError, OSError, ImportError, SyntaxError, TypeError, ValueError, KeyError) as error:
            return None, f"{type(error).__name__}: {str(error)[:200]}"

    def close(self) -> None:
        """Stop the child if it still runs and release the pipe."""
        if not self._done:
            self._done = True
            if self._process.is_alive():
                self._process.terminate()
            self._process.join(timeout=5)
            self._conn.close()

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            self.close()


def _compile_in_child(conn, graph, example) -> None:
    from . import fast_inductor

    torch.set_num_threads(1)
    try:
        message = ("ok", fast_inductor.compile_artifact(graph, example))
    except Exception as error:  # noqa: BLE001 -- any failure is reported; the caller keeps its step
        message = ("error", f"{type(error).__name__}: {str(error).strip()[:200]}")
    # Plain pickle: multiprocessing's would pass tensors through shared memory that is gone
    # once this process exits.
    conn.send_bytes(pickle.dumps(message))
    conn.close()


def load_artifact(artifact: dict, example: Sequence[torch.Tensor], recycle: bool = False) -> Callable:
    """The compiled graph described by ``artifact`` (from
    :func:`~vilab.inference.fast_inductor.compile_artifact`) as ``run(*inputs) -> tuple``,
    without importing Inductor. Raises ``RuntimeError`` where the generated wrapper uses a name
    this loader does not provide."""
    with open(artifact["source"]) as handle:
        function = _generated_call(ast.parse(handle.read()))
    namespace = _namespace(function, artifact["kernels"])
    code = ast.fix_missing_locations(ast.Module([function], []))
    exec(compile(code, artifact["source"], "exec"), namespace)
    call, constants = namespace[function.name], list(artifact["constants"])
    if recycle:
        recycled = recycled_call(call, constants, example, source=ast.unparse(function))
        if recycled is not None:
            return recycled
    return lambda *args: call([*constants, *args])


def _generated_call(module: ast.Module) -> ast.FunctionDef:
    """The ``call(args)`` function of a generated wrapper (a method of its ``Runner`` class in
    recent versions, with ``self`` unused), as a plain function of ``args``."""
    candidates = [node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == "call"]
    for node in module.body:
        if isinstance(node, ast.ClassDef):
            candidates += [item for item in node.body if isinstance(item, ast.FunctionDef) and item.name == "call"]
    if len(candidates) != 1:
        raise RuntimeError(f"expected one generated call function; found {len(candidates)}")
    function = candidates[0]
    arguments = function.args.args
    if arguments and arguments[0].arg == "self":
        if any(isinstance(node, ast.Name) and node.id == "self" for node in ast.walk(function)):
            raise RuntimeError("the generated call uses its runner object")
        function.args.args = arguments[1:]
    if len(function.args.args) != 1:
        raise RuntimeError("the generated call does not take one argument list")
    function.decorator_list = []
    return function


def _namespace(function: ast.FunctionDef, kernels: dict) -> dict:
    guards = torch._C._dynamo.guards
    namespace = {"torch": torch, "aten": torch.ops.aten, "math": math, "inf": math.inf, "nan": math.nan,
                 "device": torch.device, "empty_strided": torch.empty_strided,
                 "empty_strided_cpu": guards._empty_strided_cpu, "reinterpret_tensor": guards._reinterpret_tensor,
                 "assert_size_stride": guards.assert_size_stride, "assert_alignment": guards.assert_alignment,
                 "extern_kernels": types.SimpleNamespace(**{name: getattr(torch, name) for name in _EXTERN})}
    free = _free_names(function) - set(namespace) - set(dir(builtins))
    missing = free - set(kernels)
    if missing:
        raise RuntimeError(f"the generated call needs {sorted(missing)}")
    for name in free:
        namespace[name] = _load_kernel(kernels[name])
    for node in ast.walk(function):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "extern_kernels" \
                and node.attr not in _EXTERN:
            raise RuntimeError(f"the generated call needs extern_kernels.{node.attr}")
    return namespace


def _free_names(function: ast.FunctionDef) -> set[str]:
    stored = {node.id for node in ast.walk(function) if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load)}
    stored.update(argument.arg for argument in function.args.args)
    loaded = {node.id for node in ast.walk(function) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    return loaded - stored


def _load_kernel(path: str) -> Callable:
    """The ``kernel`` function of an extension Inductor compiled (its Python binding)."""
    # The binding reads tensors' data pointers through a function whose address it is given
    # in this variable, as Inductor's own loader does.
    os.environ["_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"] = str(
        torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr)
    # The module's last name must be ``kernel``: the extension's init function is PyInit_kernel.
    name = f"vilab_fused_{hashlib.sha256(path.encode()).hexdigest()[:16]}.kernel"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load the compiled kernel {path!r}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return module.kernel
