r"""Fused kernels compiled in a forked process while the sampler keeps running.

Compiling a NUTS leaf with Inductor takes 3-6 s (14 s for an HMM's), and importing
Inductor about 2 s more: as long as a whole NUTS run of a small model. The sampler runs on
one thread, so on a machine with a second core the compilation can run beside it. A compile
server, forked from the caller before its first graph is ready (so it imports nothing the caller
has imported, and imports Inductor while the caller traces), receives the run's graphs node for
node, compiles them one after another and reports, for each, where Inductor wrote the generated
wrapper and the compiled C++ extension. The server stays for the next run, so Inductor's import
is paid once per process. The caller loads those two files itself, without importing Inductor,
and keeps stepping its traced graphs meanwhile. The caller checks the loaded kernel against its eager
reference before using it, as for a kernel compiled in-process.

Loading reads the generated ``call`` with ``ast`` and runs it with a namespace of the few names
Inductor's CPU wrappers use (buffer allocation and views, through
:mod:`~vilab.inference.engine.backends.torch_internals`, the compiled kernels,
``aten`` ops and matrix products); a wrapper needing anything else is reported as a failure and the
traced step stays.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import time
import warnings
from typing import Callable, Optional, Sequence

import torch

from vilab.inference.engine.processes import workers as fast_workers
from vilab.inference.engine.graph.serialize import dumps_graph, loads_graph
from vilab.inference.engine.backends import torch_internals
from vilab.inference.engine.backends.artifacts import load_artifact

__all__ = [
    "BackgroundCompile",
    "BackgroundCompiles",
    "BackgroundTicket",
    "background_available",
    "load_artifact",
    "prepare",
    "server_ready",
    "shutdown",
]

# Inductor's import in a fresh server, on the 2-core CPU machine (about 2-2.8 s).
IMPORT_SECONDS = 2.5


def background_available() -> bool:
    """Whether a compilation can run beside the caller: this process may use at least two
    cores and fork a child (:func:`~vilab.inference.engine.processes.workers.cannot_fork`: ``fork`` exists,
    CUDA is not initialised, the process is not daemonic)."""
    return fast_workers.cores() >= 2 and not fast_workers.cannot_fork()


class BackgroundCompiles:
    """Graphs compiled by :func:`~vilab.inference.engine.backends.inductor.compile_artifact` one after
    another in a compile server (:class:`_Server`), while the caller goes on.

    The graphs travel node for node (:func:`~vilab.inference.engine.graph.serialize.dumps_graph`): a
    pickled ``GraphModule`` is traced again from its code on loading, and for one regression's NUTS
    leaf Inductor compiled that re-traced graph into a kernel that failed the eager check. The
    server reports each graph as soon as it is compiled. Where the process-wide server is busy
    (two samplers compiling at once), a private one is forked for this batch.

    Args:
        jobs: ``(graph, example inputs, recycle)`` per graph, in the order to compile them; an
            ATen graph with fixed shapes, and whether to load its kernel as a buffer-reusing call
            (:func:`~vilab.inference.engine.backends.recycle.recycled_call`).
    """

    def __init__(self, jobs: Sequence[tuple[torch.fx.GraphModule, Sequence[torch.Tensor], bool]]) -> None:
        if not jobs:
            raise ValueError("jobs: expected at least one (graph, example, recycle); got none")
        self._jobs = [(tuple(example), recycle) for _, example, recycle in jobs]
        self._messages: dict[int, tuple[str, object]] = {}
        self._open, self._closed = set(range(len(jobs))), False
        try:
            from vilab.inference.engine.backends.inductor import graph_key  # (fast_inductor imports this module)

            # The key travels: the graph rebuilt in the server need not print the same.
            graphs = [(dumps_graph(graph), tuple(example), graph_key(graph, example)) for graph, example, _ in jobs]
            request, why = pickle.dumps((graphs, os.environ.get("TORCHINDUCTOR_CACHE_DIR"))), ""
        except (pickle.PicklingError, TypeError, ValueError) as error:
            request, why = None, f"the graphs cannot be sent to the compile server ({type(error).__name__}: {error})"
        self._server, self._shared = _take_server()
        if request is not None:
            try:
                self._server.conn.send_bytes(request)
            except OSError as error:
                why = f"the compile server did not take the graphs ({type(error).__name__}: {error})"
                _stop(self._server)  # it may hold part of the message
        if why:
            self._messages = {index: ("error", why) for index in self._open}
            self._server.busy = False

    @property
    def _process(self):
        return self._server.process

    def ticket(self, index: int) -> "BackgroundTicket":
        """The handle of graph ``index``: its :meth:`~BackgroundTicket.result`, once."""
        if index not in self._open:
            raise ValueError(f"index: expected an open job in [0, {len(self._jobs)}); got {index}")
        return BackgroundTicket(self, index)

    def _result(self, index: int) -> Optional[tuple[Optional[Callable], str]]:
        self._receive()
        if index not in self._messages:
            return None
        status, payload = self._messages.pop(index)
        self._release(index)
        if status != "ok":
            return None, payload
        example, recycle = self._jobs[index]
        try:
            return load_artifact(payload, example, recycle=recycle), ""
        except (RuntimeError, OSError, ImportError, SyntaxError, TypeError, ValueError, KeyError) as error:
            return None, f"{type(error).__name__}: {str(error)[:200]}"

    def _receive(self) -> None:
        if self._closed or not self._server.busy:
            return
        try:
            while self._server.answered < len(self._jobs) and self._server.conn.poll():
                index, status, payload = pickle.loads(self._server.conn.recv_bytes())
                self._messages[index] = (status, payload)
                self._server.answered += 1
        except (EOFError, OSError):
            _stop(self._server)
            why = f"the compiling process ended (exit code {self._server.process.exitcode})"
            for index in self._open - set(self._messages):
                self._messages[index] = ("error", why)
        if self._server.answered == len(self._jobs):
            self._server.busy = False  # free for the next batch, its answers all read

    def _release(self, index: int) -> None:
        self._open.discard(index)
        if not self._open:
            self.close()

    def close(self) -> None:
        """Give up the graphs not yet taken; a server still compiling them is stopped."""
        if self._closed:
            return
        self._closed, self._open = True, set()
        self._receive()
        if self._server.busy or not self._shared:
            _stop(self._server)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


class BackgroundTicket:
    """One graph of a :class:`BackgroundCompiles`."""

    def __init__(self, batch: BackgroundCompiles, index: int) -> None:
        self._batch, self._index, self._done = batch, index, False

    @property
    def _process(self):
        return self._batch._process

    def result(self) -> Optional[tuple[Optional[Callable], str]]:
        """``None`` while compiling; then ``(fused call, "")`` or ``(None, why not)``, once."""
        if self._done:
            raise RuntimeError("BackgroundTicket.result: the result was already taken")
        outcome = self._batch._result(self._index)
        self._done = outcome is not None
        return outcome

    def close(self) -> None:
        """Give up this graph; the server's batch stops once none of its graphs is wanted."""
        if not self._done:
            self._done = True
            self._batch._release(self._index)


