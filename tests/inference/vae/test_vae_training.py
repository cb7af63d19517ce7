"""Lightning training: exact resume, NaN guard, DDP with two CPU processes, CLI smoke run."""

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import lightning.pytorch as pl
import pytest
import torch
from scipy import stats

from vilab.cli.vae import add_vae_commands
from vilab.datasets import load_digits, make_loader
from vilab.inference.vae.checkpoints import load_checkpoint
from vilab.inference.vae.objectives import ELBOLoss
from vilab.inference.vae.evaluation import elbo_split
from vilab.inference.vae.runs import load_run, read_metrics
from vilab.inference.vae.training import (
    NonFiniteLossError,
    TrainingConfig,
    TrainingInterrupted,
    fit_lightning,
    resolve_strategy,
    train_vae,
)
from vilab.models.vae.vae import VAEConfig, build_vae

pytestmark = pytest.mark.float32
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


@pytest.fixture(scope="module")
def digits():
    return load_digits().subset(num_train=96, num_validation=32, num_test=32)


def _vae(digits, guide="meanfield"):
    torch.manual_seed(0)
    return build_vae(
        VAEConfig(
            digits.image_shape,
            latent_dim=3,
            num_levels=17,
            guide=guide,
            num_flows=1,
            encoder_hidden=(16,),
            decoder_hidden=(16,),
        )
    )


def _config(epochs, **options):
    return TrainingConfig(max_epochs=epochs, batch_size=32, progress=False, **options)


def test_resume_reproduces_the_uninterrupted_run(digits, tmp_path):
    straight = _vae(digits, "iaf")
    train_vae(straight, digits, str(tmp_path / "a"), config=_config(2))
    interrupted = _vae(digits, "iaf")
    train_vae(interrupted, digits, str(tmp_path / "b"), config=_config(1))
    resumed = _vae(digits, "iaf")
    train_vae(resumed, digits, str(tmp_path / "b"), config=_config(2))
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)
    epochs = [row["epoch"] for row in read_metrics(str(tmp_path / "b")) if "val/elbo" in row]
    assert epochs == [0.0, 1.0]
    loaded, config = load_run(str(tmp_path / "b"))
    assert config["vae"]["guide"] == "iaf" and not loaded.training


class _RecordModes(pl.Callback):
    def __init__(self):
        self.modes = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes |= {module.training for module in pl_module.modules()}


def test_a_loaded_run_trains_on_in_training_mode(digits, tmp_path):
    train_vae(_vae(digits), digits, str(tmp_path / "a"), config=_config(1))
    loaded, _ = load_run(str(tmp_path / "a"))
    record = _RecordModes()
    train_vae(loaded, digits, str(tmp_path / "b"), config=_config(1), callbacks=[record])
    assert record.modes == {True}


class _WorseEveryEpoch(pl.Callback):
    """Report a validation ELBO that falls every epoch, so only the first epoch is ever 'best'."""

    def on_validation_end(self, trainer, pl_module):  # after Lightning has collected the epoch's metrics
        trainer.callback_metrics["val/elbo"] = torch.tensor(-float(trainer.current_epoch))


def test_last_checkpoint_is_the_last_epoch_even_when_validation_does_not_improve(digits, tmp_path):
    vae = _vae(digits)
    train_vae(vae, digits, str(tmp_path), config=_config(3), callbacks=[_WorseEveryEpoch()])
    checkpoints = tmp_path / "checkpoints"
    assert load_checkpoint(str(checkpoints / "best.ckpt"))["epoch"] == 0
    assert load_checkpoint(str(checkpoints / "last.ckpt"))["epoch"] == 2
    assert sorted(os.listdir(checkpoints)) == ["best.ckpt", "last.ckpt"]


def _learning_rates(run_dir):
    return [row["lr-Adam"] for row in read_metrics(run_dir) if "lr-Adam" in row]


