"""``vilab vae train`` and ``vilab vae evaluate``.

``add_vae_commands(subparsers)`` registers both on an ``argparse`` sub-parsers object; each
parsed namespace carries ``func`` (its handler, returning an exit code).

Examples::

    vilab vae train --data fashion-mnist --guide iaf --flows 4 --latent 32 --out runs/iaf
    vilab vae evaluate runs/iaf --iw-samples 5000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from vilab.cli.errors import set_flag_names, to_flags

__all__ = ["add_vae_commands", "train_command", "evaluate_command"]

_GUIDES = ("meanfield", "planar", "radial", "sylvester", "iaf", "spline")
_DATASETS = ("fashion-mnist", "mnist", "kmnist", "idx", "digits")


def add_vae_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``vae train``, ``vae evaluate`` and ``vae finish`` to ``subparsers``; return the
    ``vae`` parser."""
    vae = subparsers.add_parser("vae", help="train and evaluate VAEs on image data")
    commands = vae.add_subparsers(dest="vae_command", required=True)

    train = commands.add_parser("train", help="train a VAE with Lightning")
    train.add_argument("--data", required=True, help=f"one of {', '.join(_DATASETS)}")
    train.add_argument("--data-dir", default=None, help="directory of IDX files")
    train.add_argument("--out", required=True, help="run directory (resumed if it has last.ckpt)")
    train.add_argument("--guide", default="meanfield", help=f"one of {', '.join(_GUIDES)}")
    train.add_argument("--flows", type=int, default=4, help="flow steps K")
    train.add_argument("--latent", type=int, default=32, help="latent dimension (per level)")
    train.add_argument(
        "--latent-levels",
        type=int,
        choices=(1, 2),
        default=1,
        help="2: two stochastic layers, p(z2) p(z1|z2) p(x|z1,z2) (Tomczak & "
        "Welling's HVAE; mean-field guide, prior standard or vamp)",
    )
    train.add_argument("--architecture", choices=("mlp", "conv"), default="mlp")
    train.add_argument(
        "--hidden", default=None, help="MLP encoder widths, e.g. 300,300 (the decoder's in reverse order)"
    )
    train.add_argument(
        "--hidden-layer",
        choices=("elu", "gated"),
        default="elu",
        help="MLP hidden layers: Linear+ELU or gated (the VampPrior paper's)",
    )
    train.add_argument("--prior", choices=("standard", "mixture", "vamp"), default="standard")
    train.add_argument("--components", type=int, default=500, help="mixture/VampPrior size")
    train.add_argument("--objective", choices=("elbo", "trace", "iwae"), default="elbo")
    train.add_argument("--iw-train-samples", type=int, default=5, help="k for --objective iwae")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--kl-warmup", type=int, default=0, help="KL annealing steps")
    train.add_argument(
        "--lr-decay", type=float, default=None, help="multiply the learning rate by this factor on a validation plateau"
    )
    train.add_argument(
        "--lr-patience", type=int, default=10, help="epochs without a better validation bound before each --lr-decay"
    )
    train.add_argument("--free-bits", type=float, default=0.0, help="nats per latent dim")
    train.add_argument("--patience", type=int, default=None, help="early-stopping epochs")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--devices", type=int, default=1, help="processes (DDP when > 1)")
    train.add_argument(
        "--strategy",
        default="auto",
        help="Lightning strategy when --devices > 1: auto (ddp_spawn on CPUs), "
        "ddp_spawn, ddp_fork (faster start; one thread per process)",
    )
    train.add_argument(
        "--accelerator", choices=("cpu", "gpu", "auto"), default="cpu", help="Lightning accelerator (gpu: CUDA)"
    )
    train.add_argument("--max-train", type=int, default=None, help="use the first N images")
    train.add_argument(
        "--validation-size",
        type=int,
        default=None,
        help="training images carved off for validation (default: 10000 for the "
        "28x28 sets, 200 for digits); the rest train",
    )
    train.add_argument("--no-progress", action="store_true")
    train.add_argument(
        "--fresh", action="store_true", help="start over: a run already in --out is moved to OUT.old-N first"
    )
    train.set_defaults(func=train_command)

    evaluate = commands.add_parser("evaluate", help="metrics JSON and figures for a run")
    evaluate.add_argument("run_dir", help="directory written by `vilab vae train`")
    evaluate.add_argument("--iw-samples", type=int, default=5000, help="K for log p(x)")
    evaluate.add_argument("--chunk-size", type=int, default=500)
    evaluate.add_argument("--batch-size", type=int, default=100)
    evaluate.add_argument("--max-test", type=int, default=None, help="use the first N images")
    evaluate.add_argument("--data-dir", default=None)
    evaluate.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the importance sampling runs")
    evaluate.add_argument("--no-figures", action="store_true")
    evaluate.set_defaults(func=evaluate_command)

    finish = commands.add_parser("finish", help="write model.safetensors of a stopped run from its best checkpoint")
    finish.add_argument("run_dir", help="directory written by `vilab vae train`")
    finish.set_defaults(func=finish_command)
    set_flag_names(vae)
    return vae


