"""The store: one row per task id, a finished task is never counted twice, readers see each row."""

import math
import sqlite3

import numpy as np
import pytest

from vilab.inference.sweep.grid import Task
from vilab.inference.sweep.store import SweepStore, read_results


def _task(seed=0, method="meanfield"):
    return Task("normal_normal", method, seed, {"num_draws": 10})


def test_rows_are_written_at_once_and_readable_by_another_connection(tmp_path):
    path = tmp_path / "results.sqlite"
    with SweepStore(path) as store:
        assert store.write(_task(0), {"status": "ok", "error": None, "mean_abs_error_sd": 0.25, "k_hat": math.inf})
        reader = read_results(path)  # a second connection while the writer is open
        assert len(reader) == 1 and reader.loc[0, "mean_abs_error_sd"] == 0.25 and reader.loc[0, "k_hat"] == math.inf
        # a later task with a metric the first did not have adds a column
        assert store.write(_task(1, "nuts"), {"status": "ok", "error": None, "r_hat_max": 1.01, "converged": True})
    rows = read_results(path)
    assert list(rows["seed"]) == [0, 1] and rows.loc[1, "r_hat_max"] == 1.01 and np.isnan(rows.loc[0, "r_hat_max"])
    assert {"task_id", "model", "method", "seed", "status", "error", "options", "finished_at"} <= set(rows.columns)


def test_a_finished_task_is_never_written_twice_and_a_failed_one_is_replaced(tmp_path):
    with SweepStore(tmp_path / "results.sqlite") as store:
        task = _task()
        assert store.write(task, {"status": "failed", "error": "WorkerCrashedError"})
        assert store.finished() == set() and store.statuses() == {task.id: "failed"}
        assert store.write(task, {"status": "ok", "error": None, "mean_abs_error_sd": 0.5})
        assert not store.write(task, {"status": "ok", "error": None, "mean_abs_error_sd": 9.0})
        assert not store.write(task, {"status": "failed", "error": "late duplicate"})
        rows = store.results()
    assert len(rows) == 1 and rows.loc[0, "status"] == "ok" and rows.loc[0, "mean_abs_error_sd"] == 0.5


def test_unsafe_column_names_are_refused(tmp_path):
    with SweepStore(tmp_path / "results.sqlite") as store:
        with pytest.raises(ValueError, match="expected column names of letters, digits and _"):
            store.write(_task(), {"status": "ok", 'x"; DROP TABLE results; --': 1.0})


def test_references_round_trip(tmp_path):
    draws = {"loc": np.linspace(0, 1, 7), "scale[1]": np.arange(7.0)}
    with SweepStore(tmp_path / "results.sqlite") as store:
        assert store.reference("abc") is None
        store.write_reference("abc", "normal_normal", {"seed": 3}, draws, {"r_hat_max": 1.0, "num_divergences": 0})
    with SweepStore(tmp_path / "results.sqlite") as store:
        loaded, info = store.reference("abc")
        table = store.references()
    assert set(loaded) == set(draws) and all(np.array_equal(loaded[k], draws[k]) for k in draws)
    assert info == {"r_hat_max": 1.0, "num_divergences": 0} and list(table["model"]) == ["normal_normal"]


def test_the_file_is_in_wal_mode_for_concurrent_readers(tmp_path):
    with SweepStore(tmp_path / "results.sqlite"):
        mode = sqlite3.connect(tmp_path / "results.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_reading_a_missing_store_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a sweep results file"):
        read_results(tmp_path / "none.sqlite")
