r"""Fused C++ kernels for traced sampler steps, through PyTorch's Inductor.

A NUTS leaf runs 140-530 small ATen ops; dispatched one by one (PyTorch's former Static Runtime
took about 1.1 µs per op, fx's Python code more), so a small regression's leaf costs about 200 µs while its arithmetic takes about 15 µs. Inductor
fuses the whole graph into one C++ function (compiled by the system's ``g++``). Its Python
wrapper then dominates: size asserts on every input, the AOT-autograd and Dynamo wrappers, and
one allocation per buffer. The asserts are switched off (the shapes are fixed by construction
and the caller checks the compiled step against the eager one), and the generated ``call``
function is invoked directly, which leaves about 45 µs per such leaf (from about 200), most
of it one allocation per buffer; a step whose caller lets it reuse its buffers
(:mod:`~vilab.inference.engine.backends.recycle`) gets down to about 16 µs.

Compiling costs seconds (about 1.3 s per graph and 15 ms per op, plus about 2 s of one-off setup
per process), so :class:`~vilab.inference.engine.policy.FusePolicy` compiles a step only when its measured calls say it will
pay for itself. Where a second core is free, the compilation runs in a background process
(:mod:`~vilab.inference.engine.processes.server`) and the run goes on meanwhile.
A compiled kernel is recorded in Inductor's cache directory with what it takes to load it
(:func:`load_cached`): a later run of the same graph, in this process or another, loads it in
milliseconds instead of compiling (a compile that hits Inductor's own cache still takes about
a second, and a fresh process first imports Inductor). Small matrix
products and short cumulative sums and products are decomposed before lowering, so that they
are fused too instead of calling ATen (:data:`SMALL_MATMUL`, :data:`SMALL_SCAN`).

Everything here is optional: without a C++ compiler, or wherever Inductor fails, the caller
keeps its traced step (the virtual machine or the fx graph) and records why. ``compile_fused``
uses Inductor's internal entry points (``compile_fx`` with an ``inner_compile`` hook, the
compiled graph's ``current_callable``), reached only through
:mod:`~vilab.inference.engine.backends.torch_internals` on the PyTorch releases they were tested
on; elsewhere it compiles with the public ``torch.compile`` (no kernel cache, no background
compilation). A change there shows as a fallback, not as wrong results, because every fused
step is checked against its eager reference before use.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import sysconfig
import warnings
from typing import Callable, Optional, Sequence

import torch

from vilab.inference.engine.backends import artifacts as fast_artifacts
from vilab.inference.engine.backends import torch_internals
from vilab.inference.engine.cache import cache_problem, inductor_cache_dir, private_file
from vilab.inference.engine.backends.recycle import recycled_call

__all__ = [
    "compile_fused",
    "compile_artifact",
    "graph_key",
    "is_cached",
    "load_cached",
    "predicted_compile_seconds",
    "fusion_unavailable",
    "normalize_compiler",
    "COMPILERS",
]

# "graph": the traced step as fx's code, never fused; "vm": on the virtual machine wherever it
# translates, never fused; "inductor": fused from the start; "auto": the virtual machine where
# it is faster, fused when that pays (FusePolicy); "eager": the engine off, nothing traced.
COMPILERS = ("auto", "inductor", "graph", "vm", "eager")


def normalize_compiler(compiler: str, stacklevel: int = 3) -> str:
    """``compiler`` as one of :data:`COMPILERS`: the former ``"torchscript"``
    (TorchScript's Static Runtime, which PyTorch deprecated and vilab no longer uses) is read
    as ``"graph"``, the unfused traced step, with a ``FutureWarning``."""
    if compiler == "torchscript":
        warnings.warn(
            "compiler='torchscript' is deprecated: vilab no longer runs TorchScript; it means "
            "compiler='graph' (the traced step, unfused); pass that instead",
            FutureWarning,
            stacklevel=stacklevel,
        )
        return "graph"
    return compiler


# Inductor's vectorised kernels run leaves along long contiguous rows about 2x faster, others no
# faster or slower, but compile 1-3 s slower: in a 2000-iteration run the later kernel costs what
# the faster one saves (the measurements behind this and the constants below: docs/design/engine.md). (Switching vectorisation per graph must go through ``cpp.simdlen``: once
# ``cpp.vec_isa_ok`` is off, Inductor's cached list of instruction sets stays empty in that
# process.)
VECTORIZE = False
# Seconds of compilation per graph, per graph op and per process, measured cold on the 2-core
# CPU machine (leaves of 136-325 ops in 3.1-6.4 s; merges of 49-61 ops 1.9-2.0 s; the first compile
# in a process 1.4-1.9 s more). Compiling straight from the functional graph, without AOT-autograd,
# was 0.3-0.45 s faster per graph but failed on an HMM's leaf after 33 s.
SECONDS_PER_GRAPH = 1.3
SECONDS_PER_OP = 0.015
SETUP_SECONDS = 1.7
# A fused step's time per call against the traced step's: 2.2-5x faster; a fused step that reuses
# its buffers: 13-58x where the wrapper dominated (regressions, hierarchical and time-series
# models), 2.5-3.5x where arithmetic does (mixtures, HMMs).
EXPECTED_SPEEDUP = 3.0
RECYCLED_SPEEDUP = 8.0
# Against a step on the virtual machine (fast_vm): Inductor's kernels replaced the program at
# 1.25-2x (an HMM's leaf; regressions' leaves by less), and on six of ten benchmark problems
# never did.
VM_SPEEDUP = 1.5
# Inductor inlines an elementwise result into each reader with up to 4 reads; a log-depth scan
# (GARCH, ARMA) then recomputes every earlier round in each later one: 110 s of compilation
# instead of 5 s, for a kernel no faster. One read is the threshold that keeps compilation
# linear; a regression's leaf costs 45 µs instead of 40 with it.
REALIZE = {"realize_reads_threshold": 1, "realize_acc_reads_threshold": 2}
# Fuse only if the predicted saving exceeds the predicted compile time by this factor: the
# compilation blocks the run, and the saving extrapolates early (often costlier) iterations
# (a hierarchical model: 7.4-10.4 s predicted, about 6.7 s measured).
MARGIN = 1.25
# A background compilation (another core's time) is started if the predicted saving once its
# kernel is ready exceeds this fraction of the compile time.
BACKGROUND_MARGIN = 0.1
# Matrix products with a contraction of at most [0] terms and at most [1] entries per output
# matrix are fused into the kernel rather than calling BLAS: a two-state HMM's leaf made 21 calls
# of ``bmm`` on 2x2 matrices, each with its own buffers and views; fused, the leaf is 4x faster
# (424 -> 106 µs per call) and compiles 3x faster. Regressions' products (100 x 5 by 5 x 4) stay in
# BLAS: decomposed, their leaves were no faster (7-12 µs either way, noise).
SMALL_MATMUL = (8, 64)
# Cumulative sums and products over at most this many terms are fused too (Inductor calls ATen for
# them on CPU): the stick-breaking and ordered-vector transforms of a two-state HMM's leaf made 4
# such calls, each with its own buffer.
SMALL_SCAN = 16
# Compiling a graph found in Inductor's cache: tracing and loading only (a regression's leaf: 0.95 s).
CACHED_SECONDS = 1.0
_setup_done = False


def fusion_unavailable() -> str:
    """Why fused kernels cannot be built here by Inductor's internal entry points (those that
    ``compiler="auto"`` uses), or ``""`` when they can."""
    # Looked up, not imported: importing Inductor takes about a second.
    internal = torch_internals.problem()
    if internal:
        return f"PyTorch internals unavailable ({internal})"
    if shutil.which("g++") is None and shutil.which("c++") is None:
        return "no C++ compiler (g++) on PATH; install one (apt-get install g++)"
    include = sysconfig.get_paths().get("include", "")
    if not os.path.exists(os.path.join(include, "Python.h")):
        return f"no Python headers in {include!r} (apt-get install python3-dev)"
    return ""


def compile_fused(graph: torch.fx.GraphModule, example: Sequence[torch.Tensor], recycle: bool = False) -> Callable:
    """``graph`` (ATen ops, fixed shapes) compiled by Inductor into one C++ function.

    Returns a callable of the same inputs returning a tuple of fresh tensors or, with
    ``recycle``, of tensors from buffers allocated once and overwritten two calls later
    (:func:`~vilab.inference.engine.backends.recycle.recycled_call`; fresh tensors where that rewrite does
    not apply). Raises ``RuntimeError`` (or another error of Inductor's) when it cannot be
    compiled; the caller must check the result against its reference before using it.
    Where the internals are unavailable (:mod:`~vilab.inference.engine.backends.torch_internals`,
    which warns once) the graph is compiled by the public ``torch.compile`` instead.
    """
    try:
        wrapped, direct = _inductor_compile(graph, example)
    except torch_internals.InternalsUnavailable:
        return _public_compile(graph)
    if direct is None:
        return lambda *args: tuple(wrapped(*args))
    call, constants = direct
    if recycle:
        recycled = recycled_call(call, constants, example)
        if recycled is not None:
            return recycled
    return lambda *args: call([*constants, *args])


def _public_compile(graph: torch.fx.GraphModule) -> Callable:
    """``graph`` compiled by ``torch.compile`` (Inductor behind Dynamo's guards: slower per call
    than :func:`_inductor_compile`'s direct call, and not reloadable by another process)."""
    compiled = torch.compile(graph, backend="inductor", fullgraph=True, dynamic=False)
    return lambda *args: tuple(compiled(*args))


def compile_artifact(graph: torch.fx.GraphModule, example: Sequence[torch.Tensor], key: Optional[str] = None) -> dict:
    """Compile ``graph`` as :func:`compile_fused` does and describe the result so that another
    process can run it without Inductor: ``{"source": the generated wrapper's path, "kernels":
    {name: path of the compiled extension}, "constants": the lifted constants}``
    (:func:`~vilab.inference.engine.backends.artifacts.load_artifact`). ``key``: the graph's cache key as
    the caller computed it (:func:`graph_key`; a graph rebuilt in another process may print
    differently). Raises ``RuntimeError`` where the generated code is not a plain ``call`` of
    compiled C++ kernels."""
    _, direct = _inductor_compile(graph, example, key)
    if direct is None:
        raise RuntimeError("Inductor's wrapper does more than call its generated code")
    return _artifact(*direct)


def _artifact(call: Callable, constants: list) -> dict:
    """Where the generated ``call`` and its compiled kernels are, and its lifted constants."""
    import inspect

    namespace = inspect.unwrap(getattr(call, "__func__", call)).__globals__
    kernels = {}
    for name, value in namespace.items():
        module = getattr(value, "__self__", None)
        path = getattr(module, "__file__", None) or ""
        if callable(value) and path.endswith(".so") and getattr(value, "__name__", "") == "kernel":
            kernels[name] = path
    return {
        "source": inspect.getsourcefile(call),
        "kernels": kernels,
        "constants": [tensor.detach().clone() for tensor in constants],
    }


def load_cached(
    graph: torch.fx.GraphModule, example: Sequence[torch.Tensor], recycle: bool = False
) -> Optional[Callable]:
    """The kernel an earlier compilation of ``graph`` left in the current Inductor cache
    directory (in this process or another), loaded without Inductor and without compiling
    (:func:`~vilab.inference.engine.backends.artifacts.load_artifact`), or ``None``. The caller checks it
    against its reference, as it does a fresh kernel."""
    if cache_problem():  # loading runs the cached code: only from a private directory
        return None
    try:
        root = inductor_cache_dir()
        artifact = torch.load(private_file(_marker_path(graph_key(graph, example)), root), weights_only=True)
        # The marker names the wrapper's source (run with ``exec``) and the extensions (loaded):
        # each must be this user's own file inside the private directory.
        for path in (artifact["source"], *artifact["kernels"].values()):
            private_file(path, root)
        return fast_artifacts.load_artifact(artifact, example, recycle=recycle)
    except (
        OSError,
        EOFError,
        RuntimeError,
        ImportError,
        SyntaxError,
        TypeError,
        ValueError,
        KeyError,
        pickle.UnpicklingError,
    ):
        return None


def _inductor_compile(graph: torch.fx.GraphModule, example: Sequence[torch.Tensor], key: Optional[str] = None) -> tuple:
    """Inductor's compiled function for ``graph`` and its generated code as a direct call
    (:func:`_direct_call`; ``None`` where the wrappers do more than call it), recorded in the
    cache under ``key`` (default: :func:`graph_key`)."""
    global _setup_done
    problem = cache_problem()  # Inductor writes and reloads its kernels in its cache directory
    if problem:
        raise RuntimeError(problem)
    key = key or graph_key(graph, example)  # before Inductor, which may rewrite ``graph``
    internals = torch_internals.inductor()
    inner = []

    def capture(*args, **kwargs):
        compiled = internals.compile_fx_inner(*args, **kwargs)
        inner.append(compiled)
        return compiled

    # The AOT-autograd cache would skip ``capture`` on a hit; Inductor's own cache still applies,
    # but only inside a tracing context with a shape environment (Dynamo's, normally).
    # One compile thread: a pool of compile workers costs a torch import each, on a core the
    # caller may be using.
    settings = {"size_asserts": False, "cpp.vec_isa_ok": VECTORIZE, "compile_threads": 1, **REALIZE}
    with (
        internals.config.patch(settings),
        internals.functorch_config.patch(enable_autograd_cache=False),
        internals.tracing(internals.TracingContext(internals.FakeTensorMode(shape_env=_shape_env()))),
    ):
        with warnings.catch_warnings():  # Inductor's own deprecation warnings are not the user's
            warnings.simplefilter("ignore", FutureWarning)
            decompositions = _decompositions(internals.select_decomp_table)
            wrapped = internals.compile_fx(graph, list(example), inner_compile=capture, decompositions=decompositions)
    _setup_done = True
    direct = _direct_call(wrapped, inner, example) if len(inner) == 1 else None
    _mark_cached(key, None if direct is None else _artifact(*direct))
    return wrapped, direct


def is_cached(graph: torch.fx.GraphModule, example: Sequence[torch.Tensor]) -> bool:
    """Whether :func:`compile_fused` has compiled this graph (code, constants, input shapes,
    settings) into the current Inductor cache directory, so that fusing it again is a load
    (:func:`load_cached`) or a cache hit (about 1 s) rather than a cold compilation."""
    if cache_problem():
        return False
    return os.path.exists(_marker_path(graph_key(graph, example)))


def predicted_compile_seconds(graph: torch.fx.GraphModule, example: Sequence[torch.Tensor]) -> float:
    """Seconds :func:`compile_fused` is expected to take on ``graph`` in a process that has
    compiled before: :data:`CACHED_SECONDS` for a cache hit (:func:`is_cached`), otherwise
    :data:`SECONDS_PER_GRAPH` plus :data:`SECONDS_PER_OP` per op."""
    if is_cached(graph, example):
        return CACHED_SECONDS
    return SECONDS_PER_GRAPH + SECONDS_PER_OP * sum(1 for node in graph.graph.nodes if node.op == "call_function")


def graph_key(graph: torch.fx.GraphModule, example: Sequence[torch.Tensor]) -> str:
    """What identifies a compiled kernel: the graph's code and constants, the inputs' shapes,
    strides and dtypes, the settings and the PyTorch version."""
    digest = hashlib.sha256(
        f"{torch.__version__}|{VECTORIZE}|{REALIZE}|{SMALL_MATMUL}|{SMALL_SCAN}|{torch.get_num_threads()}".encode()
    )
    digest.update(graph.code.encode())
    for node in graph.graph.nodes:
        value = getattr(graph, node.target, None) if node.op == "get_attr" else None
        if isinstance(value, torch.Tensor):
            digest.update(f"{node.target}|{value.dtype}|{tuple(value.shape)}".encode())
            # A dense copy: an expanded constant has stride 0, which no byte view accepts.
            dense = torch.empty(value.numel(), dtype=value.dtype).copy_(value.detach().reshape(-1))
            digest.update(dense.view(torch.uint8).numpy().tobytes())
    for tensor in example:
        digest.update(f"{tensor.dtype}|{tuple(tensor.shape)}|{tensor.stride()}".encode())
    return digest.hexdigest()


def _marker_path(key: str) -> str:
    return os.path.join(inductor_cache_dir(), "vilab_fused", key)


def _decompositions(select_decomp_table: Callable[[], dict]) -> dict:
    """Inductor's decompositions, with small matrix products (:data:`SMALL_MATMUL`) written as a
    broadcast product and a sum, and short cumulative sums and products (:data:`SMALL_SCAN`) as
    one sum or product per prefix, which Inductor fuses into the kernel around them."""
    table = dict(select_decomp_table())
    aten = torch.ops.aten
    inductor_bmm = table.get(aten.bmm.default)

    def bmm(left, right, *rest, **options):
        if not rest and not options and _small_product(left.shape, right.shape):
            return (left.unsqueeze(-1) * right.unsqueeze(-3)).sum(-2)
        return NotImplemented if inductor_bmm is None else inductor_bmm(left, right, *rest, **options)

    def mm(left, right):
        if _small_product(left.shape, right.shape):
            return (left.unsqueeze(-1) * right.unsqueeze(-3)).sum(-2)
        return NotImplemented

    def scan(reduce: Callable) -> Callable:
        def decomposed(tensor, dim, dtype=None):
            if tensor.dim() == 0 or dtype is not None or not tensor.is_floating_point():
                return NotImplemented
            dim = dim % tensor.dim()
            size = tensor.shape[dim]
            if not isinstance(size, int) or not 1 <= size <= SMALL_SCAN:
                return NotImplemented
            prefixes = [reduce(tensor.narrow(dim, 0, end), dim, keepdim=True) for end in range(1, size + 1)]
            return torch.cat(prefixes, dim)

        return decomposed

    table[aten.bmm.default], table[aten.mm.default] = bmm, mm
    table[aten.cumsum.default], table[aten.cumprod.default] = scan(torch.sum), scan(torch.prod)
    return table


def _small_product(left: Sequence, right: Sequence) -> bool:
    sizes = [*left, right[-1]]
    if not all(isinstance(size, int) for size in sizes):
        return False
    return sizes[-2] <= SMALL_MATMUL[0] and sizes[-3] * sizes[-1] <= SMALL_MATMUL[1]


def _mark_cached(key: str, artifact: Optional[dict]) -> None:
    """Record that ``key`` is in the cache, with the kernel's ``artifact`` (:func:`load_cached`)
    where there is one; written to a temporary file and renamed, so a reader never sees half."""
    try:
        path = _marker_path(key)  # Inductor's cache_dir() creates the directory
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{os.getpid()}.part"
        if artifact is None:
            open(partial, "wb").close()
        else:
            torch.save(artifact, partial)
        os.replace(partial, path)
    except OSError:  # a read-only cache only costs a compilation next time
        pass


def _direct_call(wrapped: Callable, inner: list, example: Sequence[torch.Tensor]) -> Optional[tuple]:
    """The generated ``call(args)`` without its wrappers and the lifted constants the wrappers
    prepend to the inputs, or ``None`` where the wrappers do more than that (then the wrapped
    function must be used)."""
    call = getattr(inner[0], "current_callable", None)
    if call is None:
        return None
    seen = []

    def record(args):
        seen.append(list(args))
        return call(args)

    inner[0].current_callable = record
    try:
        reference = wrapped(*example)
    finally:
        inner[0].current_callable = call
    if len(seen) != 1:
        return None
    full = seen[0]
    constants = full[: len(full) - len(example)]
    if any(got is not want for got, want in zip(full[len(constants) :], example)):
        return None
    if any(any(const is tensor for tensor in example) for const in constants):
        return None

    def run(*args):
        return call([*constants, *args])

    got = run(*example)
    if (
        not isinstance(got, tuple)
        or len(got) != len(reference)
        or not all(
            torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, equal_nan=True))
            for a, b in zip(got, reference)
        )
    ):
        return None
    return call, constants


def _shape_env():
    """A shape environment for Inductor's cache lookups, on the torch versions where a
    statically shaped graph compiles correctly with one; ``None`` elsewhere (no cache hits)."""
    if _TORCH_VERSION >= (2, 14):
        return None  # 2.14 turns the sizes symbolic and emits code reading unbound size symbols
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return ShapeEnv()


_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