def finish_command(args: argparse.Namespace) -> int:
    """Handler of ``vilab vae finish``: a run stopped by a signal or a non-finite loss gets the
    ``model.safetensors`` that ``vilab vae evaluate`` reads, from its best checkpoint."""
    from vilab.inference.vae.checkpoints import CheckpointError
    from vilab.inference.vae.runs import finish_run

    try:
        path = finish_run(args.run_dir)
    except (FileNotFoundError, CheckpointError) as error:
        return _fail(str(error))
    print(f"weights: {path}")
    return 0


def _fail(message: str) -> int:
    print(f"vilab vae: error: {message}", file=sys.stderr)
    return 2


def _no_cuda(flag: str, value: str) -> str:
    """Why ``flag value`` cannot run here ("" when it can)."""
    import torch

    if value in ("gpu", "cuda") and not torch.cuda.is_available():
        return (
            f"{flag}: expected a CUDA device for {value!r}; this torch ({torch.__version__}) sees none (use {flag} cpu)"
        )
    return ""


def train_command(args: argparse.Namespace) -> int:
    """Handler of ``vilab vae train``."""
    from vilab.datasets import load_dataset
    from vilab.inference.vae.training import NonFiniteLossError, TrainingConfig, TrainingInterrupted, train_vae
    from vilab.models.vae.vae import VAEConfig, build_vae

    if args.guide not in _GUIDES:
        return _fail(f"--guide: expected one of {', '.join(_GUIDES)}; got {args.guide!r}")
    why = _no_cuda("--accelerator", args.accelerator)
    if why:
        return _fail(why)
    try:
        data = load_dataset(args.data, data_dir=args.data_dir, seed=args.seed, validation_size=args.validation_size)
    except (ValueError, FileNotFoundError) as error:
        return _fail(to_flags(str(error), args.cli_flags))
    if args.max_train:
        data = data.subset(num_train=args.max_train)
    widths = {}
    if args.hidden:
        try:
            hidden = tuple(int(width) for width in args.hidden.split(","))
        except ValueError:
            hidden = ()
        if not hidden or min(hidden) < 1:
            return _fail(f"--hidden: expected comma-separated positive widths such as 300,300; got {args.hidden!r}")
        widths = dict(encoder_hidden=hidden, decoder_hidden=hidden[::-1])
    import pyro

    pyro.set_rng_seed(args.seed)  # model initialisation
    config = VAEConfig(
        data.image_shape,
        latent_dim=args.latent,
        num_levels=data.num_levels,
        architecture=args.architecture,
        hidden_layer=args.hidden_layer,
        guide=args.guide,
        num_flows=args.flows,
        prior=args.prior,
        num_components=args.components,
        latent_levels=args.latent_levels,
        **widths,
    )
    training = TrainingConfig(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        objective=args.objective,
        iwae_samples=args.iw_train_samples,
        kl_warmup_steps=args.kl_warmup,
        free_bits=args.free_bits,
        patience=args.patience,
        lr_decay=args.lr_decay,
        lr_patience=args.lr_patience,
        seed=args.seed,
        devices=args.devices,
        strategy=args.strategy,
        accelerator=args.accelerator,
        progress=not args.no_progress,
    )
    try:
        vae = build_vae(config)
        training.check_schedule()
    except ValueError as error:
        return _fail(to_flags(str(error), args.cli_flags))
    from vilab.inference.vae.runs import set_aside_run
    from vilab.run_folders import RunFolderError

    try:
        moved = set_aside_run(args.out) if args.fresh else None
        if moved:
            print(f"vilab vae: --fresh: moved the run in {args.out} to {moved}", file=sys.stderr)
        result = train_vae(
            vae,
            data,
            args.out,
            config=training,
            extra={"data_dir": args.data_dir, "validation_size": len(data.validation)},
        )
    except RunFolderError as error:
        return _fail(_run_folder_message(error, args))
    except NonFiniteLossError as error:
        return _fail(f"{error}; last good checkpoint: {os.path.join(args.out, 'checkpoints', 'last.ckpt')}")
    except TrainingInterrupted as error:
        print(
            f"vilab vae: {error}; the last finished epoch is in "
            f"{os.path.join(args.out, 'checkpoints', 'last.ckpt')}; rerun the same command "
            "to resume",
            file=sys.stderr,
        )
        return 128 + error.signum  # the shell's convention for "killed by signal N"
    print(f"trained in {result.wall_time:.1f} s; weights: {os.path.join(args.out, 'model.safetensors')}")
    return 0


