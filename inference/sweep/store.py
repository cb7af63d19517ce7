"""The sweep's results: one SQLite file, one row per task, written as each task ends.

Table ``results`` has one row per task id (``PRIMARY KEY``): ``task_id, model, method, seed,
status ("ok" / "failed"), error, options`` (JSON), ``finished_at`` (UTC), then every metric of
``compare``'s summary row, ``num_gradient_evaluations``, ``gradient_evaluations_scope``,
``task_seconds``, ``warnings``, versions, ``host`` and ``node_id``. Metric columns are added the
first time a task reports them, so a method with new metrics needs no schema change.

Table ``references`` keeps each NUTS reference (its draws as an ``.npz`` blob and its
diagnostics) so a resumed sweep does not recompute it.

The file is in WAL mode: any number of readers (``sqlite3``, pandas, DuckDB) can query it while
the driver writes; each row is committed alone, so a killed driver loses at most the tasks
that were running.
"""

from __future__ import annotations

import datetime
import io
import json
import re
import sqlite3
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import pandas as pd

from vilab.inference.sweep.grid import Task

__all__ = ["SweepStore", "read_results"]

_CORE = (
    "task_id TEXT PRIMARY KEY, model TEXT NOT NULL, method TEXT NOT NULL, seed INTEGER NOT NULL, "
    "status TEXT NOT NULL, error TEXT, options TEXT NOT NULL, finished_at TEXT NOT NULL"
)
_REFERENCES = (
    "reference_id TEXT PRIMARY KEY, model TEXT NOT NULL, options TEXT NOT NULL, draws BLOB NOT NULL, "
    "info TEXT NOT NULL, finished_at TEXT NOT NULL"
)
_COLUMN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class SweepStore:
    """The results file of one sweep (created if absent).

    Args:
        path: the SQLite file, e.g. ``runs/sweep/results.sqlite``.
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._connection = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute(f"CREATE TABLE IF NOT EXISTS results ({_CORE})")
        self._connection.execute(f"CREATE TABLE IF NOT EXISTS references_ ({_REFERENCES})")

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> "SweepStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def statuses(self) -> dict[str, str]:
        """Task id -> status of every recorded task."""
        return dict(self._connection.execute("SELECT task_id, status FROM results").fetchall())

    def finished(self) -> set[str]:
        """Ids of the tasks that finished with status ``"ok"`` (a rerun skips them)."""
        return {task for task, status in self.statuses().items() if status == "ok"}

    def _columns(self) -> list[str]:
        return [row[1] for row in self._connection.execute("PRAGMA table_info(results)")]

    def write(self, task: Task, row: Mapping[str, Any]) -> bool:
        """Record ``task``'s row; a failed row replaces an earlier failed row of the same task.

        Returns:
            ``False`` (and writes nothing) if the task already has an ``"ok"`` row: a task is
            counted once however often it ran.
        """
        values = {
            "task_id": task.id,
            "model": task.model,
            "method": task.method,
            "seed": task.seed,
            "options": json.dumps(task.options, sort_keys=True, default=str),
            "finished_at": _now(),
            **{k: v for k, v in row.items() if k not in ("task_id", "model", "method", "seed", "options")},
        }
        bad = [name for name in values if not _COLUMN_NAME.match(name)]
        if bad:
            raise ValueError(f"row: expected column names of letters, digits and _; got {bad}")
        with self._connection:  # one transaction: the check and the insert
            self._connection.execute("BEGIN IMMEDIATE")
            previous = self._connection.execute("SELECT status FROM results WHERE task_id = ?", (task.id,)).fetchone()
            if previous is not None and previous[0] == "ok":
                return False
            existing = set(self._columns())
            for name in values:
                if name not in existing:
                    self._connection.execute(f'ALTER TABLE results ADD COLUMN "{name}"')
            names = ", ".join(f'"{n}"' for n in values)
            self._connection.execute(
                f"INSERT OR REPLACE INTO results ({names}) VALUES ({', '.join('?' * len(values))})",
                list(values.values()),
            )
        return True

    def reference(self, reference_id: str) -> Optional[tuple[dict[str, np.ndarray], dict]]:
        """``(draws, info)`` of a stored NUTS reference, or ``None``."""
        found = self._connection.execute(
            "SELECT draws, info FROM references_ WHERE reference_id = ?", (reference_id,)
        ).fetchone()
        if found is None:
            return None
        with np.load(io.BytesIO(found[0])) as archive:
            draws = {name: archive[name] for name in archive.files}
        return draws, json.loads(found[1])

    def write_reference(
        self, reference_id: str, model: str, options: Mapping, draws: Mapping[str, np.ndarray], info: Mapping[str, Any]
    ) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **draws)
        self._connection.execute(
            "INSERT OR REPLACE INTO references_ VALUES (?, ?, ?, ?, ?, ?)",
            (
                reference_id,
                model,
                json.dumps(dict(options), sort_keys=True),
                buffer.getvalue(),
                json.dumps(dict(info), default=str),
                _now(),
            ),
        )

    def references(self) -> pd.DataFrame:
        """One row per stored reference: model, its diagnostics (no draws)."""
        rows = self._connection.execute("SELECT model, info, finished_at FROM references_ ORDER BY model").fetchall()
        return pd.DataFrame([{"model": m, **json.loads(info), "finished_at": at} for m, info, at in rows])

    def results(self) -> pd.DataFrame:
        """The ``results`` table as a DataFrame, ordered by model, method and seed."""
        return pd.read_sql_query("SELECT * FROM results ORDER BY model, method, seed", self._connection)


def read_results(path: Union[str, Path]) -> pd.DataFrame:
    """The ``results`` table of the store at ``path`` (read-only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"store: expected a sweep results file; got {str(path)!r}, which does not exist")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        return pd.read_sql_query("SELECT * FROM results ORDER BY model, method, seed", connection)
