"""Warmup iterations NUTS needs to reach a target ESS, started at random or from Pathfinder.

For each posterior and warmup length in a grid, NUTS runs with ``init=None`` (uniform (-2, 2)
starts, identity metric) and ``init="pathfinder"`` (multi-path Pathfinder draws and
covariance), same seeds and draws. The target is a fraction (default 0.8) of the smallest bulk
ESS that the default start reaches with the longest warmup; a run reaches it when its
smallest bulk ESS is at least the target and its largest R-hat below 1.01. Reported: per
start, the shortest warmup in the grid that reaches it (counts, not seconds), and
Pathfinder's own gradient evaluations. Writes ``benchmarks/results/pathfinder_init.json``.

    python benchmarks/pathfinder_init.py
    python benchmarks/pathfinder_init.py --problems kidiq-kidscore_momiq --warmups 25,50,100,1000
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import torch

from vilab.fileio import write_json
from vilab.inference import run_nuts
from vilab.inference.common.diagnostics import nuts_diagnostics
from vilab.posteriordb import default_posteriordb_path, load_posteriordb

RESULTS = os.path.join(os.path.dirname(__file__), "results", "pathfinder_init.json")


def _run(problem, warmup, init, args) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_nuts(
            problem.model,
            *problem.args,
            num_warmup=warmup,
            num_samples=args.samples,
            num_chains=args.chains,
            seed=args.seed,
            init=init,
            dense_mass=args.dense,
            chain_method="sequential",
            progress=False,
            **problem.kwargs,
        )
    diagnostics = nuts_diagnostics(result.inference_data)
    return {
        "warmup": warmup,
        "init": init or "uniform",
        "ess_bulk_min": diagnostics["ess_bulk_min"],
        "r_hat_max": diagnostics["r_hat_max"],
        "num_divergences": diagnostics["num_divergences"],
        "pathfinder_gradient_evaluations": (result.config.get("pathfinder") or {}).get("gradient_evaluations", 0),
    }


def _shortest(rows, init, target) -> int | None:
    reached = [r["warmup"] for r in rows if r["init"] == init and r["ess_bulk_min"] >= target and r["r_hat_max"] < 1.01]
    return min(reached) if reached else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="kidiq-kidscore_momiq,arK-arK")
    parser.add_argument("--warmups", default="25,50,100,200,400,1000")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--fraction", type=float, default=0.8, help="target = fraction x baseline ESS")
    parser.add_argument("--dense", action="store_true", help="dense metric")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    warmups = sorted(int(w) for w in args.warmups.split(","))
    path, summary, rows, started = default_posteriordb_path(), [], [], time.time()
    for name in [p for p in args.problems.split(",") if p]:
        problem = load_posteriordb(path, name)
        problem_rows = []
        for warmup in warmups:
            for init in (None, "pathfinder"):
                row = {"problem": name, **_run(problem, warmup, init, args)}
                problem_rows.append(row)
                print(row, flush=True)
        baseline = next(r for r in problem_rows if r["init"] == "uniform" and r["warmup"] == warmups[-1])
        target = args.fraction * baseline["ess_bulk_min"]
        entry = {
            "problem": name,
            "target_ess": target,
            "warmup_uniform": _shortest(problem_rows, "uniform", target),
            "warmup_pathfinder": _shortest(problem_rows, "pathfinder", target),
            "pathfinder_gradient_evaluations": max(r["pathfinder_gradient_evaluations"] for r in problem_rows),
        }
        summary.append(entry)
        rows.extend(problem_rows)
        print(entry, flush=True)
        write_json(
            args.out,
            {
                "command": "python benchmarks/pathfinder_init.py " + " ".join(os.sys.argv[1:]),
                "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
                "total_seconds": time.time() - started,
                "summary": summary,
                "rows": rows,
            },
        )
    print(f"wrote {args.out} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