def _run_folder_message(error: Exception, args: argparse.Namespace) -> str:
    """The refusal of ``--out`` in flags: each differing setting as ``--flag old -> new``."""
    differences = getattr(error, "differences", None)
    if not differences:
        return to_flags(str(error), args.cli_flags)
    flags = args.cli_flags
    described = ", ".join(
        f"{flags.get(key.rsplit('.', 1)[-1], key)} {old!r} -> {new!r}" for key, (old, new) in differences.items()
    )
    return (
        f"--out: {args.out!r} holds a run trained with other settings: {described}; rerun "
        "with the run's own settings to resume it, or add --fresh to start over (the old "
        f"run is moved to {os.path.normpath(args.out)}.old-N, not deleted)"
    )


def evaluate_command(args: argparse.Namespace) -> int:
    """Handler of ``vilab vae evaluate``.

    Writes into the run directory ``metrics.json``, ``figures/{reconstructions, prior_samples,
    latent_scatter, latent_traversals, elbo_curves}.png`` and, when the HTML report module is
    installed, ``report.html``.
    """
    from vilab.datasets import load_dataset, make_loader
    from vilab.inference.vae.checkpoints import CheckpointError
    from vilab.inference.vae.evaluation import evaluate_vae
    from vilab.inference.vae.plots import save_all_figures
    from vilab.inference.vae.runs import load_run, read_metrics

    if os.path.isdir(os.path.join(args.run_dir, "checkpoints")) and not os.path.exists(
        os.path.join(args.run_dir, "model.safetensors")
    ):
        return _fail(
            f"{args.run_dir!r} has checkpoints but no model.safetensors (its training was "
            f"stopped); resume it with the same `vilab vae train` command, or run "
            f"`vilab vae finish {args.run_dir}` to use its best checkpoint"
        )
    why = _no_cuda("--device", args.device)
    if why:
        return _fail(why)
    try:
        vae, config = load_run(args.run_dir)
    except (FileNotFoundError, CheckpointError) as error:
        return _fail(str(error))
    data = load_dataset(
        config["data"], data_dir=args.data_dir or config.get("data_dir"), seed=config["training"]["seed"]
    )
    test, labels = data.test, data.test_labels
    if args.max_test:
        test, labels = test[: args.max_test], labels[: args.max_test]
    import pyro

    pyro.set_rng_seed(config["training"]["seed"])
    loader = make_loader(test, labels, batch_size=args.batch_size)
    metrics = evaluate_vae(vae.to(args.device), loader, iw_samples=args.iw_samples, chunk_size=args.chunk_size)
    vae = vae.cpu()  # the figures draw on the CPU
    metrics.update({"split": "test", "data": config["data"], "guide": config["vae"]["guide"]})
    path = os.path.join(args.run_dir, "metrics.json")
    with open(path + ".tmp", "w") as file:
        json.dump(metrics, file, indent=2)
    os.replace(path + ".tmp", path)
    figures: dict = {}
    if not args.no_figures:
        figures = save_all_figures(
            vae,
            test[:1000],
            labels[:1000],
            os.path.join(args.run_dir, "figures"),
            metrics_rows=read_metrics(args.run_dir),
        )
        print("figures:", ", ".join(sorted(figures)))
    try:
        from vilab.inference.report.html import write_vae_report
    except ImportError:  # the report is optional; metrics and figures are already written
        write_vae_report = None
    if write_vae_report is not None:
        print("report:", write_vae_report(args.run_dir, metrics, figures))
    print(
        f"test ELBO {metrics['elbo']:.2f} (rec {metrics['reconstruction']:.2f}, KL "
        f"{metrics['kl']:.2f}); log p(x) {metrics['log_likelihood']:.2f} +- "
        f"{metrics['log_likelihood_stderr']:.2f} (K={args.iw_samples}); active units "
        f"{metrics['active_units']}/{metrics['latent_dim']}; metrics: {path}"
    )
    return 0
