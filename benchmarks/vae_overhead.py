"""Overhead of vilab's VAE training step against a plain PyTorch loop.

Both loops train the same MLP VAE (784-512-256 encoder, latent 32, 256-512-784 Bernoulli
decoder), same batch (128 dynamically binarized Fashion-MNIST images, or random bits when the
data set is absent), same Adam optimizer and the same analytic-KL ELBO. vilab's step is
``VAELightningModule.compute_loss`` (what ``training_step`` runs: Pyro traces of
``model(x)``/``guide(x)`` -> ``ELBOLoss``, Pyro's distribution checks off as in training)
+ backward + step; the plain loop hand-writes the ELBO. ``--validate-data`` keeps the model's
per-batch binary-data check on (the library default); ``--validate-distributions`` turns
Pyro's checks back on. Rounds alternate between
the two so machine load hits both alike; the ratio of medians is reported.

Usage:
    nice -n 0 python benchmarks/vae_overhead.py --rounds 20 --steps 50 --threads 1
Writes benchmarks/results/vae_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch.nn import functional as F

from vilab.inference.vae.objectives import ELBOLoss
from vilab.inference.vae.training import VAELightningModule
from vilab.models.vae.vae import VAEConfig, build_vae

HERE = os.path.dirname(os.path.abspath(__file__))


def batches(batch_size: int, count: int) -> list[torch.Tensor]:
    try:
        from vilab.datasets import load_dataset

        grey = load_dataset("fashion-mnist").train[: batch_size * count]
    except (FileNotFoundError, ValueError):
        grey = torch.rand(batch_size * count, 1, 28, 28)
    return list(torch.bernoulli(grey).split(batch_size))


def plain_step(encoder, decoder, optimizer, x):
    optimizer.zero_grad()
    loc, scale = encoder(x)
    z = loc + scale * torch.randn_like(loc)
    logits = decoder(z)
    reconstruction = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum((1, 2, 3))
    kl = (0.5 * (loc**2 + scale**2 - 1) - torch.log(scale)).sum(-1)
    loss = (kl - reconstruction).mean()
    loss.backward()
    optimizer.step()


def vilab_step(module, optimizer, x, index):
    optimizer.zero_grad()
    loss = module.compute_loss(x, index)
    loss.loss.backward()
    optimizer.step()


def timed(fn, data) -> float:
    start = time.perf_counter()
    for index, x in enumerate(data):
        fn(x, index)
    return len(data) * data[0].shape[0] / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--validate-distributions", action="store_true", help="keep Pyro's distribution argument/support checks on"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: immune to OpenMP spin-waits on a shared, overloaded machine)",
    )
    parser.add_argument(
        "--validate-data", action="store_true", help="keep the per-call binary-data check on in vilab's model"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = VAEConfig((1, 28, 28), latent_dim=32)
    vae, twin = build_vae(config), build_vae(config)
    twin.load_state_dict(vae.state_dict())
    vae.model.validate_data = args.validate_data
    module = VAELightningModule(vae.model, vae.guide, ELBOLoss(), validate_distributions=args.validate_distributions)
    vilab_optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    plain_optimizer = torch.optim.Adam(twin.parameters(), lr=1e-3)
    encoder, decoder = twin.guide.encoder, twin.model.decoder
    data = batches(args.batch_size, args.steps)
    timed(lambda x, i: plain_step(encoder, decoder, plain_optimizer, x), data[:3])  # warm-up
    timed(lambda x, i: vilab_step(module, vilab_optimizer, x, i), data[:3])
    plain, ours = [], []
    for _ in range(args.rounds):
        plain.append(timed(lambda x, i: plain_step(encoder, decoder, plain_optimizer, x), data))
        ours.append(timed(lambda x, i: vilab_step(module, vilab_optimizer, x, i), data))
    result = {
        "plain_images_per_s": statistics.median(plain),
        "vilab_images_per_s": statistics.median(ours),
        "ratio": statistics.median(ours) / statistics.median(plain),
        "per_round_ratios": [o / p for o, p in zip(ours, plain)],
        "plain_per_round": plain,
        "vilab_per_round": ours,
        "load_average": os.getloadavg(),
        "threads": torch.get_num_threads(),
        "validate_data": args.validate_data,
        "validate_distributions": args.validate_distributions,
        "command": " ".join(["python", *sys.argv]),
    }
    print(f"{'loop':<10}{'images/s (median)':>20}")
    print(f"{'plain':<10}{result['plain_images_per_s']:>20.0f}")
    print(f"{'vilab':<10}{result['vilab_images_per_s']:>20.0f}")
    print(f"ratio vilab/plain = {result['ratio']:.3f} (target >= 0.9)")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    suffix = ("_validated" if args.validate_data else "") + ("_pyro_checks" if args.validate_distributions else "")
    with open(os.path.join(HERE, "results", f"vae_overhead{suffix}.json"), "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
