"""``vilab sweep``: a tiny serial sweep, its resume, the leaderboard alone, and clear errors."""

from vilab.cli import main

TINY = ["--steps", "60", "--draws", "50", "--quiet", "--serial"]


def test_sweep_runs_resumes_and_rewrites_the_leaderboard(tmp_path, capsys, posteriordb_path):
    command = [
        "sweep",
        "--posteriordb",
        str(posteriordb_path),
        "--models",
        "posteriordb/kidiq-kidscore_momiq",
        "--methods",
        "meanfield",
        "--seeds",
        "0",
        "--out",
        str(tmp_path),
        *TINY,
    ]
    assert main(command) == 0
    assert "1 tasks: 0 found finished, 1 done now, 0 failed" in capsys.readouterr().out
    assert main(command) == 0
    assert "1 tasks: 1 found finished, 0 done now, 0 failed" in capsys.readouterr().out
    (tmp_path / "leaderboard.html").unlink()
    assert main(["sweep", "--out", str(tmp_path), "--leaderboard-only"]) == 0
    assert (tmp_path / "leaderboard.html").is_file() and (tmp_path / "leaderboard.csv").is_file()


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    assert main(["sweep", "--models", "normal_normal", "--methods", "meanfeld", "--out", str(tmp_path)]) == 2
    assert "vilab sweep: methods: expected names from" in capsys.readouterr().err
    assert main(["sweep", "--methods", "meanfield", "--out", str(tmp_path)]) == 2
    assert "expected --models and --methods, or --config" in capsys.readouterr().err
    assert main(["sweep", "--out", str(tmp_path / "none"), "--leaderboard-only"]) == 2
    assert "expected a sweep results file" in capsys.readouterr().err


def test_sweep_is_part_of_the_public_api():
    import vilab
    from vilab.inference.sweep import sweep

    assert "sweep" in vilab.__all__ and vilab.sweep is sweep
