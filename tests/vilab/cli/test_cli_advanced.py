"""``vilab gaps`` and ``vilab dmm`` parse, fail cleanly and (slow) run end to end."""

import argparse
import json

import pytest

from vilab.cli.advanced import add_advanced_commands


def _parser():
    parser = argparse.ArgumentParser(prog="vilab")
    add_advanced_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_commands_are_registered_with_their_options():
    args = _parser().parse_args(["gaps", "runs/x", "--refine-steps", "7"])
    assert args.refine_steps == 7 and args.run_dir == "runs/x" and callable(args.func)
    args = _parser().parse_args(["dmm", "--data", "pendulum", "--epochs", "2"])
    assert args.data == "pendulum" and args.epochs == 2


def test_gaps_on_a_directory_that_is_not_a_run_fails_with_a_message(tmp_path, capsys):
    args = _parser().parse_args(["gaps", str(tmp_path)])
    assert args.func(args) == 2
    assert "is not a vilab VAE run" in capsys.readouterr().err


@pytest.mark.slow
def test_dmm_command_trains_and_prints_scores(tmp_path, capsys):
    out = tmp_path / "dmm.safetensors"
    args = _parser().parse_args(
        ["dmm", "--data", "pendulum", "--epochs", "1", "--num-test", "10", "--iw-samples", "5", "--out", str(out)]
    )
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["test_log_likelihood"] >= printed["test_elbo"] - 50 and out.exists()


def test_dmm_out_naming_a_folder_is_refused_before_training(tmp_path, capsys, monkeypatch):
    import vilab.inference.vae.minibatch as minibatch

    monkeypatch.setattr(minibatch, "fit_minibatch", lambda *a, **k: pytest.fail("trained before checking --out"))
    args = _parser().parse_args(["dmm", "--data", "pendulum", "--out", str(tmp_path)])
    assert args.func(args) == 2
    assert (
        f"--out: expected a file name such as runs/dmm.safetensors; {str(tmp_path)!r} is a folder"
        in capsys.readouterr().err
    )
