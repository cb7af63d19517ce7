"""Every guide and NUTS on every small model, scored against the best reference available.

References: exact posterior draws for the conjugate models, posteriordb's gold-standard draws
for its nine problems, and a long NUTS run for the rest. Prints one table and writes
``benchmarks/results/small_problems.json``.

    python benchmarks/small_problems.py                      # everything (long)
    python benchmarks/small_problems.py --problems eight_schools,normal_normal --guides meanfield,iaf
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import numpy as np
import torch

from vilab.guides import list_guides
from vilab.fileio import write_json
from vilab.inference import compare, run_nuts
from vilab.models import list_models
from vilab.posteriordb import default_posteriordb_path, load_posteriordb

RESULTS = os.path.join(os.path.dirname(__file__), "results", "small_problems.json")
COLUMNS = (
    "mean_abs_error_sd",
    "max_abs_error_sd",
    "mean_abs_log_sd_ratio",
    "mean_wasserstein_sd",
    "k_hat",
    "elbo",
    "wall_time",
    "ess_per_second",
    "num_divergences",
)


def _problems(names):
    """name -> (model, args, kwargs, reference draws or None)."""
    problems = {}
    for spec in list_models():
        if spec.name.startswith("vae") or (names and spec.name.split("/")[-1] not in names and spec.name not in names):
            continue
        if "posteriordb" in spec.tags:
            path = default_posteriordb_path()
            if path is None:
                continue
            problem = load_posteriordb(path, spec.name.split("/", 1)[1])
            problems[spec.name] = (problem.model, problem.args, problem.kwargs, problem.reference_draws)
        elif spec.exact_posterior is not None:
            model, args, kwargs = spec.load()
            torch.manual_seed(0)
            draws = {k: d.sample((10000,)) for k, d in spec.exact_posterior().items()}
            problems[spec.name] = (model, args, kwargs, draws)
        elif (
            "hierarchical" in spec.tags
            or "regression" in spec.tags
            or "mixture" in spec.tags
            or "pathological" in spec.tags
        ):
            model, args, kwargs = spec.load()
            problems[spec.name] = (model, args, kwargs, None)
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="", help="comma-separated model names (default: all)")
    parser.add_argument("--guides", default=",".join(g.name for g in list_guides()))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--nuts", default="1000,1000,4", help="warmup,samples,chains")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    print(" ".join([f"{'problem':<34}", f"{'method':<10}"] + [f"{c[:8]:>8}" for c in COLUMNS]))
    torch.set_default_dtype(torch.float64)
    warmup, samples, chains = (int(v) for v in args.nuts.split(","))
    nuts_options = {"num_warmup": warmup, "num_samples": samples, "num_chains": chains}
    guides = [g for g in args.guides.split(",") if g]
    rows, started = [], time.time()
    for name, (model, margs, mkwargs, reference) in _problems([p for p in args.problems.split(",") if p]).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if reference is None:
                reference = run_nuts(model, *margs, progress=False, **nuts_options, **mkwargs)
            report = compare(
                model,
                *margs,
                guides=guides,
                reference=reference,
                include_nuts=True,
                num_draws=args.draws,
                svi_options={"num_steps": args.steps},
                nuts_options=nuts_options,
                progress=False,
                **mkwargs,
            )
        for method, entry in report.summary.iterrows():
            row = {"problem": name, "method": method, **{c: entry.get(c) for c in COLUMNS}}
            rows.append(row)
            print(_format(row), flush=True)
        for method, reason in report.failures.items():  # a guide that could not be fitted
            rows.append({"problem": name, "method": method, "error": reason})
            print(f"{name[:34]:<34} {method:<10} failed: {reason[:120]}", flush=True)
        # Written after every problem (atomically), so a long run that is stopped keeps its rows.
        write_json(
            args.out,
            {
                "command": "python benchmarks/small_problems.py " + " ".join(os.sys.argv[1:]),
                "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
                "total_seconds": time.time() - started,
                "rows": rows,
            },
        )
    print(f"wrote {args.out} ({time.time() - started:.0f} s)")


def _format(row) -> str:
    cells = [f"{row['problem'][:34]:<34}", f"{row['method']:<10}"]
    for column in COLUMNS:
        value = row[column]
        cells.append(
            f"{'-':>8}"
            if value is None or (isinstance(value, float) and not np.isfinite(value))
            else f"{float(value):>8.3g}"
        )
    return " ".join(cells)


if __name__ == "__main__":
    main()
