r"""``sweep``: run a grid of models x methods x seeds on Ray, resumably, into one store.

The driver (this process) resolves the grid, skips the tasks the store already holds as
finished, prepares each model's reference once (posteriordb's draws, a stored NUTS reference,
or a NUTS run submitted as its own task), submits a model's tasks once its reference is ready,
and writes each task's row the moment ``ray.wait`` hands it back. A crash or kill of the driver
loses only the tasks that were running; the same call again runs just those and the rest.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np

from vilab.inference.common.progress import progress_bar
from vilab.inference.sweep.executors import RayExecutor, SerialExecutor
from vilab.inference.sweep.grid import (
    SweepSpec,
    Task,
    expand_tasks,
    load_spec,
    task_id,
    validate_methods,
    validate_options,
)
from vilab.inference.sweep.problems import POSTERIORDB_PREFIX, load_problem, resolve_models
from vilab.inference.sweep.store import SweepStore
from vilab.inference.sweep.tasks import run_reference, run_task

__all__ = ["SweepResult", "STORE_NAME", "sweep"]

STORE_NAME = "results.sqlite"


@dataclass
class SweepResult:
    """What :func:`sweep` returns.

    Attributes:
        store: path of the SQLite store.
        leaderboard: path of the HTML page (``None`` if not written).
        num_tasks: tasks in the grid.
        num_skipped: tasks found finished in the store on entry (not run again).
        num_done: tasks this call finished with status ``"ok"``.
        num_failed: tasks this call recorded as failed.
        wall_time: seconds of this call, leaderboard included.
    """

    store: Path
    leaderboard: Optional[Path]
    num_tasks: int
    num_skipped: int
    num_done: int
    num_failed: int
    wall_time: float


def sweep(
    models: Optional[Sequence[str]] = None,
    methods: Optional[Sequence[str]] = None,
    seeds: Optional[Sequence[int]] = None,
    *,
    config: Union[str, Path, None] = None,
    out: Union[str, Path] = "runs/sweep",
    address: Optional[str] = None,
    serial: bool = False,
    progress: bool = True,
    leaderboard: bool = True,
    **options: Any,
) -> SweepResult:
    r"""Run every method on every model with every seed, on Ray, into ``out/results.sqlite``.

    Args:
        models, methods, seeds: the grid (see :class:`~vilab.inference.sweep.grid.SweepSpec`);
            with ``config`` they override the TOML file's.
        config: a TOML file with the grid and options (:func:`~vilab.inference.sweep.grid.load_spec`).
        out: folder of the store and the leaderboard; rerunning into the same folder resumes.
        address: a Ray cluster to join; ``None``: ``$RAY_ADDRESS``, else a local cluster.
        serial: run the tasks one after another in this process instead (no Ray).
        **options: the other :class:`SweepSpec` fields (``svi_options``, ``nuts_options``,
            ``reference_options``, ``method_options``, ``num_draws``, ``num_cpus``,
            ``max_retries``, ``posteriordb``).

    Returns:
        A :class:`SweepResult`.

    Raises:
        ValueError: an unknown model or method, before anything runs.
    """
    start = time.perf_counter()
    if config is not None:
        spec = load_spec(config, models=models, methods=methods, seeds=seeds, **options)
    else:
        if models is None or methods is None:
            raise ValueError(
                "sweep: expected models and methods (or config=a TOML file); got "
                f"models={models!r}, methods={methods!r}"
            )
        spec = SweepSpec(models, methods, seeds if seeds is not None else (0,), **options)
    validate_methods(spec.methods)
    validate_options(spec)
    names = resolve_models(spec.models, spec.posteriordb)
    references = {name: _reference_descriptor(name, spec) for name in names}
    tasks = expand_tasks(spec, references)
    out = Path(out)
    with SweepStore(out / STORE_NAME) as store:
        done_before = store.finished() & {t.id for t in tasks}
        pending = [t for t in tasks if t.id not in done_before]
        counts = _run(spec, store, pending, references, len(tasks), len(done_before), address, serial, progress)
        page = None
        if leaderboard:
            from vilab.inference.sweep.leaderboard import write_leaderboard

            page = write_leaderboard(store, out)
    return SweepResult(
        out / STORE_NAME, page, len(tasks), len(done_before), counts[0], counts[1], time.perf_counter() - start
    )


def _reference_descriptor(name: str, spec: SweepSpec) -> dict:
    """What a model's tasks are scored against (part of their ids)."""
    if name.startswith(POSTERIORDB_PREFIX):
        return {"kind": "posteriordb", "name": name[len(POSTERIORDB_PREFIX) :]}
    return {"kind": "nuts", **spec.reference_options}


