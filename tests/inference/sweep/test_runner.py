"""The driver, run serially (no Ray): one row per task, resume after an interruption, failures kept."""

import pandas as pd
import pytest

from vilab.inference.sweep import runner, sweep
from vilab.inference.sweep.store import SweepStore, read_results

from sweep_helpers import numbers


def test_serial_sweep_writes_one_row_per_task_and_a_rerun_skips_them(tmp_path, tiny):
    first = sweep(["normal_normal"], ["meanfield", "nuts"], [0], out=tmp_path, serial=True, progress=False, **tiny)
    assert (first.num_tasks, first.num_skipped, first.num_done, first.num_failed) == (2, 0, 2, 0)
    rows = read_results(first.store)
    assert len(rows) == 2 and set(rows["status"]) == {"ok"} and rows["task_id"].is_unique
    assert (rows["mean_abs_error_sd"] > 0).all() and rows["num_gradient_evaluations"].gt(0).all()
    with SweepStore(first.store) as store:
        assert list(store.references()["model"]) == ["normal_normal"]  # one NUTS reference, shared
    again = sweep(["normal_normal"], ["meanfield", "nuts"], [0], out=tmp_path, serial=True, progress=False, **tiny)
    assert (again.num_skipped, again.num_done) == (2, 0)
    pd.testing.assert_frame_equal(read_results(again.store), rows)  # not rerun: not even its timestamps moved
    assert first.leaderboard.is_file() and (tmp_path / "leaderboard.csv").is_file()


def test_an_interrupted_sweep_resumes_and_ends_equal_to_an_uninterrupted_one(tmp_path, tiny, monkeypatch):
    grid = (["normal_normal"], ["meanfield", "nuts"], [0, 1])
    whole = sweep(*grid, out=tmp_path / "whole", serial=True, progress=False, leaderboard=False, **tiny)
    calls, run_task = [], runner.run_task

    def killed_after_two(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the driver dies here, as under Ctrl-C
        calls.append(args[0].id)
        return run_task(*args)

    monkeypatch.setattr(runner, "run_task", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        sweep(*grid, out=tmp_path / "resumed", serial=True, progress=False, leaderboard=False, **tiny)
    assert sorted(read_results(tmp_path / "resumed" / "results.sqlite")["task_id"]) == sorted(calls)
    monkeypatch.setattr(runner, "run_task", run_task)
    rerun = []
    monkeypatch.setattr(runner, "run_task", lambda *args: rerun.append(args[0].id) or run_task(*args))
    resumed = sweep(*grid, out=tmp_path / "resumed", serial=True, progress=False, leaderboard=False, **tiny)
    assert (resumed.num_skipped, resumed.num_done) == (2, 2) and not set(rerun) & set(calls)
    pd.testing.assert_frame_equal(numbers(read_results(resumed.store)), numbers(read_results(whole.store)))


def test_a_model_that_fails_is_recorded_with_its_error_and_the_others_finish(tmp_path, tiny, monkeypatch):
    (tmp_path / "broken_models.py").write_text("def problem():\n    raise RuntimeError('the data file is corrupt')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = sweep(
        ["broken_models:problem", "normal_normal"],
        ["meanfield"],
        [0, 1],
        out=tmp_path / "out",
        serial=True,
        progress=False,
        **{**tiny, "reference_options": {"num_samples": 20, "num_warmup": 20}},
    )
    assert (result.num_done, result.num_failed) == (2, 2)
    rows = read_results(result.store).set_index("model")
    failed = rows.loc["broken_models:problem"]
    assert list(failed["status"]) == ["failed", "failed"]
    assert failed["error"].str.contains("NUTS reference failed: RuntimeError: the data file is corrupt").all()
    assert "the data file is corrupt" in result.leaderboard.read_text()


def test_unknown_methods_and_models_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match=r"methods: expected names from .* got \['meanfeld'\]"):
        sweep(["normal_normal"], ["meanfeld"], out=tmp_path / "a", serial=True)
    with pytest.raises(ValueError, match="unknown model 'eigth_schools'"):
        sweep(["eigth_schools"], ["meanfield"], out=tmp_path / "b", serial=True)
    with pytest.raises(ValueError, match="sweep: expected models and methods"):
        sweep(out=tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_progress_in_a_log_is_status_lines_not_a_redrawn_bar(capsys):
    from vilab.inference.sweep.runner import _Progress

    progress = _Progress(total=4, skipped=1, enabled=True, dashboard="127.0.0.1:8265")
    progress.record("ok")
    progress.record("failed")
    progress.show(running=1)
    progress.close()
    err = capsys.readouterr().err
    assert "\r" not in err and "Ray dashboard at http://127.0.0.1:8265" in err
    assert err.strip().splitlines()[-1].startswith("sweep: 3/4 (75%)") and "done=1, failed=1, in_flight=1" in err
