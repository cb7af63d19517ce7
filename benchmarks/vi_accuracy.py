"""VI accuracy against posteriordb references: mean-field, full-rank and DADVI on every posterior.

Posteriors: the nine of ``../shared/posteriordb`` and the twelve ported ones of
``tests/data/posteriordb``. Per posterior and method: max and RMSE over parameters of the mean
error in reference sds (against the full reference's mean and sd from
``reference_summary.json``), the range of the sd ratio (and of the LRVB sd ratio for DADVI), the
mean 1-Wasserstein distance in reference sds (against the reference draws), PSIS k-hat of the
fitted guide, wall time, log-density gradient evaluations and ``converged``. Prints a Markdown
table and writes ``benchmarks/results/vi_accuracy.json``. Wall times on a loaded machine are
indicative only.

    python benchmarks/vi_accuracy.py                                   # everything (long)
    python benchmarks/vi_accuracy.py --methods dadvi,dadvi_iid --posteriors kidiq-kidscore_interaction

Methods are ``fit_svi`` names (``meanfield``, ``fullrank``, ``dadvi``, ... any registered guide
or VI method) plus ``dadvi_iid`` (DADVI with the paper's i.i.d. draws instead of antithetic
pairs). Gradient evaluations: DADVI counts its own (``config["gradient_evaluations"]``); an SVI
fit counts ``num_steps * num_particles``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import traceback
import warnings

import numpy as np
import torch

from vilab.fileio import write_json
from vilab.inference import compare
from vilab.posteriordb import default_posteriordb_path, list_posteriordb, load_posteriordb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORTED = os.path.join(ROOT, "tests", "data", "posteriordb")
RESULTS = os.path.join(ROOT, "benchmarks", "results", "vi_accuracy.json")
# benchmark name -> (fit_svi name, guide options)
ALIASES = {"dadvi_iid": ("dadvi", {"antithetic": False})}


def _posteriors(names: list[str]) -> dict[str, str]:
    """posterior name -> folder holding it (shared references first, then the ported copies)."""
    found = {}
    for folder in (str(default_posteriordb_path()), PORTED):
        for name in list_posteriordb(folder):
            found.setdefault(name, folder)
    unknown = sorted(set(names) - set(found))
    if unknown:
        raise SystemExit(f"--posteriors: unknown {unknown}; known: {sorted(found)}")
    return {name: found[name] for name in (names or sorted(found))}


def _score(problem, method_result, report, name: str) -> dict:
    summary = problem.reference_summary["parameters"]
    draws, result = method_result.draws, method_result.result
    names = [k for k in summary if k in draws]
    errors = np.array([(draws[k].mean() - summary[k]["mean"]) / summary[k]["sd"] for k in names])
    ratios = np.array([draws[k].std(ddof=1) / summary[k]["sd"] for k in names])
    table = report.table[report.table["method"] == method_result.name]
    config = result.config
    gradients = config.get("gradient_evaluations", result.num_steps * config.get("num_particles", 1))
    row = {
        "posterior": problem.name,
        "method": name,
        "num_parameters": len(names),
        "max_abs_error_sd": float(np.abs(errors).max()),
        "rmse_error_sd": float(np.sqrt(np.mean(errors**2))),
        "sd_ratio_min": float(ratios.min()),
        "sd_ratio_max": float(ratios.max()),
        "mean_wasserstein_sd": float(table["wasserstein_sd"].mean()),
        "k_hat": float(method_result.metrics["k_hat"]),
        "wall_time": float(result.wall_time),
        "gradient_evaluations": int(gradients),
        "converged": bool(result.converged),
        "parameters": {k: {"error_sd": float(e), "sd_ratio": float(r)} for k, e, r in zip(names, errors, ratios)},
    }
    if config.get("lrvb_sd"):
        lrvb = np.array([config["lrvb_sd"][k] / summary[k]["sd"] for k in names])
        row.update(lrvb_sd_ratio_min=float(lrvb.min()), lrvb_sd_ratio_max=float(lrvb.max()))
        for k, r in zip(names, lrvb):
            row["parameters"][k]["lrvb_sd_ratio"] = float(r)
    return row


def run_one(name: str, folder: str, method: str, args) -> dict:
    problem = load_posteriordb(folder, name)
    guide, options = ALIASES.get(method, (method, {}))
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = compare(
            problem.model,
            *problem.args,
            guides=(guide,),
            reference=problem.reference_draws,
            seed=args.seed,
            num_draws=args.num_draws,
            progress=False,
            svi_options={"num_steps": args.steps},
            guide_options={guide: options},
            **problem.kwargs,
        )
    if guide in report.failures:
        return {"posterior": name, "method": method, "error": report.failures[guide]}
    row = _score(problem, report.methods[guide], report, method)
    row["total_seconds"] = time.perf_counter() - start
    row["warnings"] = sorted({str(w.message)[:200] for w in caught if issubclass(w.category, RuntimeWarning)})
    return row


def _range(row, low, high) -> str:
    return f"{row[low]:.2f}-{row[high]:.2f}" if low in row else ""


def markdown(rows: list[dict]) -> str:
    header = (
        "| posterior | method | max err | RMSE err | sd ratio | LRVB sd ratio | W1 | k-hat | time (s) "
        "| grad evals | converged |"
    )
    lines = [header, "|" + "---|" * 11]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['posterior']} | {row['method']} | failed: {row['error'][:80]} |" + " |" * 8)
            continue
        lines.append(
            f"| {row['posterior']} | {row['method']} | {row['max_abs_error_sd']:.3f} | "
            f"{row['rmse_error_sd']:.3f} | {_range(row, 'sd_ratio_min', 'sd_ratio_max')} | "
            f"{_range(row, 'lrvb_sd_ratio_min', 'lrvb_sd_ratio_max')} | {row['mean_wasserstein_sd']:.3f} | "
            f"{row['k_hat']:.2f} | {row['wall_time']:.1f} | {row['gradient_evaluations']} | "
            f"{row['converged']} |"
        )
    return "\n".join(lines)


def medians(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per method, the median over posteriors of the RMSE and max of the mean error."""
    out = {}
    for method in sorted({r["method"] for r in rows}):
        scored = [r for r in rows if r["method"] == method and "error" not in r]
        if scored:
            out[method] = {
                "median_rmse_error_sd": float(np.median([r["rmse_error_sd"] for r in scored])),
                "median_max_abs_error_sd": float(np.median([r["max_abs_error_sd"] for r in scored])),
                "num_posteriors": len(scored),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posteriors", default="", help="comma-separated posteriordb names (default: all)")
    parser.add_argument("--methods", default="meanfield,fullrank,dadvi")
    parser.add_argument("--steps", type=int, default=10000, help="SVI steps (fit_svi's num_steps)")
    parser.add_argument("--num-draws", type=int, default=4000, help="guide draws for the metrics and PSIS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    posteriors = _posteriors([n for n in args.posteriors.split(",") if n])
    rows = []
    for name, folder in posteriors.items():
        for method in [m for m in args.methods.split(",") if m]:
            try:
                row = run_one(name, folder, method, args)
            except Exception as error:  # noqa: BLE001 -- one failure must not cost the rest of the table
                row = {
                    "posterior": name,
                    "method": method,
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc(),
                }
            rows.append(row)
            print(markdown([row]).splitlines()[-1], flush=True)
            write_json(
                args.out,
                {
                    "rows": rows,
                    "medians": medians(rows),
                    "steps": args.steps,
                    "num_draws": args.num_draws,
                    "seed": args.seed,
                    "torch": torch.__version__,
                    "machine": platform.platform(),
                    "cpus": os.cpu_count(),
                },
            )
    print()
    print(markdown(rows))
    for method, entry in medians(rows).items():
        print(
            f"{method}: median RMSE of mean error {entry['median_rmse_error_sd']:.3f} ref sd over "
            f"{entry['num_posteriors']} posteriors"
        )


if __name__ == "__main__":
    main()
