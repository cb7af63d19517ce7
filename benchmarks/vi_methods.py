"""Pathfinder, multi-path Pathfinder and batch-and-match beside ADVI and NUTS on posteriordb.

For every posterior in the posteriordb references and every method: the largest and the
root-mean-square error of the posterior means in reference sds, the mean absolute log sd
ratio, the mean 1-Wasserstein distance (in reference sds), PSIS k-hat, wall time, gradient
evaluations and the method's own convergence verdict. Multi-path Pathfinder is scored on its
PSIS-resampled draws (the method's output, paper's Algorithm 2); its k-hat is that of its
mixture. Writes ``benchmarks/results/vi_methods.json``.

Gradient evaluations: SVI (meanfield, fullrank) one per step and particle; Pathfinder its
L-BFGS objective calls (ELBO draws need the density only and are counted apart); BaM one per
draw; NUTS the leapfrog steps of the kept draws (warmup is not recorded, so this is a lower
bound).

    python benchmarks/vi_methods.py                                   # every posterior
    python benchmarks/vi_methods.py --problems kidiq-kidscore_momiq --methods pathfinder,bam
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings

import numpy as np
import torch
from scipy.stats import wasserstein_distance

from vilab.fileio import write_json
from vilab.inference import compare
from vilab.samples import flatten_samples
from vilab.inference.vi.pathfinder import resample_draws
from vilab.posteriordb import default_posteriordb_path, list_posteriordb, load_posteriordb

RESULTS = os.path.join(os.path.dirname(__file__), "results", "vi_methods.json")
DEFAULT_METHODS = "pathfinder,multipathfinder,bam,gsm,meanfield,fullrank,nuts"
COLUMNS = (
    "max_abs_error_sd",
    "rmse_error_sd",
    "mean_abs_log_sd_ratio",
    "mean_wasserstein_sd",
    "k_hat",
    "wall_time",
    "gradient_evaluations",
    "converged",
)


def _gradient_evaluations(method) -> float:
    config = method.result.config
    if method.kind == "nuts":
        return float(method.result.sample_stats["n_steps"].sum())
    if "gradient_evaluations" in config:
        return float(config["gradient_evaluations"])
    return float(method.result.num_steps * config.get("num_particles", 1))


def _errors(draws: dict, reference: dict) -> dict:
    """Error columns of flat ``draws`` against flat ``reference`` (shared names only)."""
    names = [n for n in reference if n in draws]
    errors, log_ratios, distances = [], [], []
    for name in names:
        ref = np.asarray(reference[name]).reshape(-1)
        ours = np.asarray(draws[name]).reshape(-1)
        sd = ref.std(ddof=1)
        errors.append((ours.mean() - ref.mean()) / sd)
        log_ratios.append(abs(np.log(ours.std(ddof=1) / sd)))
        distances.append(wasserstein_distance(ours, ref) / sd)
    errors = np.abs(errors)
    return {
        "max_abs_error_sd": float(errors.max()),
        "rmse_error_sd": float(np.sqrt(np.mean(errors**2))),
        "mean_abs_log_sd_ratio": float(np.mean(log_ratios)),
        "mean_wasserstein_sd": float(np.mean(distances)),
    }


def _rows(name, report, num_draws, seed) -> list[dict]:
    rows = []
    for method_name, method in report.methods.items():
        draws = method.draws
        if method_name == "multipathfinder":
            draws = flatten_samples(resample_draws(method.result, num_draws, seed=seed), 1)
        k_hat = method.result.config.get("k_hat", method.metrics.get("k_hat")) if method.kind == "vi" else None
        converged = (
            method.metrics.get("converged")
            if method.kind == "vi"
            else bool(method.metrics["r_hat_max"] < 1.01 and method.metrics["num_divergences"] == 0)
        )
        rows.append(
            {
                "problem": name,
                "method": method_name,
                **_errors(draws, report.reference),
                "k_hat": k_hat,
                "wall_time": method.metrics["wall_time"],
                "gradient_evaluations": _gradient_evaluations(method),
                "converged": converged,
            }
        )
    return rows


def _compare(problem, method, args, svi_options, nuts):
    warmup, samples, chains = nuts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compare(
            problem.model,
            *problem.args,
            guides=[] if method == "nuts" else [method],
            reference=problem.reference_draws,
            include_nuts=method == "nuts",
            num_draws=args.draws,
            seed=args.seed,
            svi_options=svi_options,
            nuts_options={"num_warmup": warmup, "num_samples": samples, "num_chains": chains},
            progress=False,
            **problem.kwargs,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="", help="comma-separated posteriordb names (default: all)")
    parser.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated (default {DEFAULT_METHODS}); any fit_svi guide or method name, e.g. dadvi, and nuts",
    )
    parser.add_argument("--steps", type=int, default=3000, help="SVI steps (meanfield, fullrank)")
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--nuts", default="1000,1000,4", help="warmup,samples,chains")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument(
        "--render", metavar="JSON", nargs="+", help="print the rows of these result files as a markdown table and exit"
    )
    args = parser.parse_args()
    if args.render:
        print(markdown([row for path in args.render for row in json.load(open(path))["rows"]]))
        return
    torch.set_default_dtype(torch.float64)
    path = default_posteriordb_path()
    names = [p for p in args.problems.split(",") if p] or list_posteriordb(path)
    methods = [m for m in args.methods.split(",") if m]
    warmup, samples, chains = (int(v) for v in args.nuts.split(","))
    print(" ".join([f"{'problem':<36}", f"{'method':<16}"] + [f"{c[:9]:>9}" for c in COLUMNS]), flush=True)
    rows, started = [], time.time()
    for name in names:
        problem = load_posteriordb(path, name)
        for method in methods:
            note, crash = "", ""
            try:
                report = _compare(problem, method, args, {"num_steps": args.steps}, (warmup, samples, chains))
            except RuntimeError as error:
                crash = f"{type(error).__name__}: {error}"
                if method in ("meanfield", "fullrank"):
                    # The compiled SVI step can fail where Pyro's SVI runs: same objective, slower.
                    note = f"backend pyro (the compiled step failed: {error})"
                    report = _compare(
                        problem, method, args, {"num_steps": args.steps, "backend": "pyro"}, (warmup, samples, chains)
                    )
                else:  # one method's crash must not cost the table the others
                    report = None
            failures = report.failures if report is not None else {method: crash}
            for row in _rows(name, report, args.draws, args.seed) if report is not None else []:
                row.update({"note": note} if note else {})
                rows.append(row)
                print(_format(row), flush=True)
            for failed, reason in failures.items():
                rows.append({"problem": name, "method": failed, "error": reason})
                print(f"{name[:36]:<36} {failed:<16} failed: {reason[:100]}", flush=True)
        write_json(
            args.out,
            {
                "command": "python benchmarks/vi_methods.py " + " ".join(os.sys.argv[1:]),
                "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
                "total_seconds": time.time() - started,
                "rows": rows,
            },
        )
    print(f"wrote {args.out} ({time.time() - started:.0f} s)")


def markdown(rows) -> str:
    """The rows as a markdown table, one line per problem and method, failures included."""
    header = (
        "| problem | method | max err (sd) | RMS err (sd) | mean abs log sd ratio | W1 (sd) | k-hat | "
        "wall s | gradient evals | converged |"
    )
    lines = [header, "|" + "---|" * 10]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['problem']} | {row['method']} | failed: {row['error'][:60]} |" + " |" * 7)
            continue
        cells = [row["problem"], row["method"]]
        for column in COLUMNS:
            value = row[column]
            cells.append("-" if value is None else str(value) if isinstance(value, bool) else f"{float(value):.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format(row) -> str:
    cells = [f"{row['problem'][:36]:<36}", f"{row['method']:<16}"]
    for column in COLUMNS:
        value = row[column]
        if isinstance(value, bool) or value is None:
            cells.append(f"{str(value):>9}")
        else:
            cells.append(f"{float(value):>9.3g}")
    return " ".join(cells)


if __name__ == "__main__":
    main()