class BackgroundCompile(BackgroundTicket):
    """One graph compiled in the background (a :class:`BackgroundCompiles` of one job);
    arguments as there."""

    def __init__(self, graph: torch.fx.GraphModule, example: Sequence[torch.Tensor], recycle: bool = False) -> None:
        super().__init__(BackgroundCompiles([(graph, example, recycle)]), 0)


class _Server:
    """A forked process that compiles the batches of graphs sent to it, one batch at a time.
    Forked, it starts with what the caller has imported, and imports Inductor at once."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("fork")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child,), daemon=True)
        with warnings.catch_warnings():
            # JAX, when imported, warns on every fork; the server never touches JAX.
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            self.process.start()
        child.close()  # the server's end: EOF here once the server is gone
        self.busy, self.answered, self.batches, self.started = False, 0, 0, time.monotonic()

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(timeout=5)
        self.conn.close()
        self.busy = False


_SHARED: Optional[_Server] = None


def _take_server() -> tuple[_Server, bool]:
    """The process-wide compile server (forked on first use), or a private one while it is
    busy; marked busy. Returns it and whether it is the shared one."""
    global _SHARED
    if _SHARED is None or not _SHARED.process.is_alive():
        _SHARED = _Server()
    server, shared = (_Server(), False) if _SHARED.busy else (_SHARED, True)
    server.busy, server.answered = True, 0
    server.batches += 1
    return server, shared


def _stop(server: _Server) -> None:
    global _SHARED
    server.stop()
    if server is _SHARED:
        _SHARED = None


def server_ready() -> bool:
    """Whether the shared compile server runs, is idle and has Inductor imported (it has
    compiled a batch, or was started by :func:`prepare` long enough ago)."""
    if _SHARED is None or not _SHARED.process.is_alive() or _SHARED.busy:
        return False
    return _SHARED.batches > 0 or time.monotonic() - _SHARED.started > IMPORT_SECONDS


def prepare() -> None:
    """Start the shared compile server now, so that it imports Inductor while the caller traces
    its model: a sampler that will likely compile calls this first. A no-op where background
    compilation is unavailable or the server runs already."""
    global _SHARED
    if background_available() and (_SHARED is None or not _SHARED.process.is_alive()):
        _SHARED = _Server()


def shutdown() -> None:
    """Stop the shared compile server (the next background compilation forks a new one, with
    the caller's state at that time)."""
    if _SHARED is not None:
        _stop(_SHARED)


def _import_inductor() -> None:
    try:
        torch_internals.inductor()
    except torch_internals.InternalsUnavailable:  # each compilation then reports why
        pass


def _serve(conn) -> None:
    from vilab.inference.engine.backends import inductor as fast_inductor

    torch.set_num_threads(1)
    # Inductor's import (seconds) runs beside the first receive, so a caller's send never
    # waits on it.
    warm = threading.Thread(target=_import_inductor, daemon=True)
    warm.start()
    while True:
        try:
            request, cache = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        warm.join()
        if cache is not None:  # the caller's Inductor cache, as it is now
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        for index, (blob, example, key) in enumerate(request):
            try:
                message = (index, "ok", fast_inductor.compile_artifact(loads_graph(blob), example, key))
            except Exception as error:  # noqa: BLE001 -- any failure is reported; the caller keeps its step
                message = (index, "error", f"{type(error).__name__}: {str(error).strip()[:200]}")
            # Plain pickle: multiprocessing's would pass tensors through shared memory.
            conn.send_bytes(pickle.dumps(message))
