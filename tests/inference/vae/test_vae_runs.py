"""VAE run folders: a run with other settings is refused before anything is written, a fresh
start moves the old run aside, and a run killed with SIGKILL resumes with no duplicated log rows."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from vilab.datasets import load_digits
from vilab.inference.vae.runs import load_run, read_metrics
from vilab.inference.vae.training import TrainingConfig, train_vae
from vilab.models.vae.vae import VAEConfig, build_vae
from vilab.run_folders import RunFolderError

pytestmark = pytest.mark.float32
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


@pytest.fixture(scope="module")
def digits():
    return load_digits().subset(num_train=96, num_validation=32, num_test=32)


def _vae(digits, latent=3):
    torch.manual_seed(0)
    return build_vae(
        VAEConfig(digits.image_shape, latent_dim=latent, num_levels=17, encoder_hidden=(16,), decoder_hidden=(16,))
    )


def _config(epochs, **options):
    return TrainingConfig(max_epochs=epochs, **{"batch_size": 32, "progress": False, **options})


@pytest.fixture
def trained(digits, tmp_path):
    """A one-epoch run (not a copy: Lightning's checkpoints record their folder)."""
    out = str(tmp_path / "run")
    train_vae(_vae(digits), digits, out, config=_config(1))
    return out


def _snapshot(out):
    return {name: open(os.path.join(out, name), "rb").read() for name in ("config.json", "model.safetensors")}


def test_another_latent_size_is_refused_before_config_json_is_touched(digits, trained, tmp_path):
    out = trained
    before = _snapshot(out)
    with pytest.raises(RunFolderError, match=r"vae\.latent_dim 3 -> 4") as error:
        train_vae(_vae(digits, latent=4), digits, out, config=_config(2))
    assert error.value.differences == {"vae.latent_dim": (3, 4)}
    assert _snapshot(out) == before
    vae, config = load_run(out)  # the run can still be evaluated
    assert config["vae"]["latent_dim"] == 3


def test_another_learning_rate_is_refused_not_recorded_as_if_used(digits, trained, tmp_path):
    out = trained
    before = _snapshot(out)
    with pytest.raises(RunFolderError, match=r"training\.learning_rate 0\.001 -> 0\.01.*resume=False"):
        train_vae(_vae(digits), digits, out, config=_config(2, learning_rate=1e-2))
    assert _snapshot(out) == before


def test_more_epochs_resume_and_the_change_is_recorded(digits, trained, tmp_path):
    out = trained
    train_vae(_vae(digits), digits, out, config=_config(2, patience=3))
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["training"]["max_epochs"] == 2
    assert config["resumes"] == [{"training.max_epochs": [1, 2], "training.patience": [None, 3]}]
    epochs = [row["epoch"] for row in read_metrics(out) if "val/elbo" in row]
    assert epochs == [0.0, 1.0]  # resumed, not restarted


def test_a_fresh_start_moves_the_old_run_aside(digits, trained, tmp_path):
    out = trained
    before = _snapshot(out)
    with pytest.warns(UserWarning, match=r"moved to .*run\.old-1"):
        train_vae(_vae(digits, latent=2), digits, out, config=_config(1), resume=False)
    assert _snapshot(out + ".old-1") == before
    assert json.load(open(os.path.join(out, "config.json")))["vae"]["latent_dim"] == 2
    assert len([row for row in read_metrics(out) if "val/elbo" in row]) == 1


@pytest.mark.parametrize("kind", ["file", "foreign folder"])
def test_out_dir_that_is_a_file_or_holds_other_files_is_refused_before_training(digits, tmp_path, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("notes")
        match = "is a file"
    else:
        out.mkdir()
        (out / "notes.txt").write_text("notes")
        match = "holds files but no VAE run"
    with pytest.raises(RunFolderError, match=match):
        train_vae(_vae(digits), digits, str(out), config=_config(1))
    assert sorted(os.listdir(tmp_path)) == ["out"] and (kind == "file" or os.listdir(out) == ["notes.txt"])


# Trains 96 digits in batches of 8 (12 steps per epoch, a CSV row every 10 steps) and kills
# itself with SIGKILL in the second epoch, after the CSV logger flushed a row of that epoch.
_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import torch
    from lightning.pytorch.callbacks import Callback
    from vilab.datasets import load_digits
    from vilab.inference.vae.training import TrainingConfig, train_vae
    from vilab.models.vae.vae import VAEConfig, build_vae

    class KillAfterFlush(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 22:
                for logger in trainer.loggers:
                    logger.save()
                os.kill(os.getpid(), signal.SIGKILL)

    digits = load_digits().subset(num_train=96, num_validation=32, num_test=32)
    torch.manual_seed(0)
    vae = build_vae(VAEConfig(digits.image_shape, latent_dim=3, num_levels=17,
                              encoder_hidden=(16,), decoder_hidden=(16,)))
    train_vae(vae, digits, sys.argv[1], config=TrainingConfig(max_epochs=2, batch_size=8, progress=False),
              callbacks=[KillAfterFlush()])
""")


def _assert_resumes_without_duplicates(digits, out):
    steps_before = [row["step"] for row in read_metrics(out) if "train/loss_step" in row]
    assert steps_before == [9.0, 19.0]  # step 19 belongs to the killed epoch
    train_vae(_vae(digits), digits, out, config=_config(2, batch_size=8))
    rows = read_metrics(out)
    logged = Counter((row["step"], key) for row in rows for key in row if key not in ("step", "epoch"))
    assert max(logged.values()) == 1, [key for key, count in logged.items() if count > 1]
    assert [row["step"] for row in rows if "train/loss_step" in row] == [9.0, 19.0]
    assert [row["epoch"] for row in rows if "val/elbo" in row] == [0.0, 1.0]


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_without_duplicated_log_rows(digits, tmp_path):
    out = str(tmp_path / "killed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, out], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    _assert_resumes_without_duplicates(digits, out)


class _Crash(Exception):
    """Stands in for SIGKILL: the process stops mid-epoch, after the CSV logger wrote a row."""


class _CrashAfterFlush(Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 22:
            for logger in trainer.loggers:
                logger.save()
            raise _Crash


def test_a_run_that_crashed_mid_epoch_resumes_without_duplicated_log_rows(digits, tmp_path):
    """The on-disk state of the SIGKILL above (rows past the last checkpoint), made in-process."""
    out = str(tmp_path / "crashed")
    with pytest.raises(_Crash):
        train_vae(_vae(digits), digits, out, config=_config(2, batch_size=8), callbacks=[_CrashAfterFlush()])
    _assert_resumes_without_duplicates(digits, out)


def test_the_cli_names_differing_settings_by_flag_and_fresh_moves_the_run_aside(tmp_path, capsys):
    from vilab.cli import main

    out = str(tmp_path / "run")
    train = [
        "vae",
        "train",
        "--data",
        "digits",
        "--hidden",
        "8",
        "--epochs",
        "1",
        "--max-train",
        "64",
        "--validation-size",
        "32",
        "--batch-size",
        "32",
        "--no-progress",
        "--out",
        out,
    ]
    assert main([*train, "--latent", "2"]) == 0
    before = _snapshot(out)
    assert main([*train, "--latent", "3", "--lr", "0.01"]) == 2
    error = capsys.readouterr().err
    assert "holds a run trained with other settings: --lr 0.001 -> 0.01, --latent 2 -> 3; " in error
    assert "add --fresh to start over" in error and "Traceback" not in error
    assert _snapshot(out) == before
    assert main([*train, "--latent", "3", "--fresh"]) == 0
    assert f"--fresh: moved the run in {out} to {out}.old-1" in capsys.readouterr().err
    assert _snapshot(out + ".old-1") == before
    assert json.load(open(os.path.join(out, "config.json")))["vae"]["latent_dim"] == 3


def test_a_moved_run_resumes_from_its_own_best_checkpoint(digits, tmp_path):
    """A moved run folder reads its own best.ckpt, not the one at the old path, and keeps its
    best score: a resumed epoch replaces best.ckpt only when it beats the run's best bound."""
    import shutil

    from vilab.inference.vae.checkpoints import load_checkpoint

    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    train_vae(_vae(digits), digits, old, config=_config(2))
    shutil.move(old, new)
    result = train_vae(_vae(digits), digits, new, config=_config(2))  # no epoch left to train
    assert result.best_checkpoint == os.path.join(os.path.realpath(new), "checkpoints", "best.ckpt")
    assert load_run(new)[0] is not None
    train_vae(_vae(digits), digits, new, config=_config(3))
    last = load_checkpoint(os.path.join(new, "checkpoints", "last.ckpt"))
    (state,) = [s for key, s in last["callbacks"].items() if "val/elbo" in key]
    assert not os.path.isabs(state["best_model_path"])
    bounds = [row["val/elbo"] for row in read_metrics(new) if "val/elbo" in row]
    assert len(bounds) == 3 and float(state["best_model_score"]) == pytest.approx(max(bounds), rel=1e-6)


def _tensorboard_steps(out):
    """Steps of each TensorBoard scalar as TensorBoard shows them (after its own purging)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "logs", "tensorboard")).Reload()
    return {tag: [event.step for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_crashed_run_resumes_without_duplicated_tensorboard_steps(digits, tmp_path):
    pytest.importorskip("tensorboard")
    out = str(tmp_path / "crashed")
    with pytest.raises(_Crash):
        train_vae(_vae(digits), digits, out, config=_config(2, batch_size=8), callbacks=[_CrashAfterFlush()])
    assert 19 in _tensorboard_steps(out)["train/loss_step"]  # a step past the last checkpoint (12)
    train_vae(_vae(digits), digits, out, config=_config(2, batch_size=8))
    uninterrupted = str(tmp_path / "uninterrupted")
    train_vae(_vae(digits), digits, uninterrupted, config=_config(2, batch_size=8))
    # Lightning logs "epoch" twice at an epoch's last step (with the training and the
    # validation metrics): the resumed log must match an uninterrupted run's, tag by tag.
    assert _tensorboard_steps(out) == _tensorboard_steps(uninterrupted)
    assert _tensorboard_steps(out)["train/loss_step"] == [9, 19]
