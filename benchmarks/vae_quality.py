"""VAE quality: test -log p(x) (importance sampling) and test -ELBO per model.

Part 1 trains, on dynamically binarized Fashion-MNIST with MLP encoder/decoder (300-300,
latent 40, as in the VampPrior paper's protocol), a mean-field encoder, + planar, + IAF,
+ spline flows (K steps), IWAE (k=5) training and a VampPrior, each on the first
``--max-train`` training images for at most ``--epochs`` epochs and ``--cpu-minutes`` minutes
of this process's CPU time (a budget that machine load does not shrink, unlike wall time),
through ``vilab.inference.train_vae``; then scores the first ``--test-examples`` test images
with K=``--iw-samples`` importance samples.
Part 2 trains the categorical (17-level) VAE on sklearn digits, latent 16, and reports the
single-sample -ELBO on the validation split (the anchor's metric) and test -ELBO / -log p(x).

Published anchors (Fashion-MNIST, MLP, N(0, I) prior, long training): 228.70 nats; VampPrior
227.35; exemplar prior 226.75. Digits reference VAE: about 100.5 nats -ELBO (validation).
Their networks and schedule are ``--hidden-layer gated --kl-warmup-epochs 100 --patience 50
--lr 5e-4 --epochs 2000`` on all 50,000 training images (a GPU's work, see docs/lab-notes/benchmarks.md).

Usage:
    nohup nice -n 0 python benchmarks/vae_quality.py --max-train 10000 --cpu-minutes 2 \
        --iw-samples 1000 --test-examples 1000 --threads 1 > quality.log &
    # on a GPU, with a wall-clock budget
    python benchmarks/vae_quality.py --models vampprior-iwae-k50 --hidden-layer gated \
        --accelerator gpu --max-minutes 10 --batch-size 1000 --lr 3e-3 \
        --max-train 50000 --max-validation 5000 --test-examples 10000 --eval-batch 100 \
        --chunk-size 1000 --digits-epochs 0
    # the two-level VAE (HVAE) with a VampPrior on z_2, in phases on 2 CPU cores (docs/lab-notes/benchmarks.md)
    python benchmarks/vae_quality.py --models vampprior --latent-levels 2 --hidden-layer gated \
        --vamp-init data --kl-warmup-epochs 20 --epochs 60 --batch-size 500 --lr 2e-3 \
        --max-train 50000 --max-validation 5000 --cpu-minutes 1000 --digits-epochs 0 --tag=-h2-p1
Writes benchmarks/results/vae_quality.json and run directories under benchmarks/results/vae_runs/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import lightning.pytorch as pl
import pyro
import torch

from vilab.datasets import load_dataset, make_loader
from vilab.inference.vae.evaluation import elbo_split, evaluate_vae
from vilab.inference.vae.training import TrainingConfig, train_vae
from vilab.models.vae.vae import VAEConfig, build_vae

HERE = os.path.dirname(os.path.abspath(__file__))
MLP = dict(encoder_hidden=(300, 300), decoder_hidden=(300, 300))
FASHION_MODELS = {
    "meanfield": (dict(guide="meanfield"), {}),
    "planar": (dict(guide="planar"), {}),
    "iaf": (dict(guide="iaf"), {}),
    "spline": (dict(guide="spline"), {}),
    "iwae-k5": (dict(guide="meanfield"), dict(objective="iwae", iwae_samples=5)),
    "vampprior": (dict(guide="meanfield", prior="vamp", num_components=500), {}),
    "vampprior-iwae-k5": (
        dict(guide="meanfield", prior="vamp", num_components=500),
        dict(objective="iwae", iwae_samples=5),
    ),
    "vampprior-iwae-k50": (
        dict(guide="meanfield", prior="vamp", num_components=500),
        dict(objective="iwae", iwae_samples=50),
    ),
}


class CPUTimeBudget(pl.Callback):
    """Stop training once this process has used ``seconds`` of CPU time in ``fit`` (``None``:
    never; the time is still recorded)."""

    def __init__(self, seconds: float):
        self.seconds, self.start, self.used = seconds, 0.0, 0.0

    def on_fit_start(self, trainer, pl_module):
        self.start = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.used = time.process_time() - self.start
        if self.seconds is not None and self.used > self.seconds:
            trainer.should_stop = True


def warm_start(vae, path):
    """Continue from another run's weights (e.g. a lower learning rate after a plateau, or a
    learned prior on top of a trained encoder/decoder). Every saved tensor must fit; the
    model's other parameters (a new prior's) keep their initial values, and are listed."""
    from vilab.inference.vae.checkpoints import load_safetensors

    tensors, _ = load_safetensors(path)
    if getattr(vae.config, "latent_levels", 1) == 2 and not any(k.startswith("guide.lower.") for k in tensors):
        # A one-level run under a two-level model: its z becomes the top latent z_2.
        from vilab.models.vae.hierarchical import embed_one_level

        print(
            f"warm start from the one-level {path}; set as N(0, I) or zero: {embed_one_level(vae, tensors)}", flush=True
        )
        return
    own = vae.state_dict()
    # A saved N(0, I) prior's buffers have no counterpart in a learned prior: drop them.
    dropped = [k for k in tensors if k.startswith("model.prior.") and k not in own]
    tensors = {k: v for k, v in tensors.items() if k not in dropped}
    unfit = [k for k, v in tensors.items() if k not in own or own[k].shape != v.shape]
    if unfit:
        raise SystemExit(f"--init-from: {path} has tensors this model lacks or shapes it does not have: {unfit}")
    vae.load_state_dict(tensors, strict=False)
    kept = sorted(set(own) - set(tensors))
    if kept:
        print(
            f"warm start from {path}; kept as initialised: {kept}; saved prior tensors dropped: {dropped}", flush=True
        )


def mirror_classes(data, classes):
    """Append the left-right mirror image of every training image whose class is in ``classes``
    (a fixed copy, so an epoch sees each image both ways). Shoes all face one way, so only tops
    and bags are candidates; even their mirror images are not the same distribution (the
    fourteenth session's model scores mirrored tops 4-6 nats and bags 10 nats worse,
    docs/lab-notes/benchmarks.md, sixteenth session)."""
    if not classes:
        return data
    labels = set(data.train_labels.tolist())
    if not set(classes) <= labels:
        raise ValueError(f"--mirror-classes: expected classes among {sorted(labels)}, got {classes}")
    keep = torch.isin(data.train_labels, torch.tensor(classes))
    return dataclasses.replace(
        data,
        train=torch.cat([data.train, data.train[keep].flip(-1)]),
        train_labels=torch.cat([data.train_labels, data.train_labels[keep]]),
    )


def _max_time(minutes):
    """Lightning's ``DD:HH:MM:SS`` wall-clock budget for ``minutes`` (``None``: no limit)."""
    if minutes is None:
        return None
    seconds = int(minutes * 60)
    return f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_one(name, data, vae_options, train_options, args, out_root):
    pyro.set_rng_seed(args.seed)
    config = VAEConfig(data.image_shape, num_levels=data.num_levels, **vae_options)
    steps_per_epoch = math.ceil(len(data.train) / args.batch_size)
    training = TrainingConfig(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        progress=False,
        seed=args.seed,
        kl_warmup_steps=args.kl_warmup_epochs * steps_per_epoch,
        patience=args.patience,
        accelerator=args.accelerator,
        lr_decay=args.lr_decay,
        lr_patience=args.lr_patience,
        max_time=_max_time(args.max_minutes),
        **train_options,
    )
    out_dir = os.path.join(out_root, name + args.tag)
    budget = CPUTimeBudget(None if args.cpu_minutes is None else args.cpu_minutes * 60)
    from vilab.inference.vae.checkpoints import load_checkpoint
    from vilab.inference.vae.runs import load_run

    if args.reuse and os.path.exists(os.path.join(out_dir, "model.safetensors")):
        # Score a finished run again (e.g. after an evaluation failure) without retraining.
        last = load_checkpoint(os.path.join(out_dir, "checkpoints", "last.ckpt"))
        budget.used = float("nan")
        result = argparse.Namespace(
            trainer=argparse.Namespace(current_epoch=last["epoch"] + 1, global_step=last["global_step"]),
            wall_time=float("nan"),
        )
    else:
        vae = build_vae(config)
        if args.vamp_init == "data" and config.prior == "vamp":
            order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(args.seed))
            vamp = getattr(vae.model.prior, "top", vae.model.prior)  # a two-level prior's p(z_2)
            vamp.init_from_data(data.train[order[: config.num_components]])
        if args.init_from:
            warm_start(vae, os.path.join(args.init_from, "model.safetensors"))
        # --resume: a long CPU run spans sessions; SIGTERM ends one at an epoch's checkpoint.
        result = train_vae(vae, data, out_dir, config=training, resume=args.resume, callbacks=[budget])

    vae, _ = load_run(out_dir)
    if args.accelerator in ("gpu", "cuda"):
        vae = vae.cuda()
    pyro.set_rng_seed(args.seed)
    validation = elbo_split(vae, make_loader(data.validation, batch_size=args.eval_batch))
    loader = make_loader(data.test[: args.test_examples], batch_size=args.eval_batch)
    pyro.set_rng_seed(args.seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    metrics = evaluate_vae(vae, loader, iw_samples=args.iw_samples, chunk_size=args.chunk_size)
    return {
        "model": name,
        "epochs": result.trainer.current_epoch,
        "steps": result.trainer.global_step,
        "train_images": len(data.train),
        "train_seconds": round(result.wall_time, 1),
        "train_cpu_seconds": round(budget.used, 1),
        "eval_seconds": round(time.perf_counter() - start, 1),
        "eval_cpu_seconds": round(time.process_time() - cpu_start, 1),
        "test_examples": metrics["num_examples"],
        "iw_samples": args.iw_samples,
        "validation_neg_elbo": -validation.elbo,
        "test_nll": -metrics["log_likelihood"],
        "test_nll_stderr": metrics["log_likelihood_stderr"],
        "test_neg_elbo": -metrics["elbo"],
        "reconstruction": -metrics["reconstruction"],
        "kl": metrics["kl"],
        "active_units": metrics["active_units"],
        "latent_dim": metrics["latent_dim"],
        "mutual_information": metrics["mutual_information"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument(
        "--cpu-minutes",
        type=float,
        default=None,
        help="training budget per model, in CPU minutes of this process (default: 2 on the CPU, none on a GPU)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="wall-clock training budget per model, in minutes (on a GPU, where the CPU budget says little)",
    )
    parser.add_argument(
        "--accelerator", default="cpu", help="Lightning accelerator for training and scoring (cpu, gpu)"
    )
    parser.add_argument("--data-dir", default=None, help="directory of the Fashion-MNIST IDX files (default: Debian's)")
    parser.add_argument(
        "--runs-dir", default=os.path.join(HERE, "results", "vae_runs"), help="where the run directories go"
    )
    parser.add_argument(
        "--validation-size",
        type=int,
        default=None,
        help="training images carved off as the validation split (the rest train; default: the loader's 10,000)",
    )
    parser.add_argument("--max-train", type=int, default=10000, help="first N training images")
    parser.add_argument(
        "--max-validation", type=int, default=1000, help="first N validation images (checked every epoch)"
    )
    parser.add_argument(
        "--mirror-classes",
        default="",
        help="comma-separated Fashion-MNIST classes whose training images are "
        "also used mirrored left-right (e.g. 0,2,3,4,6,8: tops and bags)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--digits-cpu-minutes", type=float, default=1.0)
    parser.add_argument("--iw-samples", type=int, default=5000)
    parser.add_argument("--chunk-size", type=int, default=250)
    parser.add_argument("--test-examples", type=int, default=1000)
    parser.add_argument("--eval-batch", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--lr-decay", type=float, default=None, help="multiply the learning rate by this factor on a validation plateau"
    )
    parser.add_argument(
        "--lr-patience", type=int, default=10, help="epochs without a better validation bound before each --lr-decay"
    )
    parser.add_argument("--latent", type=int, default=40)
    parser.add_argument("--flows", type=int, default=4)
    parser.add_argument("--models", default=",".join(FASHION_MODELS))
    parser.add_argument(
        "--hidden-layer",
        choices=("elu", "gated"),
        default="elu",
        help="MLP hidden layers (the anchors' networks are gated)",
    )
    parser.add_argument(
        "--latent-levels",
        type=int,
        choices=(1, 2),
        default=1,
        help="2: the two-level VAE (Tomczak & Welling's HVAE), --latent numbers per "
        "level; --init-from may then name a one-level run (its z becomes z_2)",
    )
    parser.add_argument(
        "--kl-warmup-epochs", type=int, default=0, help="linear KL annealing over this many epochs (the anchors: 100)"
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=None,
        help="early stopping on the validation ELBO (IWAE models: the k-sample bound), in epochs (the anchors: 50)",
    )
    parser.add_argument("--digits-epochs", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reuse", action="store_true", help="evaluate existing run directories instead of retraining them"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run directory from its checkpoints/last.ckpt (the same "
        "command again, after SIGTERM or a kill; without it a run restarts)",
    )
    parser.add_argument("--init-from", default="", help="run directory whose model.safetensors initialises the model")
    parser.add_argument(
        "--vamp-init",
        choices=("random", "data"),
        default="random",
        help="VampPrior pseudo-inputs: noise around grey 0.5 (the paper's) or random training images",
    )
    parser.add_argument("--tag", default="", help="suffix for the run directory (keeps earlier runs of a model)")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "vae_quality.json"))
    args = parser.parse_args(argv)
    if args.cpu_minutes is None and args.accelerator == "cpu":
        args.cpu_minutes = 2.0
    torch.set_num_threads(args.threads)
    out_root = args.runs_dir
    rows = []
    fashion = load_dataset(
        "fashion-mnist", data_dir=args.data_dir, seed=args.seed, validation_size=args.validation_size
    ).subset(num_train=args.max_train, num_validation=args.max_validation)
    fashion = mirror_classes(fashion, [int(c) for c in args.mirror_classes.split(",") if c])
    for name in [m for m in args.models.split(",") if m]:
        vae_options, train_options = FASHION_MODELS[name]
        vae_options = dict(
            MLP,
            latent_dim=args.latent,
            num_flows=args.flows,
            hidden_layer=args.hidden_layer,
            latent_levels=args.latent_levels,
            **vae_options,
        )
        rows.append(dict(run_one(name, fashion, vae_options, train_options, args, out_root), data="fashion-mnist"))
        print(json.dumps(rows[-1]), flush=True)
    if args.digits_epochs > 0:
        digits = load_dataset("digits", seed=args.seed)
        digits_args = argparse.Namespace(
            **{
                **vars(args),
                "epochs": args.digits_epochs,
                "test_examples": len(digits.test),
                "cpu_minutes": args.digits_cpu_minutes,
            }
        )
        rows.append(
            dict(
                run_one(
                    "digits-categorical",
                    digits,
                    dict(latent_dim=16, encoder_hidden=(128, 128), decoder_hidden=(128, 128)),
                    {},
                    digits_args,
                    out_root,
                ),
                data="digits",
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n{'model':<20}{'data':<15}{'epochs':>7}{'steps':>7}{'-log p(x)':>11}{'+-':>6}"
        f"{'-ELBO':>9}{'val -ELBO':>10}{'KL':>7}{'AU':>6}{'train cpu s':>12}"
    )
    for row in rows:
        print(
            f"{row['model']:<20}{row['data']:<15}{row['epochs']:>7}{row['steps']:>7}"
            f"{row['test_nll']:>11.2f}{row['test_nll_stderr']:>6.2f}{row['test_neg_elbo']:>9.2f}"
            f"{row['validation_neg_elbo']:>10.2f}{row['kl']:>7.2f}"
            f"{row['active_units']:>3}/{row['latent_dim']:<2}{row['train_cpu_seconds']:>12.0f}"
        )
    path = args.output
    with open(path, "w") as handle:
        json.dump(
            {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "args": vars(args), "rows": rows},
            handle,
            indent=2,
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