def test_learning_rate_decays_on_a_plateau_and_a_resume_continues_the_schedule(digits, tmp_path):
    config = dict(learning_rate=1e-3, lr_decay=0.5, lr_patience=0)
    straight = _vae(digits)
    train_vae(straight, digits, str(tmp_path / "a"), config=_config(3, **config), callbacks=[_WorseEveryEpoch()])
    # Epoch 0 sets the best; each later epoch is worse, so with patience 0 each one halves
    # the rate of the next. The log holds the rate each epoch ran with.
    assert _learning_rates(str(tmp_path / "a")) == pytest.approx([1e-3, 1e-3, 5e-4])
    last = load_checkpoint(str(tmp_path / "a" / "checkpoints" / "last.ckpt"))
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(2.5e-4)
    interrupted = _vae(digits)
    train_vae(interrupted, digits, str(tmp_path / "b"), config=_config(2, **config), callbacks=[_WorseEveryEpoch()])
    resumed = _vae(digits)
    train_vae(resumed, digits, str(tmp_path / "b"), config=_config(3, **config), callbacks=[_WorseEveryEpoch()])
    assert _learning_rates(str(tmp_path / "b")) == _learning_rates(str(tmp_path / "a"))
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)


class _SlightlyWorseEveryEpoch(pl.Callback):
    """A negative bound that loses 0.001 nats an epoch: a plateau, not progress."""

    def on_validation_end(self, trainer, pl_module):
        trainer.callback_metrics["val/elbo"] = torch.tensor(-226.0 - 1e-3 * trainer.current_epoch)


def test_a_slightly_worse_negative_bound_is_no_progress(digits, tmp_path):
    train_vae(
        _vae(digits),
        digits,
        str(tmp_path),
        config=_config(3, learning_rate=1e-3, lr_decay=0.5, lr_patience=0),
        callbacks=[_SlightlyWorseEveryEpoch()],
    )
    assert _learning_rates(str(tmp_path)) == pytest.approx([1e-3, 1e-3, 5e-4])


def test_a_bad_learning_rate_schedule_is_a_clear_error(digits, tmp_path):
    with pytest.raises(ValueError, match=r"lr_decay: expected a factor in \(0, 1\); got 1.5"):
        train_vae(_vae(digits), digits, str(tmp_path / "a"), config=_config(1, lr_decay=1.5))
    with pytest.raises(ValueError, match="lr_patience: expected a non-negative integer; got -1"):
        train_vae(_vae(digits), digits, str(tmp_path / "b"), config=_config(1, lr_decay=0.5, lr_patience=-1))
    vae = _vae(digits)
    loss = ELBOLoss()
    loader = make_loader(digits.train, batch_size=32)
    with pytest.raises(ValueError, match="lr_decay: the plateau schedule watches the validation"):
        fit_lightning(vae.model, vae.guide, loss, loader, None, str(tmp_path / "c"), config=_config(1, lr_decay=0.5))


class _ELBOFallsBoundRises(pl.Callback):
    """IWAE training's usual course: the ELBO loosens while the k-sample bound tightens."""

    def on_validation_end(self, trainer, pl_module):
        trainer.callback_metrics["val/elbo"] = torch.tensor(-float(trainer.current_epoch))
        trainer.callback_metrics["val/iwae"] = torch.tensor(float(trainer.current_epoch))


def test_iwae_training_keeps_the_best_validation_bound_not_the_best_elbo(digits, tmp_path):
    vae = _vae(digits)
    train_vae(
        vae,
        digits,
        str(tmp_path),
        config=_config(3, objective="iwae", iwae_samples=3),
        callbacks=[_ELBOFallsBoundRises()],
    )
    assert load_checkpoint(str(tmp_path / "checkpoints" / "best.ckpt"))["epoch"] == 2
    logged = [row for row in read_metrics(str(tmp_path)) if "val/iwae" in row]
    assert len(logged) == 3 and all(math.isfinite(row["val/iwae"]) for row in logged)


