r"""Load a kernel that Inductor compiled, in this process or another, without importing Inductor.

:func:`~vilab.inference.engine.backends.inductor.compile_artifact` describes a compiled graph as an
*artifact*: the path of the generated Python wrapper, the paths of the compiled C++ extensions and
the lifted constants. :func:`load_artifact` reads the wrapper's generated ``call`` with ``ast``
and runs it with a namespace of the few names Inductor's CPU wrappers use (buffer allocation and
views, from :func:`~vilab.inference.engine.backends.torch_internals.wrapper_names`, the compiled
kernels, ``aten`` ops and matrix products); a wrapper needing anything else, or a PyTorch whose
internals are unavailable, is reported as a failure, and the caller keeps its traced step.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib.util
import math
import os
import sys
import types
from typing import Callable, Sequence

import torch

from vilab.inference.engine.backends import torch_internals
from vilab.inference.engine.backends.recycle import recycled_call

__all__ = ["load_artifact"]


# Inductor's ``extern_kernels`` that are plain ``torch`` functions with an ``out=`` argument.
_EXTERN = ("mm", "bmm", "addmm", "baddbmm")


def load_artifact(artifact: dict, example: Sequence[torch.Tensor], recycle: bool = False) -> Callable:
    """The compiled graph described by ``artifact`` (from
    :func:`~vilab.inference.engine.backends.inductor.compile_artifact`) as ``run(*inputs) -> tuple``,
    without importing Inductor. Raises ``RuntimeError`` where the generated wrapper uses a name
    this loader does not provide, or where the internals it needs are unavailable
    (:class:`~vilab.inference.engine.backends.torch_internals.InternalsUnavailable`)."""
    internals = torch_internals.wrapper_names()
    with open(artifact["source"]) as handle:
        function = _generated_call(ast.parse(handle.read()))
    namespace = _namespace(function, artifact["kernels"], internals)
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


def _namespace(function: ast.FunctionDef, kernels: dict, internals: dict) -> dict:
    namespace = {
        "torch": torch,
        "aten": torch.ops.aten,
        "math": math,
        "inf": math.inf,
        "nan": math.nan,
        "device": torch.device,
        "empty_strided": torch.empty_strided,
        "empty_strided_cpu": internals["empty_strided_cpu"],
        "reinterpret_tensor": internals["reinterpret_tensor"],
        "assert_size_stride": internals["assert_size_stride"],
        "assert_alignment": internals["assert_alignment"],
        "extern_kernels": types.SimpleNamespace(**{name: getattr(torch, name) for name in _EXTERN}),
    }
    free = _free_names(function) - set(namespace) - set(dir(builtins))
    missing = free - set(kernels)
    if missing:
        raise RuntimeError(f"the generated call needs {sorted(missing)}")
    for name in free:
        namespace[name] = _load_kernel(kernels[name], internals["tensor_data_ptr"])
    for node in ast.walk(function):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "extern_kernels"
            and node.attr not in _EXTERN
        ):
            raise RuntimeError(f"the generated call needs extern_kernels.{node.attr}")
    return namespace


def _free_names(function: ast.FunctionDef) -> set[str]:
    stored = {
        node.id for node in ast.walk(function) if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load)
    }
    stored.update(argument.arg for argument in function.args.args)
    loaded = {node.id for node in ast.walk(function) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    return loaded - stored


def _load_kernel(path: str, tensor_data_ptr: object) -> Callable:
    """The ``kernel`` function of an extension Inductor compiled (its Python binding)."""
    # The binding reads tensors' data pointers through a function whose address it is given
    # in this variable, as Inductor's own loader does.
    os.environ["_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"] = str(tensor_data_ptr)
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