def _run(spec, store, pending, references, total, skipped, address, serial, progress) -> tuple[int, int]:
    if not pending:
        return 0, 0
    executor = SerialExecutor() if serial else RayExecutor(address, spec.max_retries)
    state = _Progress(total, skipped, progress, getattr(executor, "dashboard_url", None))
    waiting: dict[str, list[Task]] = {}
    try:
        for model in dict.fromkeys(t.model for t in pending):
            model_tasks = [t for t in pending if t.model == model]
            ready = _prepare_reference(model, references[model], spec, store, executor)
            if ready is None:
                waiting[model] = model_tasks
            else:
                _submit(executor, model_tasks, ready, spec)
        while executor.num_running:
            for key, value, error in executor.wait():
                if isinstance(key, _ReferenceKey):
                    _reference_done(key, value, error, spec, store, executor, waiting, state)
                else:
                    row = _row(value, error)
                    state.record(store.write(key, row) and row["status"])
            state.show(executor.num_running)
    finally:
        executor.close()
        state.close()
    return state.done, state.failed


class _ReferenceKey(NamedTuple):
    """The executor's key of a model's NUTS reference run."""

    model: str
    reference_id: str


def _row(value: Optional[dict], error: Optional[str]) -> dict:
    return value if error is None else {"status": "failed", "error": error}


def _prepare_reference(model, descriptor, spec, store, executor) -> Any:
    """A handle to the model's reference draws, or ``None`` once its NUTS run is submitted."""
    if descriptor["kind"] == "posteriordb":
        draws = load_problem(model, spec.posteriordb).reference_draws
        return executor.put({name: np.asarray(value).reshape(-1) for name, value in draws.items()})
    reference_id = task_id(model, "reference", descriptor["seed"], descriptor)
    stored = store.reference(reference_id)
    if stored is not None:
        return executor.put(stored[0])
    executor.submit(
        _ReferenceKey(model, reference_id),
        run_reference,
        (model, spec.posteriordb, spec.reference_options, spec.num_cpus),
        name=f"sweep reference {model}",
        num_cpus=spec.num_cpus,
    )
    return None


def _reference_done(key, value, error, spec, store, executor, waiting, state) -> None:
    model, reference_id = key
    tasks = waiting.pop(model, [])
    if error is not None:
        for task in tasks:  # every task of the model needs the reference: record why none ran
            state.record(
                store.write(task, {"status": "failed", "error": f"NUTS reference failed: {error}"}) and "failed"
            )
        return
    draws, info = value
    store.write_reference(reference_id, model, spec.reference_options, draws, info)
    _submit(executor, tasks, executor.put(draws), spec)


def _submit(executor, tasks: Sequence[Task], reference: Any, spec: SweepSpec) -> None:
    for task in tasks:
        executor.submit(
            task,
            run_task,
            (task, spec.posteriordb, reference, spec.num_cpus),
            name=f"sweep {task.model} {task.method} seed={task.seed}",
            num_cpus=spec.num_cpus,
        )


class _Progress:
    """The sweep's progress in the terminal: tasks done and failed (of the whole grid, those
    found finished included) and in flight (submitted to Ray: running or queued)."""

    def __init__(self, total: int, skipped: int, enabled: bool, dashboard: Optional[str]) -> None:
        self.done = self.failed = 0
        # A bar on a terminal, a status line every 30 s in a log (a redrawn bar fills a log file).
        self.bar = progress_bar(total=total, desc="sweep", enabled=enabled, leave=True)
        if skipped:
            self.bar.update(skipped)
        if enabled and dashboard:
            message = f"sweep: Ray dashboard at http://{dashboard} (tasks are named 'sweep MODEL METHOD seed=S')"
            print(message, file=sys.stderr, flush=True)

    def record(self, status: Any) -> None:
        """Count a written row (``status`` is ``False`` when the row was already recorded)."""
        if status == "ok":
            self.done += 1
        elif status == "failed":
            self.failed += 1
        if status:
            self.bar.update(1)

    def show(self, running: int) -> None:
        self.bar.set_postfix(done=self.done, failed=self.failed, in_flight=running)

    def close(self) -> None:
        self.bar.close()
