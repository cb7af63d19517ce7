"""Progress output: a bar on a terminal only; in a log, a few short status lines."""

import io
import os

import pytest
import tqdm

import vilab.inference.common.progress as progress
from vilab.cli import main
from vilab.inference.common.progress import StatusLine, progress_bar


def test_a_status_line_prints_at_most_once_per_interval_and_once_at_the_end(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    stream = io.StringIO()
    line = StatusLine(range(10), desc="SVI meanfield", interval=20, stream=stream)
    for step in line:
        now[0] += 7  # each step takes 7 s
        line.set_postfix(elbo=-step)
    line.close()
    line.close()
    lines = stream.getvalue().splitlines()
    assert lines[-1] == "SVI meanfield: 10/10 (100%), 70 s, elbo=-9"
    assert len(lines) == 4  # at 21, 42 and 63 s, then the end


def test_a_bar_only_on_a_terminal_and_nothing_when_disabled(monkeypatch, capsys):
    monkeypatch.setattr(progress, "is_interactive", lambda: True)
    bar = progress_bar(total=3, desc="x")
    assert isinstance(bar, tqdm.tqdm)
    bar.close()
    capsys.readouterr()
    monkeypatch.setattr(progress, "is_interactive", lambda: False)
    bar = progress_bar(total=3, desc="x")
    assert isinstance(bar, StatusLine)
    quiet = progress_bar(range(3), desc="x", enabled=False)
    assert list(quiet) == [0, 1, 2]
    quiet.close()
    bar.close()
    assert capsys.readouterr().err == "x: 0/3 (0%), 0 s\n"


def test_fit_svi_writes_one_status_line_to_a_log(capfd):
    from vilab import fit_svi, get_model

    model, args, kwargs = get_model("normal_normal").load()
    fit_svi(model, "meanfield", *args, num_steps=100, early_stop=False, progress=True, **kwargs)
    err = capfd.readouterr().err
    assert err.startswith("SVI meanfield: 100/100 (100%), ") and err.count("\n") == 1, err[:500]


@pytest.mark.float32
def test_vae_training_into_a_log_writes_a_line_per_epoch_not_a_bar(tmp_path, capfd):
    out = str(tmp_path / "run")
    assert (
        main(
            [
                "vae",
                "train",
                "--data",
                "digits",
                "--latent",
                "2",
                "--hidden",
                "8",
                "--epochs",
                "2",
                "--max-train",
                "128",
                "--validation-size",
                "32",
                "--batch-size",
                "16",
                "--out",
                out,
            ]
        )
        == 0
    )
    captured = capfd.readouterr()
    status = [line for line in captured.err.splitlines() if line.startswith("epoch ")]
    assert [line.split(",")[0] for line in status] == ["epoch 1/2: 8/8 (100%)", "epoch 2/2: 8/8 (100%)"]
    assert "val/elbo=" in status[-1]
    assert len(captured.out) + len(captured.err) < 2000  # Lightning's bar wrote ~5 kB here
    assert os.path.exists(os.path.join(out, "model.safetensors"))
