r"""The one module that reaches into PyTorch's private modules, behind a version check.

The engine runs on public PyTorch: ``make_fx`` traces a step into an ATen graph, the graph runs
as ``torch.fx`` Python code or on the virtual machine (:mod:`~vilab.inference.engine.backends.vm`),
and ``torch.compile`` can fuse it. Two things go faster through internals, and only through
this module:

* Inductor's own entry points (``compile_fx`` with an ``inner_compile`` hook, its config and
  decomposition table, a fake-tensor tracing context), so that a fused kernel is called without
  Dynamo's guards and wrappers and can be reloaded by another process
  (:mod:`~vilab.inference.engine.backends.inductor`, :mod:`~vilab.inference.engine.backends.artifacts`);
* the allocator and helpers that Inductor's generated CPU wrappers call (``empty_strided_cpu``,
  ``reinterpret_tensor``, size and alignment asserts, the tensor data-pointer hook).

These change between releases, so they are used only on the releases they were tested on
(:data:`TESTED_VERSIONS`). Elsewhere, or where an import fails, :func:`problem` says why and the
callers take the public path: ``compiler="auto"`` keeps the traced step, ``compiler="inductor"``
fuses with ``torch.compile``, and the allocator is ``torch.empty_strided``. A run that loses
fusion this way is told so by one ``RuntimeWarning`` (:func:`warn_unavailable`); nothing crashes
and no answer changes, since every compiled step is checked against its eager reference.
"""

from __future__ import annotations

import importlib
import importlib.util
import types
import warnings
from typing import Callable

import torch

__all__ = [
    "TESTED_VERSIONS",
    "InternalsUnavailable",
    "OpOverload",
    "problem",
    "inductor",
    "wrapper_names",
    "empty_strided_cpu",
    "preload",
    "warn_unavailable",
    "reset",
    "FALLBACK",
]

# Oldest and newest (major, minor) release whose internals this module was run against.
TESTED_VERSIONS = ((2, 13), (2, 14))

# The private modules used; each is looked up (not imported: importing Inductor takes about a
# second, which a process that only loads cached kernels never pays) before anything is used.
MODULES = (
    "torch._inductor.compile_fx",
    "torch._inductor.config",
    "torch._inductor.decomposition",
    "torch._functorch.config",
    "torch._guards",
    "torch._subclasses.fake_tensor",
)

# The class of ATen overloads (``aten.add.Tensor``), reached through a public op: no version gate.
OpOverload = type(torch.ops.aten.add.Tensor)

_import_failure = ""  # the first failed import of an internal, kept for :func:`problem`

# What a run does without the internals: the end of its warning.
FALLBACK = (
    "compiler='auto' keeps the traced step unfused (the virtual machine or fx code), "
    "compiler='inductor' compiles it with torch.compile (no kernel cache, no background compilation)"
)


class InternalsUnavailable(RuntimeError):
    """The internals cannot be used here; the message says why. A ``RuntimeError``, so that a
    caller that already degrades on Inductor's failures degrades on this one too."""


