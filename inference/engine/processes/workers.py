r"""The vectorized sampler's chains split over processes: one batch of chains per core.

One process advances all chains together, on one core: a NUTS leaf over a few hundred data
points costs in proportion to the chains it carries (a regression's leaf over 2,000 points: 33 µs for 4 chains, 19 for 2),
and Python's overhead per leapfrog step is paid once. With a second core, two processes that
each run half the chains halve the arithmetic per process and pay the overhead on each core at
once. Each batch is an ordinary vectorized run (its own trace, warmup and seed) in a child
forked from the caller, so a model defined in a notebook needs no pickling; the children report
progress to one bar and send their results back pickled.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import warnings
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from vilab.inference.engine.processes.chains import cannot_fork, run_chains
from vilab.errors import VectorizationError

__all__ = [
    "available_workers",
    "batch_sizes",
    "batch_seed",
    "cannot_fork",
    "cores",
    "frozen_heap",
    "resolve_workers",
    "run_batches",
    "ThrottledReport",
]


def cores() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_workers(num_chains: int) -> int:
    """Processes that ``workers=None`` uses: one per core this process may use, at most one per
    chain; 1 where :func:`cannot_fork` says why not."""
    if cannot_fork():
        return 1
    return max(1, min(num_chains, cores()))


def resolve_workers(workers: Optional[int], num_chains: int) -> int:
    """``workers`` checked, or :func:`available_workers` for ``None``.

    Raises:
        ValueError: ``workers`` is not a positive integer, or is more than ``num_chains``.
    """
    if workers is None:
        return available_workers(num_chains)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected a positive integer or None; got {workers!r}")
    if workers > num_chains:
        raise ValueError(f"workers: expected at most num_chains={num_chains} processes; got {workers}")
    if workers > 1 and cannot_fork():
        raise ValueError(f"workers: expected 1 here ({cannot_fork()}); got {workers}")
    return workers


def batch_sizes(num_chains: int, workers: int) -> list[int]:
    """Chains per process, as even as possible, larger batches first: ``(5, 2) -> [3, 2]``."""
    assert 1 <= workers <= num_chains
    base, extra = divmod(num_chains, workers)
    return [base + (index < extra) for index in range(workers)]


def batch_seed(seed: int, index: int) -> int:
    """The seed of batch ``index``: ``seed`` itself for the first (so one batch is the unsplit
    run), and for the others a seed from NumPy's ``SeedSequence`` of ``(seed, index)``, so no
    batch of one run repeats a batch of another run's seed."""
    if index == 0:
        return seed
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))  # torch's manual_seed takes up to 2**63 - 1 unsigned


class ThrottledReport:
    """Progress counted in a child and sent at most every ``interval`` seconds: a message per
    NUTS iteration would cost the child a pickle and a pipe write each time."""

    def __init__(self, report: Callable[[int], None], interval: float = 0.25) -> None:
        self.report, self.interval = report, interval
        self.pending, self.last = 0, time.perf_counter()

    def update(self, count: int = 1) -> None:
        self.pending += count
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.flush()
            self.last = now

    def flush(self) -> None:
        if self.pending:
            self.report(self.pending)
            self.pending = 0

    def close(self) -> None:
        self.flush()


def _batch(worker: Callable, sizes: Sequence[int], seed: int, options: dict, index: int, report) -> Any:
    """Runs in the child: batch ``index`` of the chains. A ``ValueError`` or a
    :class:`~vilab.inference.engine.potential.VectorizationError` comes back as a value, so the caller
    raises the same kind (a caller falls back to Pyro's NUTS on the latter)."""
    first = sum(sizes[:index])
    init = options.get("init_values")
    if init:
        init = {name: value[first : first + sizes[index]] for name, value in init.items()}
    # A warning in a child (a leaf that could not be traced: correct, several times slower)
    # would die with it; it travels back with the result and the caller warns.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = worker(
                **{**options, "init_values": init},
                num_chains=sizes[index],
                seed=batch_seed(seed, index),
                report=ThrottledReport(report),
            )
        except (ValueError, VectorizationError) as error:
            result = _Raised(type(error), str(error))
    raised = [(w.category, str(w.message)) for w in caught]
    # Pickled here, by value: the queue's pickler would send a tensor's storage as a file
    # descriptor, which is gone (a reset connection) once this child has exited.
    return pickle.dumps((result, raised))


class _Raised:
    """An error of a batch, to raise again in the caller (the class travels by reference)."""

    def __init__(self, kind: type, message: str) -> None:
        self.kind, self.message = kind, message


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """The objects alive on entry are left out of garbage collections until exit
    (:func:`gc.freeze`). A process that has imported torch holds about a million of them, and
    tracing a model allocates enough to trigger full collections over all of them: the first
    trace of a small hierarchical model spent 0.4 of its 0.8 s collecting. Nothing changes where the caller
    has frozen objects already."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _preload() -> None:
    """What every batch would otherwise do once in its own process, done once before the fork:
    the first ``make_fx`` imports Inductor's config package (0.8 s on the 2-core machine), the
    first shape broadcast of a transform imports symbolic shapes (0.5 s), and the virtual
    machine's library is loaded. A child's imports die with it, so without this every run
    would pay them again."""
    import torch.fx.experimental.proxy_tensor  # noqa: F401
    import torch.fx.experimental.symbolic_shapes  # noqa: F401

    from vilab.inference.engine.backends import torch_internals
    from vilab.inference.engine.backends.vm import vm_unavailable

    torch_internals.preload()  # Inductor's config: imported by make_fx on its first call
    vm_unavailable(wait=False)


def run_batches(
    worker: Callable, sizes: Sequence[int], seed: int, options: dict, *, total: int, progress: bool
) -> list:
    """``worker(**options, num_chains=size, seed=batch_seed(seed, index), report=...)`` for each
    batch in its own forked process (one intra-op thread each); the results in batch order.

    ``options["init_values"]`` (``{site: (num_chains, ...)}``), if given, is sliced per batch.
    ``total`` is the iterations of all batches together, for the progress bar.

    Raises:
        ValueError, VectorizationError: as a batch raised it.
        ChainError: a batch failed otherwise, or its process died.
    """
    _preload()
    with frozen_heap():  # and so for the children, whose collections then leave its pages shared
        results = run_chains(
            _batch,
            (worker, sizes, seed, options),
            len(sizes),
            parallel=True,
            total=total,
            progress=progress,
            desc="vectorized NUTS",
        )
    results, raised = zip(*[pickle.loads(blob) for blob in results])
    for category, message in dict.fromkeys(w for batch in raised for w in batch):  # once each, in order
        warnings.warn(message, category, stacklevel=3)
    for result in results:
        if isinstance(result, _Raised):
            raise result.kind(result.message)
    return list(results)
