"""Sweeps: models x methods x seeds on Ray, resumable, into one store, with a leaderboard.

``vilab.sweep(models, methods, seeds, out=...)`` (or ``vilab sweep``) runs the grid; the store
is ``out/results.sqlite``; the leaderboard ``out/leaderboard.html`` and ``leaderboard.csv``.
See ``docs/sweeps.md``.
"""

from vilab.inference.sweep.grid import NUTS, SweepSpec, Task, expand_tasks, load_spec, task_id, validate_methods
from vilab.inference.sweep.leaderboard import leaderboard_table, write_leaderboard
from vilab.inference.sweep.runner import STORE_NAME, SweepResult, sweep
from vilab.inference.sweep.store import SweepStore, read_results

__all__ = [
    "NUTS",
    "STORE_NAME",
    "SweepResult",
    "SweepSpec",
    "SweepStore",
    "Task",
    "expand_tasks",
    "leaderboard_table",
    "load_spec",
    "read_results",
    "sweep",
    "task_id",
    "validate_methods",
    "write_leaderboard",
]
