"""``vilab gaps`` (amortization/approximation gaps of a trained VAE run) and ``vilab dmm``.

``add_advanced_commands(subparsers)`` registers both on an ``argparse`` sub-parsers object;
each parsed namespace carries ``func`` (its handler, returning an exit code).

Examples::

    vilab vae train --data fashion-mnist --guide iaf --latent 16 --out runs/iaf
    vilab gaps runs/iaf --num-test 200 --refine-steps 300
    vilab dmm --data pendulum --epochs 20 --out runs/dmm-pendulum.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from vilab.cli.errors import set_flag_names

__all__ = ["add_advanced_commands", "gaps_command", "dmm_command"]


def add_advanced_commands(subparsers: Any) -> None:
    """Add ``gaps`` and ``dmm`` to ``subparsers``."""
    gaps = subparsers.add_parser("gaps", help="amortization and approximation gaps of a VAE run")
    gaps.add_argument("run_dir", help="directory written by `vilab vae train`")
    gaps.add_argument("--num-test", type=int, default=200, help="test images scored")
    gaps.add_argument("--refine-steps", type=int, default=300, help="local Adam steps")
    gaps.add_argument("--lr", type=float, default=0.01, help="local Adam step size")
    gaps.add_argument("--iw-samples", type=int, default=1000, help="K for log p(x)")
    gaps.add_argument("--data-dir", default=None)
    gaps.add_argument("--seed", type=int, default=0)
    gaps.set_defaults(func=gaps_command)

    dmm = subparsers.add_parser("dmm", help="train and score a deep Markov model")
    dmm.add_argument("--data", choices=("fashion-rows", "pendulum"), required=True)
    dmm.add_argument("--epochs", type=int, default=5)
    dmm.add_argument("--latent", type=int, default=None, help="latent size (16 / 4)")
    dmm.add_argument("--max-train", type=int, default=5000)
    dmm.add_argument("--num-test", type=int, default=200)
    dmm.add_argument("--iw-samples", type=int, default=200)
    dmm.add_argument("--lr", type=float, default=3e-3)
    dmm.add_argument("--out", default=None, help="save the weights (.safetensors)")
    dmm.add_argument("--seed", type=int, default=0)
    dmm.set_defaults(func=dmm_command)
    for parser in (gaps, dmm):
        set_flag_names(parser)


def _fail(command: str, message: str) -> int:
    print(f"vilab {command}: error: {message}", file=sys.stderr)
    return 2


def gaps_command(args: argparse.Namespace) -> int:
    """Handler of ``vilab gaps``: prints the gap report as JSON."""
    import pyro

    from vilab.datasets import load_dataset
    from vilab.inference.vae.amortization import gap_decomposition
    from vilab.inference.vae.runs import load_run

    try:
        vae, config = load_run(args.run_dir)
        data = load_dataset(config["data"], data_dir=args.data_dir).subset(num_test=args.num_test)
    except (FileNotFoundError, ValueError, KeyError) as error:
        return _fail("gaps", str(error))
    pyro.set_rng_seed(args.seed)
    report = gap_decomposition(
        vae.model,
        vae.guide,
        data.test,
        refine_steps=args.refine_steps,
        learning_rate=args.lr,
        iw_samples=args.iw_samples,
    )
    summary = {k: v for k, v in report._asdict().items() if k != "per_example"}
    print(json.dumps({"run_dir": args.run_dir, "num_test": args.num_test, **summary}, indent=2))
    return 0


def dmm_command(args: argparse.Namespace) -> int:
    """Handler of ``vilab dmm``: trains, prints test ELBO and IS log-likelihood as JSON."""
    import pyro
    import torch

    from vilab.datasets_sequential import load_image_rows, simulate_pendulum
    from vilab.inference.vae.amortization import importance_log_likelihood, monte_carlo_elbo
    from vilab.inference.vae.minibatch import fit_minibatch
    from vilab.inference.vae.objectives import elbo_terms
    from vilab.models.vae.dmm import DMM

    if args.out and os.path.isdir(args.out):  # found out now, not after training
        return _fail("dmm", f"--out: expected a file name such as runs/dmm.safetensors; {args.out!r} is a folder")
    pyro.set_rng_seed(args.seed)
    try:
        if args.data == "pendulum":
            data = simulate_pendulum(seed=args.seed)
            dmm = DMM(2, args.latent or 4, likelihood="normal", rnn_dim=64)
        else:
            data = load_image_rows(num_train=args.max_train, num_test=args.num_test)
            dmm = DMM(28, args.latent or 16)
    except (FileNotFoundError, ValueError) as error:
        return _fail("dmm", str(error))

    def loss(batch, step):
        terms = elbo_terms(dmm.model, dmm.guide, batch)
        return -(terms.reconstruction - min(1.0, 0.1 + step / 500) * terms.kl).mean(), {}

    batches = list(torch.split(data.train, 100))
    fit = fit_minibatch(dmm, loss, batches, num_epochs=args.epochs, learning_rate=args.lr)
    test = data.test[: args.num_test]
    elbo = monte_carlo_elbo(dmm.model, dmm.guide, test, num_samples=10)
    log_likelihood = importance_log_likelihood(dmm.model, dmm.guide, test, num_samples=args.iw_samples, chunk_size=100)
    if args.out:
        from vilab.inference.vae.checkpoints import save_module

        save_module(dmm, args.out, metadata={"data": args.data})
    print(
        json.dumps(
            {
                "data": data.name,
                "epochs": args.epochs,
                "train_seconds": fit.wall_time,
                "test_elbo": float(elbo.mean()),
                "test_log_likelihood": float(log_likelihood.mean()),
                "iw_samples": args.iw_samples,
            },
            indent=2,
        )
    )
    return 0
