"""How close the Gaussian guides get to posteriordb's gold-standard posteriors, and at what cost.

For every posterior in ``../shared/posteriordb`` (or ``$VILAB_POSTERIORDB``) and every guide,
``compare`` fits the guide against the reference draws and this prints, per fit: the largest
and the root-mean-square mean error over parameters (in reference sds), the range of sd ratios,
the largest 1-Wasserstein distance (in reference sds), PSIS k-hat, the log-density gradient
evaluations, whether the fit passed the convergence test, and the wall time (indicative only on
a loaded machine). Writes ``benchmarks/results/vi_accuracy_gaussian.json``.

    python benchmarks/vi_accuracy_gaussian.py
    python benchmarks/vi_accuracy_gaussian.py --problems kidiq-kidscore_momiq --guides fullrank
    python benchmarks/vi_accuracy_gaussian.py --init guide --output /tmp/before.json  # the old start
"""

from __future__ import annotations

import argparse
import os
import warnings

import numpy as np
import torch

from vilab.fileio import write_json
from vilab.inference import compare
from vilab.posteriordb import default_posteriordb_path, list_posteriordb, load_posteriordb

__all__ = ["score", "main"]

RESULTS = os.path.join(os.path.dirname(__file__), "results", "vi_accuracy_gaussian.json")
GUIDES = ("meanfield", "fullrank", "lowrank")


def score(name: str, guides, *, seed: int, svi_options: dict) -> list[dict]:
    """One row per guide on posteriordb problem ``name``."""
    problem = load_posteriordb(default_posteriordb_path(), name)
    reference = {k: v.reshape(-1) for k, v in problem.reference_draws.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = compare(
            problem.model,
            *problem.args,
            guides=guides,
            reference=reference,
            seed=seed,
            svi_options=svi_options,
            progress=False,
            **problem.kwargs,
        )
    rows = []
    for guide in guides:
        if guide not in report.methods:
            rows.append({"problem": name, "guide": guide, "failed": report.failures.get(guide, "")})
            continue
        part = report.table[report.table["method"] == guide]
        metrics = report.methods[guide].metrics
        error = part["mean_error_sd"].to_numpy()
        result = report.methods[guide].result
        rows.append(
            {
                "problem": name,
                "guide": guide,
                "max_abs_error_sd": float(np.abs(error).max()),
                "rmse_error_sd": float(np.sqrt(np.mean(error**2))),
                "sd_ratio_min": float(part["sd_ratio"].min()),
                "sd_ratio_max": float(part["sd_ratio"].max()),
                "max_wasserstein_sd": float(part["wasserstein_sd"].max()),
                "k_hat": float(metrics["k_hat"]),
                "gradient_evaluations": result.config.get("gradient_evaluations"),
                "converged": bool(result.converged),
                "num_steps": result.num_steps,
                "init": result.config.get("init", ""),
                "wall_time": float(result.wall_time),
                "warnings": [str(w.message)[:300] for w in caught if guide in str(w.message)],
            }
        )
    return rows


def _print(rows: list[dict]) -> None:
    header = (
        f"{'problem':38s} {'guide':9s} {'max|err|':>8s} {'rmse':>6s} {'sd ratio':>13s} {'maxW1':>6s} "
        f"{'k-hat':>6s} {'grads':>7s} {'conv':>5s} {'steps':>5s} {'sec':>6s}"
    )
    print(header)
    for r in rows:
        if "failed" in r:
            print(f"{r['problem']:38s} {r['guide']:9s} failed: {r['failed'][:80]}")
            continue
        print(
            f"{r['problem']:38s} {r['guide']:9s} {r['max_abs_error_sd']:8.3f} {r['rmse_error_sd']:6.3f} "
            f"{r['sd_ratio_min']:6.3f}-{r['sd_ratio_max']:6.3f} {r['max_wasserstein_sd']:6.3f} "
            f"{r['k_hat']:6.2f} {r['gradient_evaluations']:7d} {str(r['converged']):>5s} {r['num_steps']:5d} "
            f"{r['wall_time']:6.1f}"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="", help="comma-separated posteriordb names (default: all)")
    parser.add_argument("--guides", default=",".join(GUIDES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-steps", type=int, default=2000)
    parser.add_argument("--init", default="auto", help="fit_svi's init: auto, laplace or guide (the old start)")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    names = args.problems.split(",") if args.problems else list_posteriordb(default_posteriordb_path())
    guides = tuple(args.guides.split(","))
    options = {"num_steps": args.num_steps, "init": args.init}
    rows = [row for name in names for row in score(name, guides, seed=args.seed, svi_options=options)]
    _print(rows)
    write_json(
        args.output,
        {
            "seed": args.seed,
            "svi_options": options,
            "rows": rows,
            "note": "wall times measured on a shared, loaded machine: indicative only",
        },
    )


if __name__ == "__main__":
    main()