class _NaNAfter(ELBOLoss):
    def __init__(self, step):
        super().__init__()
        self.bad_step = step

    def __call__(self, model, guide, x, *, step=0):
        output = super().__call__(model, guide, x, step=step)
        return output if step < self.bad_step else output._replace(loss=output.loss * float("nan"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(digits, tmp_path):
    vae = _vae(digits)
    loader = make_loader(digits.train, batch_size=32)  # 3 batches per epoch
    val = make_loader(digits.validation, batch_size=32)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, batch 1 \(global step 4\)"):
        fit_lightning(vae.model, vae.guide, _NaNAfter(4), loader, val, str(tmp_path), config=_config(3))
    checkpoint = load_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt"))
    assert checkpoint["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


class _SignalInGuide(torch.nn.Module):
    """The guide, but the ``call``-th call sends SIGTERM to this process from inside it."""

    def __init__(self, guide, call):
        super().__init__()
        self.guide, self.call, self.calls = guide, call, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.call:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs inside Pyro's trace
        return self.guide(*args, **kwargs)


def test_sigterm_inside_the_guide_stops_training_at_the_last_finished_epoch(digits, tmp_path):
    vae = _vae(digits)
    loader = make_loader(digits.train, batch_size=32)  # 3 batches per epoch
    val = make_loader(digits.validation, batch_size=32)
    # 4 guide calls an epoch (3 training batches, 1 validation): call 6 is epoch 1's 2nd step.
    guide = _SignalInGuide(vae.guide, call=6)
    with pytest.raises(TrainingInterrupted, match="SIGTERM at epoch 1") as stopped:
        fit_lightning(vae.model, guide, ELBOLoss(), loader, val, str(tmp_path), config=_config(3))
    assert stopped.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert load_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt"))["global_step"] == 3


def test_a_stopped_run_is_finished_from_its_best_checkpoint(digits, tmp_path, capsys):
    from vilab.inference.vae.runs import finish_run

    out = str(tmp_path / "run")
    train_vae(_vae(digits), digits, out, config=_config(2))
    trained = {name: value.clone() for name, value in load_run(out)[0].state_dict().items()}
    os.remove(os.path.join(out, "model.safetensors"))  # as after SIGTERM
    args = _parser().parse_args(["vae", "evaluate", out, "--no-figures"])
    assert args.func(args) == 2
    assert "vilab vae finish" in capsys.readouterr().err
    args = _parser().parse_args(["vae", "finish", out])
    assert args.func(args) == 0
    finished = load_run(out)[0].state_dict()
    assert all(torch.equal(finished[name], value) for name, value in trained.items())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        shutil.rmtree(os.path.join(out, "checkpoints"))
        finish_run(out)
    with pytest.raises(FileNotFoundError, match="config.json"):
        finish_run(str(tmp_path))


def test_training_refuses_data_of_another_shape(digits, tmp_path):
    vae = build_vae(VAEConfig((1, 28, 28), latent_dim=2))
    with pytest.raises(ValueError, match=r"expects images \(1, 28, 28\)"):
        train_vae(vae, digits, str(tmp_path), config=_config(1))


def _parser():
    parser = argparse.ArgumentParser(prog="vilab")
    add_vae_commands(parser.add_subparsers(dest="command"))
    return parser


def test_cli_trains_evaluates_and_writes_metrics_and_figures(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = _parser().parse_args(
        [
            "vae",
            "train",
            "--data",
            "digits",
            "--latent",
            "2",
            "--guide",
            "meanfield",
            "--hidden-layer",
            "gated",
            "--hidden",
            "24,12",
            "--epochs",
            "1",
            "--max-train",
            "64",
            "--validation-size",
            "100",
            "--batch-size",
            "32",
            "--out",
            out,
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    assert json.load(open(os.path.join(out, "config.json")))["validation_size"] == 100
    args = _parser().parse_args(["vae", "evaluate", out, "--iw-samples", "10", "--max-test", "40"])
    assert args.func(args) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["log_likelihood"] < 0 and metrics["iw_samples"] == 10
    saved = json.load(open(os.path.join(out, "config.json")))["vae"]
    assert (
        saved["hidden_layer"] == "gated" and saved["encoder_hidden"] == [24, 12] and saved["decoder_hidden"] == [12, 24]
    )
    assert sorted(os.listdir(os.path.join(out, "figures"))) == [
        "elbo_curves.png",
        "latent_scatter.png",
        "latent_traversals.png",
        "prior_samples.png",
        "reconstructions.png",
    ]
    report = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert report.count("data:image/png;base64,") == 5


def test_cli_trains_and_evaluates_a_two_level_vae(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = _parser().parse_args(
        [
            "vae",
            "train",
            "--data",
            "digits",
            "--latent",
            "2",
            "--latent-levels",
            "2",
            "--prior",
            "vamp",
            "--components",
            "4",
            "--hidden",
            "16",
            "--epochs",
            "1",
            "--max-train",
            "64",
            "--batch-size",
            "32",
            "--out",
            out,
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    args = _parser().parse_args(["vae", "evaluate", out, "--iw-samples", "10", "--max-test", "40"])
    assert args.func(args) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["latent_dim"] == 4 and metrics["kl_per_dim"] is None
    assert metrics["log_likelihood"] >= metrics["elbo"] - 3 * metrics["elbo_stderr"]
    assert len(os.listdir(os.path.join(out, "figures"))) == 5
    args = _parser().parse_args(
        ["vae", "train", "--data", "digits", "--latent-levels", "2", "--guide", "iaf", "--out", str(tmp_path / "bad")]
    )
    assert args.func(args) == 2
    args = _parser().parse_args(["vae", "train", "--data", "digits", "--lr-decay", "2", "--out", str(tmp_path / "bad")])
    assert args.func(args) == 2
    errors = capsys.readouterr().err
    assert "--guide: the two-level VAE (--latent-levels=2) has a mean-field guide only" in errors
    assert "--lr-decay: expected a factor in (0, 1); got 2.0" in errors
    assert not os.path.exists(tmp_path / "bad")  # refused before anything was written


def test_cli_reports_bad_input(tmp_path, capsys):
    args = _parser().parse_args(["vae", "train", "--data", "digits", "--guide", "maf", "--out", str(tmp_path)])
    assert args.func(args) == 2
    args = _parser().parse_args(["vae", "train", "--data", "cifar", "--out", str(tmp_path)])
    assert args.func(args) == 2
    args = _parser().parse_args(["vae", "evaluate", str(tmp_path / "missing")])
    assert args.func(args) == 2
    args = _parser().parse_args(["vae", "train", "--data", "digits", "--hidden", "300,x", "--out", str(tmp_path)])
    assert args.func(args) == 2
    args = _parser().parse_args(
        ["vae", "train", "--data", "digits", "--validation-size", "0", "--out", str(tmp_path / "bad")]
    )
    assert args.func(args) == 2
    errors = capsys.readouterr().err
    assert "--validation-size: expected 0 < validation_size < 1500" in errors and "got 0" in errors
    assert not os.path.exists(tmp_path / "bad")
    assert "--guide: expected one of" in errors and "data: expected one of" in errors
    assert "--hidden: expected comma-separated positive widths such as 300,300; got '300,x'" in errors
    assert "is not a vilab VAE run" in errors


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for a machine without CUDA")
def test_cli_refuses_a_gpu_it_does_not_have(tmp_path, capsys):
    args = _parser().parse_args(["vae", "train", "--data", "digits", "--accelerator", "gpu", "--out", str(tmp_path)])
    assert args.func(args) == 2
    args = _parser().parse_args(["vae", "evaluate", str(tmp_path), "--device", "cuda"])
    assert args.func(args) == 2
    errors = capsys.readouterr().err
    assert "--accelerator: expected a CUDA device for 'gpu'" in errors
    assert "--device: expected a CUDA device for 'cuda'" in errors
    assert not os.listdir(tmp_path)  # refused before anything was written


def test_deterministic_gpu_training_fixes_the_cublas_workspace(monkeypatch):
    from vilab.inference.vae.training import fix_cublas_workspace

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    fix_cublas_workspace()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    fix_cublas_workspace()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # a user's choice stays


def test_multi_device_cpu_training_defaults_to_ddp_spawn():
    assert resolve_strategy(1) == "auto" and resolve_strategy(2) == "ddp_spawn"
    assert resolve_strategy(2, "ddp_fork") == "ddp_fork"
    with pytest.raises(ValueError, match="devices: expected a positive integer; got 0"):
        resolve_strategy(0)


@pytest.fixture(scope="module")
def ddp_digits():
    # 192 = 6 batches of 32: one process with batch 32 and two with batch 16 each (the
    # DistributedSampler gives each 96 images) take the same 6 steps of 32 images per epoch.
    return load_digits().subset(num_train=192, num_validation=100)


def _small_vae(data):
    torch.manual_seed(0)  # the same initial weights for every run
    return build_vae(
        VAEConfig(data.image_shape, latent_dim=3, num_levels=17, encoder_hidden=(16,), decoder_hidden=(16,))
    )


def _validation(vae, data):
    torch.manual_seed(123)  # the same evaluation noise for every model
    return elbo_split(vae, make_loader(data.validation, batch_size=100), num_samples=20)


def _train(data, out, *, devices, seed, strategy="auto"):
    vae = _small_vae(data)
    config = TrainingConfig(
        max_epochs=10,
        batch_size=32 // devices,
        learning_rate=1e-2,
        seed=seed,
        devices=devices,
        strategy=strategy,
        progress=False,
    )
    train_vae(vae, data, out, config=config)
    return vae


DDP_FAILURE_BUDGET = 1e-3
SINGLE_PROCESS_RUNS = 6


def test_a_two_process_run_trains_and_keeps_one_rng_stream_per_process(ddp_digits, tmp_path):
    untrained = _validation(_small_vae(ddp_digits), ddp_digits)
    vae = _train(ddp_digits, str(tmp_path), devices=2, seed=0, strategy="ddp_fork")
    gain = _validation(vae, ddp_digits).per_example - untrained.per_example
    z = stats.norm.isf(DDP_FAILURE_BUDGET / 2)
    assert gain.mean() > z * gain.std() / math.sqrt(len(gain))
    streams = load_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt"))["vilab_rng_state_per_rank"]
    assert len(streams) == 2 and not torch.equal(streams[0]["torch"], streams[1]["torch"])
    # The weights that came back to this process are the ones rank 0 saved.
    loaded, config = load_run(str(tmp_path))
    assert config["training"]["devices"] == 2
    for name, value in vae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp_fork", "ddp_spawn"])
def test_ddp_with_two_cpu_processes_trains_like_one(ddp_digits, tmp_path, strategy):
    """Two gloo processes with batch 16 each are one process with batch 32, up to the seed.

    Same initial weights, steps and images per step, so the 2-process run's validation ELBO
    should be one more draw from the distribution of 1-process runs over seeds (data order,
    reparameterization noise). The check is the t prediction interval for one new draw from
    ``SINGLE_PROCESS_RUNS`` seeds, at a 1e-3 failure budget; before that, each kind of run
    must beat the untrained model by more than the paired standard error allows by chance.
    """
    untrained = _validation(_small_vae(ddp_digits), ddp_digits)
    single = [
        _validation(_train(ddp_digits, str(tmp_path / f"one-{seed}"), devices=1, seed=seed), ddp_digits)
        for seed in range(1, 1 + SINGLE_PROCESS_RUNS)
    ]
    ddp = _validation(_train(ddp_digits, str(tmp_path / "two"), devices=2, seed=0, strategy=strategy), ddp_digits)
    z = stats.norm.isf(DDP_FAILURE_BUDGET / 2)
    for run in (single[0], ddp):
        gain = run.per_example - untrained.per_example
        assert gain.mean() > z * gain.std() / math.sqrt(len(gain))
    elbos = [run.elbo for run in single]
    n, spread = len(elbos), statistics.stdev(elbos)
    t = stats.t.isf(DDP_FAILURE_BUDGET / 2, n - 1)
    assert abs(ddp.elbo - statistics.mean(elbos)) < t * spread * math.sqrt(1 + 1 / n)


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(child) for child in handle.read().split()]


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_stops_a_ddp_run_at_once_and_the_rerun_resumes_exactly(tmp_path):
    def command(out, epochs):
        return [
            sys.executable,
            "-m",
            "vilab.cli.main",
            "vae",
            "train",
            "--data",
            "digits",
            "--latent",
            "3",
            "--guide",
            "iaf",
            "--flows",
            "1",
            "--epochs",
            str(epochs),
            "--max-train",
            "384",
            "--batch-size",
            "16",
            "--devices",
            "2",
            "--strategy",
            "ddp_fork",
            "--no-progress",
            "--out",
            str(out),
        ]

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        command(killed, 200), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert last.exists(), process.stderr.read()[-3000:] if process.poll() is not None else "no checkpoint"
    workers = _children(process.pid)
    process.send_signal(signal.SIGTERM)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, errors[-3000:]
    assert "rerun the same command to resume" in errors
    time.sleep(1)
    assert workers and not any(_alive(pid) for pid in workers)
    stopped_at = load_checkpoint(str(last))["epoch"]
    assert stopped_at < 199
    # Rerun to stopped_at + 2 epochs, and compare with a run that was never interrupted.
    epochs = stopped_at + 2
    for out in (killed, tmp_path / "straight"):
        finished = subprocess.run(command(out, epochs), cwd=REPO, capture_output=True, text=True, timeout=300)
        assert finished.returncode == 0, finished.stderr[-3000:]
    resumed, _ = load_run(str(killed))
    straight, _ = load_run(str(tmp_path / "straight"))
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)
