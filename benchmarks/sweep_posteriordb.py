"""Every posteriordb posterior x methods x seeds: as one Ray sweep, and the same tasks one after another.

Runs ``vilab.sweep`` over ``posteriordb/*`` (every posterior with a Pyro port under the folder)
x ``--methods`` x ``--num-seeds`` seeds on a local Ray cluster (or ``--address``), then the same
tasks serially in this process, checks that both stores hold the same numbers, and writes
``benchmarks/results/sweep_posteriordb.json`` and the Ray run's leaderboard
(``OUT/ray/leaderboard.html`` and ``.csv``). Methods that are not registered in this checkout
(e.g. ``dadvi`` or ``pathfinder`` before their branches merge) are left out and listed as such.

    .venv/bin/python benchmarks/sweep_posteriordb.py                       # the full measurement
    .venv/bin/python benchmarks/sweep_posteriordb.py --models posteriordb/kidiq-kidscore_momiq \\
        --methods meanfield,nuts --num-seeds 1 --steps 300 --samples 200 --warmup 200   # a small check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import shutil
import time
from pathlib import Path

import pandas as pd

DEFAULT_METHODS = "meanfield,fullrank,dadvi,pathfinder,nuts"
TIMING_COLUMNS = [
    "finished_at",
    "task_seconds",
    "wall_time",
    "ess_per_second",
    "host",
    "node_id",
    "node_ip",
    "ray_version",
]


def _available(methods: list[str]) -> tuple[list[str], list[str]]:
    from vilab.guides import list_guides
    from vilab.inference.vi import METHODS

    known = {"nuts", *(g.name for g in list_guides()), *METHODS}
    return [m for m in methods if m in known], [m for m in methods if m not in known]


def _same_numbers(first: pd.DataFrame, second: pd.DataFrame) -> bool:
    def strip(frame):
        return frame.drop(columns=[c for c in TIMING_COLUMNS if c in frame]).set_index("task_id").sort_index()

    try:
        pd.testing.assert_frame_equal(strip(first), strip(second))
    except AssertionError:
        return False
    return True


def _per_method(results: pd.DataFrame) -> dict:
    from vilab.inference.sweep import leaderboard_table

    table = leaderboard_table(results)
    summary = table.groupby("method").agg(
        models=("model", "nunique"),
        seeds_ok=("num_ok", "sum"),
        tasks=("num_tasks", "sum"),
        mean_abs_error_sd=("mean_abs_error_sd", "mean"),
        gradient_evaluations=("num_gradient_evaluations", "median"),
        seconds=("wall_time", "median"),
    )
    return json.loads(summary.to_json(orient="index"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posteriordb", default=None, help="posteriordb folder (default ../shared/posteriordb)")
    parser.add_argument("--models", default="posteriordb/*", help="comma-separated models (default every posterior)")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--num-seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, help="max SVI steps (default: the sweep's, 2000)")
    parser.add_argument("--samples", type=int, help="NUTS draws per chain (default 1000)")
    parser.add_argument("--warmup", type=int, help="NUTS warmup per chain (default 1000)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="a Ray cluster (default: local)")
    parser.add_argument("--out", default="runs/sweep_posteriordb")
    parser.add_argument("--skip-sequential", action="store_true", help="only the Ray sweep")
    parser.add_argument("--json", default="benchmarks/results/sweep_posteriordb.json")
    args = parser.parse_args()

    from vilab.inference.sweep import read_results, sweep
    from vilab.posteriordb import default_posteriordb_path

    methods, unavailable = _available([m.strip() for m in args.methods.split(",") if m.strip()])
    if unavailable:
        print(f"not registered in this checkout, left out: {', '.join(unavailable)}")
    posteriordb = args.posteriordb or str(default_posteriordb_path())
    options = {
        "posteriordb": posteriordb,
        "svi_options": {"num_steps": args.steps} if args.steps else {},
        "nuts_options": {k: v for k, v in (("num_samples", args.samples), ("num_warmup", args.warmup)) if v},
    }
    grid = ([m.strip() for m in args.models.split(",")], methods, list(range(args.num_seeds)))
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # a timing starts from an empty store
    runs = {}
    start = time.perf_counter()
    on_ray = sweep(*grid, out=out / "ray", address=args.address, **options)
    runs["ray"] = {"wall_seconds": time.perf_counter() - start, "done": on_ray.num_done, "failed": on_ray.num_failed}
    if not args.skip_sequential:
        start = time.perf_counter()
        serial = sweep(*grid, out=out / "sequential", serial=True, **options)
        runs["sequential"] = {
            "wall_seconds": time.perf_counter() - start,
            "done": serial.num_done,
            "failed": serial.num_failed,
        }
        runs["speedup"] = runs["sequential"]["wall_seconds"] / runs["ray"]["wall_seconds"]
        runs["same_numbers"] = _same_numbers(read_results(on_ray.store), read_results(serial.store))
    results = read_results(on_ray.store)
    record = {
        "benchmark": "sweep_posteriordb",
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "models": sorted(results["model"].unique()),
        "methods": methods,
        "unavailable_methods": unavailable,
        "seeds": grid[2],
        "num_tasks": on_ray.num_tasks,
        "runs": runs,
        "per_method": _per_method(results),
        "leaderboard": str(on_ray.leaderboard),
        "store": str(on_ray.store),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(json.dumps(runs, indent=2))
    print(f"wrote {args.json}; leaderboard {on_ray.leaderboard}")


if __name__ == "__main__":
    main()
