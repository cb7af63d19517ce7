"""Lightning training: exact resume, NaN guard, DDP with two CPU processes, CLI smoke run."""
import argparse
import json
import os

import pytest
import torch

from vilab.cli_vae import add_vae_commands
from vilab.datasets import load_digits, make_loader
from vilab.inference.checkpoints import load_checkpoint
from vilab.inference.objectives import ELBOLoss
from vilab.inference.vae_training import (NonFiniteLossError, TrainingConfig, fit_lightning,
                                          load_run, read_metrics, train_vae)
from vilab.models.vae import VAEConfig, build_vae

pytestmark = pytest.mark.float32


@pytest.fixture(scope="module")
def digits():
    return load_digits().subset(num_train=96, num_validation=32, num_test=32)


def _vae(digits, guide="meanfield"):
    torch.manual_seed(0)
    return build_vae(VAEConfig(digits.image_shape, latent_dim=3, num_levels=17, guide=guide,
                               num_flows=1, encoder_hidden=(16,), decoder_hidden=(16,)))


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
        fit_lightning(vae.model, vae.guide, _NaNAfter(4), loader, val, str(tmp_path),
                      config=_config(3))
    checkpoint = load_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt"))
    assert checkpoint["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


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
    args = _parser().parse_args(["vae", "train", "--data", "digits", "--latent", "2",
                                 "--guide", "meanfield", "--epochs", "1",
                                 "--max-train", "64", "--batch-size", "32", "--out", out,
                                 "--no-progress"])
    assert args.func(args) == 0
    args = _parser().parse_args(["vae", "evaluate", out, "--iw-samples", "10", "--max-test", "40"])
    assert args.func(args) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["log_likelihood"] < 0 and metrics["iw_samples"] == 10
    assert sorted(os.listdir(os.path.join(out, "figures"))) == [
        "elbo_curves.png", "latent_scatter.png", "latent_traversals.png", "prior_samples.png",
        "reconstructions.png"]


def test_cli_reports_bad_input(tmp_path, capsys):
    args = _parser().parse_args(["vae", "train", "--data", "digits", "--guide", "maf",
                                 "--out", str(tmp_path)])
    assert args.func(args) == 2
    args = _parser().parse_args(["vae", "train", "--data", "cifar", "--out", str(tmp_path)])
    assert args.func(args) == 2
    args = _parser().parse_args(["vae", "evaluate", str(tmp_path / "missing")])
    assert args.func(args) == 2
    errors = capsys.readouterr().err
    assert "--guide: expected one of" in errors and "data: expected one of" in errors
    assert "is not a vilab VAE run" in errors


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_trains_like_one(digits, tmp_path):
    results = {}
    for devices in (1, 2):
        vae = _vae(digits)
        config = _config(6, devices=devices, learning_rate=1e-2,
                         strategy="ddp_spawn" if devices == 2 else "auto")
        train_vae(vae, digits, str(tmp_path / str(devices)), config=config)
        loader = make_loader(digits.validation, batch_size=32)
        from vilab.inference.vae_evaluation import elbo_split
        results[devices] = elbo_split(vae, loader, num_samples=20)
    untrained = elbo_split(_vae(digits), make_loader(digits.validation, batch_size=32),
                           num_samples=20)
    # Both runs improve on the untrained model and land within a few nats of each other.
    for devices in (1, 2):
        assert results[devices].elbo > untrained.elbo + 5
    assert abs(results[1].elbo - results[2].elbo) < 0.1 * abs(untrained.elbo - results[1].elbo) + 10
