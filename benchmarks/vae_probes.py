"""Probes of a trained VAE run: would a different prior, or averaged weights, score better?

Each probe scores on the first ``--images`` validation images with ``--iw-samples`` importance
samples (encoder proposal, seed 0), so its rows are paired with the run's own score:

* ``prior-swap RUN``: replace the run's top prior (``p(z_2)`` of a two-level VAE, ``p(z)``
  otherwise) by a kernel density over the encoder means of the training images, one fixed
  binarization, :math:`p(z) = \\frac1N \\sum_n \\mathcal{N}(z \\mid \\mu(x_n), \\operatorname{diag}
  s_n^2)` (the prior of the exemplar VAE without its retraining). ``--scales`` lists the kernel
  scales: ``mult:c`` is ``c`` times each image's own encoder scale, ``dim:c`` one scale per
  dimension (``c`` times the root-mean-square encoder scale), ``iso:s`` a single scale ``s``.
* ``score RUN``: the run as it is (the number the other probes are paired with, for runs
  trained elsewhere, e.g. by ``vae_quality.py``).
* ``mirror RUN``: per class, the first ``--images`` training images of that class (one fixed
  binarization) against their left-right mirror images: is the mirror image of a training image
  as likely as the image itself (could mirroring augment the training set)?
* ``ema RUN``: continue training RUN for ``--epochs`` epochs at a constant rate while keeping an
  exponential moving average of the weights (``torch.optim.swa_utils``), then score the average.

Usage (docs/lab-notes/benchmarks.md, fifteenth session):
    python benchmarks/vae_probes.py prior-swap benchmarks/results/vae_runs/vampprior-iwae-k5-h2-v55b \
        --validation-size 5000 --images 200 --iw-samples 200 --scales mult:1.0,mult:1.15,dim:1.0
    python benchmarks/vae_probes.py ema benchmarks/results/vae_runs/vampprior-iwae-k5-h2-v55b \
        --validation-size 5000 --lr 3.75e-4 --decay 0.998 --epochs 30 --images 1000 --iw-samples 1000

References:
    Norouzi, Fleet & Norouzi, "Exemplar VAE: Linking Generative Models, Nearest Neighbor
    Retrieval, and Data Augmentation", NeurIPS 2020.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import pyro
import torch
from lightning.pytorch.callbacks import Callback
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from vilab.datasets import binarize, load_dataset, make_loader
from vilab.inference.vae.evaluation import importance_sampled_log_likelihood
from vilab.inference.vae.runs import load_run
from vilab.inference.vae.training import TrainingConfig, train_vae
from vilab.models.vae.priors import DiagonalGaussianMixture

HERE = os.path.dirname(os.path.abspath(__file__))


def score(vae, images, args) -> float:
    """``-log p(x)`` averaged over ``images`` (K = ``--iw-samples``, seed 0)."""
    pyro.set_rng_seed(0)
    estimate = importance_sampled_log_likelihood(
        vae, make_loader(images, batch_size=50), num_samples=args.iw_samples, chunk_size=100
    )
    return -estimate.mean


class KernelPrior(torch.nn.Module):
    """A fixed equal-weight mixture of diagonal Gaussians (the swapped-in prior)."""

    def __init__(self, locs: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.latent_dim = locs.shape[-1]
        self.locs, self.scales = locs, scales

    def forward(self) -> DiagonalGaussianMixture:
        n = len(self.locs)
        return DiagonalGaussianMixture(torch.full((n,), -math.log(n)), self.locs, self.scales)


def kernel_scales(spec: str, scales: torch.Tensor) -> torch.Tensor:
    kind, _, value = spec.partition(":")
    c = float(value)
    if kind == "mult":
        return scales * c
    if kind == "dim":
        return (scales.pow(2).mean(0).sqrt() * c).expand_as(scales)
    if kind == "iso":
        return torch.full_like(scales, c)
    raise SystemExit(f"--scales: expected mult:C, dim:C or iso:S; got {spec!r}")


def prior_swap(vae, args, data) -> list[dict]:
    holder = getattr(vae.model.prior, "top", None) is not None
    if vae.config.guide != "meanfield":
        raise SystemExit(
            f"prior-swap: needs a Gaussian encoder (guide 'meanfield'); {args.run} "
            f"has guide {vae.config.guide!r}, whose posterior is not N(mu(x), s(x)^2)"
        )
    with torch.no_grad():
        train = data.train
        if data.num_levels == 2:  # one fixed binarization, as validation and test have
            train = binarize(train, seed=0)
        encoder = vae.guide.encoder  # q(z|x), or q(z_2|x) of the two-level guide
        locs, scales = (torch.cat(t) for t in zip(*[encoder(x) for x in train.split(1000)]))
    images = data.validation[: args.images]
    rows = [{"prior": "run's own", "neg_log_likelihood": score(vae, images, args)}]
    print(f"{'prior':<28}{'-log p(x)':>12}", flush=True)
    print(f"{rows[0]['prior']:<28}{rows[0]['neg_log_likelihood']:>12.3f}", flush=True)
    for spec in args.scales.split(","):
        prior = KernelPrior(locs, kernel_scales(spec, scales))
        if holder:
            vae.model.prior.top = prior
        else:
            vae.model.prior = prior
        rows.append({"prior": f"kernel {spec}", "neg_log_likelihood": score(vae, images, args)})
        print(f"{rows[-1]['prior']:<28}{rows[-1]['neg_log_likelihood']:>12.3f}", flush=True)
    return rows


class _EMA(Callback):
    def __init__(self, decay: float):
        self.decay, self.average = decay, None

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self.average is None:
            self.average = AveragedModel(pl_module, multi_avg_fn=get_ema_multi_avg_fn(self.decay))
        self.average.update_parameters(pl_module)


def ema(vae, config, args, data) -> list[dict]:
    images = data.validation[: args.images]
    start = score(vae, images, args)
    training = TrainingConfig(
        **{
            **config["training"],
            "max_epochs": args.epochs,
            "learning_rate": args.lr,
            "lr_decay": None,
            "patience": None,
            "max_time": None,
            "progress": False,
        }
    )
    callback = _EMA(args.decay)
    pyro.set_rng_seed(0)
    began = time.perf_counter()
    train_vae(vae, data, args.out, config=training, resume=False, callbacks=[callback])
    minutes = (time.perf_counter() - began) / 60
    vae.load_state_dict(callback.average.module.state_dict())
    vae.eval()
    rows = [
        {"weights": "run's own", "neg_log_likelihood": start},
        {
            "weights": f"EMA {args.decay} after {args.epochs} epochs at lr {args.lr}",
            "neg_log_likelihood": score(vae, images, args),
            "train_minutes": round(minutes, 1),
        },
    ]
    for row in rows:
        print(f"{row['weights']:<48}{row['neg_log_likelihood']:>12.3f}", flush=True)
    return rows


def score_run(vae, args, data) -> list[dict]:
    """The run's own score, for pairing with probes of it or with other runs."""
    row = {"weights": "run's own", "neg_log_likelihood": score(vae, data.validation[: args.images], args)}
    print(f"{row['weights']:<48}{row['neg_log_likelihood']:>12.3f}", flush=True)
    return [row]