def _version() -> tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def _find_spec(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _import(name: str) -> types.ModuleType:
    return importlib.import_module(name)


def problem() -> str:
    """Why the internals are not used here, or ``""`` when they are: a PyTorch outside
    :data:`TESTED_VERSIONS`, a module missing from this build, or an earlier failed import."""
    version, (low, high) = _version(), TESTED_VERSIONS
    if not low <= version <= high:
        return (
            f"PyTorch {torch.__version__} is outside the releases vilab's engine was tested on "
            f"({low[0]}.{low[1]}-{high[0]}.{high[1]}), so it uses public APIs only"
        )
    if _import_failure:
        return _import_failure
    missing = [name for name in MODULES if not _find_spec(name)]
    if missing:
        return f"this PyTorch build has no {missing[0]}"
    return ""


def _require() -> None:
    why = problem()
    if why:
        raise InternalsUnavailable(why)


def _record(name: str, error: BaseException) -> InternalsUnavailable:
    """Keep a failed import for :func:`problem` and say so in one ``RuntimeWarning`` (later
    calls fail on :func:`problem` without importing again, and without warning)."""
    global _import_failure
    _import_failure = f"importing {name} failed ({type(error).__name__}: {str(error)[:160]})"
    warn_unavailable(FALLBACK, stacklevel=3)
    return InternalsUnavailable(_import_failure)


def inductor() -> types.SimpleNamespace:
    """Inductor's entry points: ``compile_fx``, ``compile_fx_inner``, ``config`` (Inductor's),
    ``functorch_config``, ``TracingContext``, ``tracing``, ``FakeTensorMode`` and
    ``select_decomp_table``. Raises :class:`InternalsUnavailable` where they cannot be used."""
    _require()
    wanted = (
        ("compile_fx", "torch._inductor.compile_fx", "compile_fx"),
        ("compile_fx_inner", "torch._inductor.compile_fx", "compile_fx_inner"),
        ("config", "torch._inductor.config", None),
        ("functorch_config", "torch._functorch.config", None),
        ("TracingContext", "torch._guards", "TracingContext"),
        ("tracing", "torch._guards", "tracing"),
        ("FakeTensorMode", "torch._subclasses.fake_tensor", "FakeTensorMode"),
        ("select_decomp_table", "torch._inductor.decomposition", "select_decomp_table"),
    )
    found = {}
    for key, module_name, attribute in wanted:
        try:
            module = _import(module_name)
            found[key] = module if attribute is None else getattr(module, attribute)
        except (ImportError, AttributeError) as error:
            raise _record(f"{module_name}.{attribute or ''}".rstrip("."), error) from error
    return types.SimpleNamespace(**found)


_WRAPPER_NAMES = ("_empty_strided_cpu", "_reinterpret_tensor", "assert_size_stride", "assert_alignment")


def _guards() -> types.ModuleType:
    _require()
    try:
        return _import("torch._C._dynamo.guards")
    except ImportError as error:
        raise _record("torch._C._dynamo.guards", error) from error


def wrapper_names() -> dict[str, object]:
    """What Inductor's generated CPU wrappers call besides ``torch`` and ``aten``:
    ``empty_strided_cpu``, ``reinterpret_tensor``, ``assert_size_stride``, ``assert_alignment``,
    and ``tensor_data_ptr``, the address of the data-pointer function its compiled extensions
    read from ``_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR``. Raises :class:`InternalsUnavailable`."""
    guards = _guards()
    try:
        names = {name.lstrip("_"): getattr(guards, name) for name in _WRAPPER_NAMES}
        names["tensor_data_ptr"] = guards._torchinductor_pyobject_tensor_data_ptr
    except AttributeError as error:
        raise _record("torch._C._dynamo.guards", error) from error
    return names


def _public_empty_strided(shape: tuple, strides: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_strided(shape, strides, dtype=dtype)


def empty_strided_cpu() -> Callable[[tuple, tuple, torch.dtype], torch.Tensor]:
    """``allocate(shape, strides, dtype)``: Inductor's CPU allocator (about 0.5 µs against
    ``torch.empty_strided``'s 1.6) where the internals are usable, ``torch.empty_strided``
    otherwise (the same tensors, a little slower)."""
    try:
        return _guards()._empty_strided_cpu
    except (InternalsUnavailable, AttributeError):
        return _public_empty_strided


def preload() -> None:
    """Import Inductor's config package (what ``make_fx`` imports on its first call) where the
    internals are usable, so that forked workers inherit it; nothing otherwise."""
    if problem():
        return
    try:
        _import("torch._inductor.config")
    except ImportError as error:
        _record("torch._inductor.config", error)


def warn_unavailable(consequence: str, stacklevel: int = 2) -> None:
    """One ``RuntimeWarning`` saying that the internals are unavailable (:func:`problem`) and
    what the run does instead (``consequence``); nothing where they are available."""
    why = problem()
    if why:
        warnings.warn(f"PyTorch internals unavailable: {why}; {consequence}", RuntimeWarning, stacklevel=stacklevel + 1)


def reset() -> None:
    """Forget an earlier failed import (tests; a process that fixed its environment)."""
    global _import_failure
    _import_failure = ""
