"""The vilab command line: list, compare (registry and posteriordb), and its errors."""

import json
import os
import shutil

import pytest

from vilab.cli import main


def test_list_shows_models_posteriordb_problems_and_guides(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("eight_schools", "normal_normal", "kidiq-kidscore_momiq", "meanfield", "sylvester", "nsf"):
        assert name in out


def test_compare_writes_a_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "compare",
            "normal_normal",
            "--guides",
            "meanfield,planar",
            "--steps",
            "100",
            "--draws",
            "100",
            "--samples",
            "100",
            "--warmup",
            "100",
            "--chains",
            "2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {row["method"] for row in metrics["summary"]} == {"nuts", "meanfield", "planar"}
    assert (out / "nuts.nc").exists() and (out / "report.md").exists()
    assert "wrote" in capsys.readouterr().out


def test_compare_posteriordb_scores_guides_against_the_reference(tmp_path, posteriordb_path):
    out = tmp_path / "pdb"
    code = main(
        [
            "compare",
            "--posteriordb",
            posteriordb_path,
            "kidiq-kidscore_momiq",
            "--guides",
            "fullrank",
            "--steps",
            "300",
            "--draws",
            "200",
            "--no-nuts",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reference"] == "reference draws"
    assert {row["parameter"] for row in metrics["table"]} == {"beta[1]", "beta[2]", "sigma"}
    assert {row["method"] for row in metrics["table"]} == {"fullrank"}


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    assert main(["compare", "no_such_model", "--out", str(tmp_path)]) == 2
    assert "unknown model 'no_such_model'; known models:" in capsys.readouterr().err


def test_unknown_posteriordb_problem_is_a_clear_error(tmp_path, capsys, posteriordb_path):
    assert main(["compare", "--posteriordb", posteriordb_path, "nope", "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_missing_subcommand_exits_with_usage():
    with pytest.raises(SystemExit):
        main([])


# --- user errors and --out: refused before any fitting, one line in the CLI's flags ---------

_TINY = [
    "--guides",
    "meanfield",
    "--steps",
    "20",
    "--draws",
    "20",
    "--samples",
    "20",
    "--warmup",
    "20",
    "--chains",
    "1",
    "--quiet",
]


@pytest.fixture
def no_nuts(monkeypatch):
    """Make NUTS fail the test if it is reached: the checks under test must come first."""
    import importlib

    compare_module = importlib.import_module("vilab.inference.comparison.api")  # the package re-exports the function

    def refuse(*args, **kwargs):
        raise AssertionError("NUTS ran before the input was checked")

    monkeypatch.setattr(compare_module, "run_nuts", refuse)


def test_a_bad_option_is_one_line_in_the_cli_s_flags_not_a_traceback(tmp_path, capsys):
    args = ["compare", "normal_normal", *_TINY[:-3], "--chains", "0", "--out", str(tmp_path / "r")]
    assert main(args) == 2
    assert capsys.readouterr().err == "vilab: error: --chains: expected an int >= 1; got 0\n"
    with pytest.raises(ValueError, match="num_chains: expected an int >= 1"):
        main(["--debug", *args])


def test_a_misspelled_guide_is_refused_before_nuts_runs(tmp_path, capsys, no_nuts):
    out = tmp_path / "r"
    assert main(["compare", "normal_normal", *_TINY, "--guides", "meanfield,fulrank", "--out", str(out)]) == 2
    assert "vilab: error: --guides: expected comma-separated names among meanfield, fullrank" in capsys.readouterr().err
    assert not out.exists()


def test_out_naming_a_file_or_a_foreign_folder_is_refused_before_nuts_runs(tmp_path, capsys, no_nuts):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["compare", "normal_normal", *_TINY, "--out", str(tmp_path / "notes.txt")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["compare", "normal_normal", *_TINY, "--out", str(tmp_path)]) == 2
    assert "holds files that are not a comparison report (notes.txt)" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine" and os.listdir(tmp_path) == ["notes.txt"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """A tiny comparison written to a fresh --out, and its arguments."""
    out = tmp_path_factory.mktemp("compared") / "run"
    args = ["compare", "normal_normal", *_TINY, "--out", str(out)]
    assert main(args) == 0
    return out, args


def test_another_comparison_is_refused_in_a_folder_holding_a_report(compared, capsys, no_nuts):
    out, args = compared
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert main([*args, "--steps", "60"]) == 2
    assert (
        "holds the report of another comparison (--steps 20 -> 60); choose another --out, or add "
        "--force" in capsys.readouterr().err
    )
    assert main(["compare", "eight_schools", *args[2:]]) == 2
    assert "model 'normal_normal' -> 'eight_schools'" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_force_replaces_the_report_of_another_comparison_whole(compared, tmp_path, capsys):
    out, args = compared
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    assert main([*args[:-1], str(copy), "--guides", "fullrank", "--force"]) == 0
    assert "--force: replacing the report" in capsys.readouterr().err
    assert (copy / "fullrank.nc").exists() and not (copy / "meanfield.nc").exists()  # nothing mixed
    settings = json.loads((copy / "run.json").read_text())["settings"]
    assert settings["guides"] == ["fullrank"] and settings["model"] == "normal_normal"
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no temporary left


def test_a_rerun_of_the_same_comparison_may_replace_it_and_an_interrupted_one_leaves_it_whole(
    compared, capsys, monkeypatch
):
    import importlib

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("vilab.inference.comparison.api"), "run_nuts", interrupted)
    out, args = compared
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert main(args) == 130
    assert capsys.readouterr().err == (
        f"vilab compare: {out} holds the report of this same comparison; "
        "it is replaced when this one is done\nvilab: interrupted\n"
    )
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert not [name for name in os.listdir(out.parent) if name.startswith(".")]


def test_ctrl_c_is_a_line_and_status_130_and_leaves_no_half_report(tmp_path, capsys, monkeypatch):
    import importlib

    compare_module = importlib.import_module("vilab.inference.comparison.api")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_module, "run_nuts", interrupted)
    assert main(["compare", "normal_normal", *_TINY, "--out", str(tmp_path / "r")]) == 130
    assert capsys.readouterr().err == "vilab: interrupted\n" and os.listdir(tmp_path) == []


def test_compare_runs_dadvi_on_a_ported_posteriordb_problem(tmp_path):
    ported = os.path.join(os.path.dirname(__file__), "..", "..", "data", "posteriordb")
    out = tmp_path / "dadvi"
    code = main(
        [
            "compare",
            "--posteriordb",
            ported,
            "kidiq-kidscore_momhsiq",
            "--guides",
            "dadvi",
            "--draws",
            "200",
            "--no-nuts",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {row["parameter"] for row in metrics["table"]} == {"beta[1]", "beta[2]", "beta[3]", "sigma"}
    # A smoke test of the column: the benchmark measures 0.99-1.01 here, and the reference sd from
    # 1000 thinned draws has about 2% error.
    assert all(0.8 < row["lrvb_sd_ratio"] < 1.25 for row in metrics["table"])