def mirror(vae, args, data) -> list[dict]:
    """``-log p(x)`` of each class's training images as they are and mirrored left-right."""
    rows = []
    for label in range(int(data.train_labels.max()) + 1):
        images = data.train[data.train_labels == label][: args.images]
        if data.num_levels == 2:  # a seed apart from validation's (1) and test's (2)
            images = binarize(images, seed=3)
        row = {
            "class": label,
            "images": len(images),
            "as_is": score(vae, images, args),
            "mirrored": score(vae, images.flip(-1), args),
        }
        rows.append(row)
        print(
            f"class {label}: as is {row['as_is']:8.2f}   mirrored {row['mirrored']:8.2f}   "
            f"{row['mirrored'] - row['as_is']:+6.2f}",
            flush=True,
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("probe", choices=("prior-swap", "ema", "score", "mirror"))
    parser.add_argument("run", help="a run directory written by vae_quality.py or `vilab vae train`")
    parser.add_argument(
        "--validation-size", type=int, default=None, help="as the run was trained (its validation images are scored)"
    )
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--iw-samples", type=int, default=200)
    parser.add_argument("--scales", default="mult:1.0,dim:1.0")
    parser.add_argument("--lr", type=float, default=3.75e-4)
    parser.add_argument("--decay", type=float, default=0.998)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default=None, help="ema: run directory of the continuation")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "vae_probes.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    vae, config = load_run(args.run)
    data = load_dataset(config["data"], seed=0, validation_size=args.validation_size)
    if args.probe == "ema":
        args.out = args.out or args.run.rstrip("/") + "-ema"
        rows = ema(vae, config, args, data)
    elif args.probe == "score":
        rows = score_run(vae, args, data)
    elif args.probe == "mirror":
        rows = mirror(vae, args, data)
    else:
        rows = prior_swap(vae, args, data)
    results = {}
    if os.path.exists(args.output):
        with open(args.output) as file:
            results = json.load(file)
    results[f"{args.probe} {os.path.basename(args.run.rstrip('/'))}"] = {
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "rows": rows,
    }
    with open(args.output + ".tmp", "w") as file:
        json.dump(results, file, indent=2)
    os.replace(args.output + ".tmp", args.output)


if __name__ == "__main__":
    main()
