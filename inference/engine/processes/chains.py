"""Run independent chains in forked processes (or in turn), with one progress bar."""

from __future__ import annotations

import multiprocessing as mp
import queue
import traceback
import warnings
from typing import Any, Callable, Sequence

import torch

from vilab.inference.common.progress import progress_bar

from vilab.errors import ChainError

__all__ = ["run_chains", "cannot_fork", "ChainError"]


def _child(worker, worker_args, chain, messages):
    torch.set_num_threads(1)  # chains share the cores; one thread each avoids oversubscription
    try:
        result = worker(*worker_args, chain, lambda n: messages.put(("progress", chain, n)))
        messages.put(("done", chain, result))
    except Exception:  # noqa: BLE001 - re-raised in the parent with the traceback
        messages.put(("error", chain, traceback.format_exc()))


def cannot_fork() -> str:
    """Why this process cannot split its chains over children (empty if it can)."""
    if "fork" not in mp.get_all_start_methods():
        return "the 'fork' start method is missing here"
    if torch.cuda.is_initialized():
        return "CUDA is initialised, and a forked child cannot use it"
    if mp.current_process().daemon:  # a worker of mp.Pool, say
        return "this is a daemonic process, which multiprocessing lets have no children"
    if _TORCH_VERSION >= (2, 14):
        # From 2.14, tracing a gradient (make_fx over autograd.grad, as the potential is traced)
        # leaves autograd unusable in any forked child ("Unable to handle autograd's threading
        # in combination with fork-based multiprocessing"); torch 2.13 allowed it.
        return (
            f"torch {torch.__version__}'s autograd cannot run in a forked child once the parent has traced a gradient"
        )
    return ""


_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def run_chains(
    worker: Callable,
    worker_args: Sequence[Any],
    num_chains: int,
    *,
    parallel: bool,
    total: int,
    progress: bool,
    desc: str,
) -> list:
    """Call ``worker(*worker_args, chain, report)`` for each chain and return results in order.

    ``report(n)`` advances the shared progress bar by ``n`` iterations.
    """
    if parallel and num_chains > 1 and cannot_fork():
        warnings.warn(
            f"{desc}: the chains run one after another in this process: {cannot_fork()}", RuntimeWarning, stacklevel=3
        )
        parallel = False
    bar = progress_bar(total=total, desc=desc, enabled=progress)
    try:
        if not parallel or num_chains == 1:
            return [worker(*worker_args, chain, bar.update) for chain in range(num_chains)]
        return _run_forked(worker, worker_args, num_chains, bar)
    finally:
        bar.close()


def _run_forked(worker, worker_args, num_chains, bar) -> list:
    context = mp.get_context("fork")
    messages = context.Queue()
    processes = [
        context.Process(target=_child, args=(worker, worker_args, c, messages), daemon=True) for c in range(num_chains)
    ]
    for process in processes:
        process.start()
    results: dict[int, Any] = {}
    try:
        while len(results) < num_chains:
            try:
                kind, chain, payload = messages.get(timeout=5.0)
            except queue.Empty:
                dead = [c for c, p in enumerate(processes) if not p.is_alive() and c not in results]
                if dead and messages.empty():
                    raise ChainError(f"chain {dead[0]} exited (code {processes[dead[0]].exitcode}) without a result")
                continue
            if kind == "progress":
                bar.update(payload)
            elif kind == "error":
                raise ChainError(f"chain {chain} failed:\n{payload}")
            else:
                results[chain] = payload
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join(timeout=1.0)
    return [results[c] for c in range(num_chains)]
