"""The README quickstart exactly as written (default float32), over five seeds of data and fit.

Prints, per seed and guide, the largest mean error over parameters (in NUTS reference sds), the
sd-ratio range, PSIS k-hat, the ELBO, whether the fit passed its convergence test and its
log-density gradient evaluations, and NUTS's gradient evaluations.

    python benchmarks/quickstart_accuracy.py                       # meanfield, iaf, fullrank
    python benchmarks/quickstart_accuracy.py --guides meanfield --seeds 3
"""

from __future__ import annotations

import argparse
import warnings

import pyro
import pyro.distributions as dist
import torch

from vilab import compare

__all__ = ["model", "main"]


def model(y):
    """The README's model: a normal mean and scale."""
    mu, sigma = pyro.sample("mu", dist.Normal(0.0, 10.0)), pyro.sample("sigma", dist.HalfNormal(5.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, sigma), obs=y)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guides", default="meanfield,iaf,fullrank")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    guides = tuple(args.guides.split(","))
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = compare(model, torch.randn(50) + 3.0, guides=guides, seed=seed, progress=False)
        for guide in guides:
            part, row = report.table[report.table.method == guide], report.summary.loc[guide]
            print(
                f"seed {seed} {guide:9s} max|err| {part.mean_error_sd.abs().max():.3f} sd ratio "
                f"{part.sd_ratio.min():.3f}-{part.sd_ratio.max():.3f} k-hat {row.k_hat:.2f} "
                f"elbo {row.elbo:.2f} converged {row.converged} grads {row.gradient_evaluations}"
            )
        print(f"seed {seed} nuts grads {report.summary.loc['nuts'].gradient_evaluations}", flush=True)


if __name__ == "__main__":
    main()
