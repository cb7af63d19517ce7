"""What vilab does with each zoo model: NUTS path, SVI path, ``compare``, time and accuracy.

Usage::

    python benchmarks/zoo_table.py                # all models, one subprocess each
    python benchmarks/zoo_table.py coin_fairness  # some of them

For each model (``tests/models/zoo``) it runs ``vilab.run_nuts`` (4 chains x (500 + 500)),
``vilab.fit_svi`` with ``meanfield`` and ``fullrank`` (2000 steps) and ``vilab.compare``
(``meanfield`` against the stored reference draws), records the path each took (vectorized
sampler or fallback to Pyro's NUTS, compiled SVI step or fallback, refusal), the warnings, the
seconds, and the accuracy against the reference: NUTS means in combined Monte Carlo standard
errors (``check.nuts_z_scores``), guide means in reference sds and PSIS k-hat. Writes
``benchmarks/results/zoo.json`` and prints the markdown table of ``docs/zoo.md``.
Timings depend on the machine's load; the paths and errors do not.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import warnings

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "models"))

__all__ = ["run_model", "main"]

RESULTS = os.path.join(ROOT, "benchmarks", "results", "zoo.json")
NUTS_OPTIONS = dict(num_samples=500, num_warmup=500, num_chains=4, seed=0, progress=False)
SVI_OPTIONS = dict(num_steps=2000, seed=0, progress=False)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _caught(function):
    """Run ``function``; returns (value or None, warnings as text, error text or None, seconds)."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value, error = function(), None
        except Exception as exception:  # noqa: BLE001 - the table records every failure
            value, error = None, f"{type(exception).__name__}: {_short(exception)}"
            traceback.print_exc()
    messages = [
        _short(w.message)
        for w in caught
        if issubclass(w.category, (RuntimeWarning, UserWarning))
        and "vilab" in str(w.filename) + str(w.message)
        or "fit_svi" in str(w.message)
        or "run_nuts" in str(w.message)
        or "compare" in str(w.message)
    ]
    return value, sorted(set(messages)), error, time.perf_counter() - start


def _nuts(entry, model, args, kwargs):
    import arviz as az
    import vilab
    from zoo.check import tensor_draws
    from zoo.modes import fold_weights

    fold = entry.options.get("fold")  # non-equivalent modes: start in one, weigh (zoo/modes.py)
    options = dict(NUTS_OPTIONS, init_values=fold["init_values"]) if fold else NUTS_OPTIONS
    result, messages, error, seconds = _caught(lambda: vilab.run_nuts(model, *args, **options, **kwargs))
    record = {"seconds": seconds, "warnings": messages, "error": error}
    if result is None:
        record["path"] = "refused" if error and error.startswith(("ValueError", "TypeError")) else "crashed"
        return record
    config = result.config
    record.update(
        path=config.get("backend"),
        leaf_backend=config.get("leaf_backend"),
        fuse_decision=str(config.get("fuse_decision")),
        divergences=result.num_divergences,
        wall_time=result.wall_time,
    )
    try:
        num_chains, num_draws = next(iter(result.samples.values())).shape[:2]
        draws = tensor_draws(result.samples, 2)
        weights = np.full(num_chains * num_draws, 1.0 / (num_chains * num_draws))
        if fold:
            weights, record["in_mode"], record["mode_mass"] = fold_weights(fold, draws, entry.data())
        kish = 1.0 / np.sum(weights**2) / weights.size
        summary = {}
        for name, values in entry.stats(draws).items():
            chains = np.asarray(values, dtype=float).reshape(num_chains, num_draws)
            ess = float(az.ess(chains)) * kish if np.ptp(chains) > 0 else 1.0
            mean = float(np.sum(weights * chains.ravel()))
            sd = float(np.sqrt(np.sum(weights * (chains.ravel() - mean) ** 2)))
            summary[name] = {"mean": mean, "sd": sd, "ess": ess}
        record["statistics"] = summary
    except Exception as exception:  # noqa: BLE001 - e.g. a statistic's site missing from the samples
        record["check_error"] = f"{type(exception).__name__}: {_short(exception)}"
    return record


def _svi(entry, model, args, kwargs, guide):
    import vilab
    from vilab.inference.common.diagnostics import psis
    from zoo.check import tensor_draws

    result, messages, error, seconds = _caught(lambda: vilab.fit_svi(model, guide, *args, **SVI_OPTIONS, **kwargs))
    record = {"seconds": seconds, "warnings": messages, "error": error}
    if result is None:
        record["path"] = "refused" if error and error.startswith(("ValueError", "TypeError")) else "crashed"
        return record
    record.update(
        path=result.config.get("backend"),
        converged=bool(result.converged),
        num_steps=result.num_steps,
        final_loss=float(np.mean(result.losses[-50:])),
    )
    try:
        draws = result.draws(4000, seed=0)
        log_weights = np.asarray(draws.log_weights.detach(), dtype=float)
        smoothed = psis(log_weights)
        weights = np.exp(smoothed.log_weights - np.logaddexp.reduce(smoothed.log_weights))
        summary = {}
        for name, values in entry.stats(tensor_draws(draws.samples, 1)).items():
            values = np.asarray(values, dtype=float)
            weighted = float(np.sum(weights * values))
            summary[name] = {
                "mean": float(values.mean()),
                "sd": float(values.std(ddof=1)),
                "psis_mean": weighted,
                "psis_sd": float(np.sqrt(max(np.sum(weights * (values - weighted) ** 2), 0.0))),
            }
        record.update(k_hat=smoothed.k_hat, psis_ess=smoothed.ess, statistics=summary)
    except Exception as exception:  # noqa: BLE001
        record["check_error"] = f"{type(exception).__name__}: {_short(exception)}"
    return record


def score(record: dict, reference: dict) -> None:
    """Add accuracy against ``reference`` to a model's record (in place)."""
    from zoo.check import z_threshold

    summary = reference["summary"]
    nuts = record.get("nuts", {})
    if "statistics" in nuts:
        scores = {}
        for name, ref in summary.items():
            mine = nuts["statistics"].get(name)
            if mine is None:
                continue
            error = np.sqrt(mine["sd"] ** 2 / max(mine["ess"], 1.0) + ref["sd"] ** 2 / ref["ess"])
            scores[name] = (mine["mean"] - ref["mean"]) / error
        if scores:
            nuts.update(
                z_scores=scores,
                max_abs_z=max(abs(z) for z in scores.values()),
                z_threshold=z_threshold(len(scores)),
                missing=sorted(set(summary) - set(scores)),
            )
    for guide in ("meanfield", "fullrank"):
        fit = record.get(guide, {})
        if "statistics" not in fit:
            continue
        errors = {
            k: (fit["statistics"][k]["mean"] - ref["mean"]) / ref["sd"]
            for k, ref in summary.items()
            if k in fit["statistics"]
        }
        fit["max_abs_mean_error_sd"] = max(abs(v) for v in errors.values()) if errors else None
        fit["max_sd_ratio_deviation"] = (
            max(
                abs(np.log(fit["statistics"][k]["sd"] / ref["sd"]))
                for k, ref in summary.items()
                if k in fit["statistics"]
            )
            if errors
            else None
        )
        if np.isfinite(fit["k_hat"]) and fit["k_hat"] < 0.7:
            psis_scores = {
                k: (fit["statistics"][k]["psis_mean"] - ref["mean"])
                / np.sqrt(
                    fit["statistics"][k]["psis_sd"] ** 2 / max(fit["psis_ess"], 1.0) + ref["sd"] ** 2 / ref["ess"]
                )
                for k, ref in summary.items()
                if k in fit["statistics"]
            }
            fit["max_abs_psis_z"] = max(abs(v) for v in psis_scores.values()) if psis_scores else None


def _compare(entry, model, args, kwargs, reference):
    import vilab

    if reference is None:
        return {"error": "not run: no reference yet"}

    report, messages, error, seconds = _caught(
        lambda: vilab.compare(
            model,
            *args,
            guides=("meanfield",),
            reference=reference["draws"],
            svi_options=dict(num_steps=1000),
            num_draws=1000,
            progress=False,
            **kwargs,
        )
    )
    record = {"seconds": seconds, "warnings": messages, "error": error}
    if report is not None:  # a guide that failed leaves no rows (an empty table) and a failure
        parameters = report.table["parameter"] if len(report.table) else []
        record.update(rows=int(len(report.table)), failures=report.failures, parameters=sorted(set(parameters)))
    return record


def run_model(name: str, report=None) -> dict:
    """Everything for one model, in this process; ``report(record)`` after each stage (so that a
    timeout keeps the stages that finished)."""
    import torch

    torch.set_default_dtype(torch.float64)
    from zoo import by_name, load_reference

    entry = by_name(name)
    try:
        reference = load_reference(entry)
    except FileNotFoundError:
        reference = None
    record = {
        "name": name,
        "kind": entry.kind,
        "source": entry.source,
        "features": list(entry.features),
        "reference": reference["kind"] if reference else None,
        "note": entry.note,
    }
    built = lambda: entry.inputs(entry.data())  # noqa: E731 - a fresh model (PyroModule state) per method
    stages = [("nuts", lambda: _nuts(entry, *built()))]
    stages += [(guide, lambda guide=guide: _svi(entry, *built(), guide)) for guide in ("meanfield", "fullrank")]
    stages += [("compare", lambda: _compare(entry, *built(), reference))]
    for stage, run in stages:
        record[stage] = run()
        if reference is not None:
            score(record, reference)
        if report is not None:
            report(record)
    return record


def rescore(records: list) -> None:
    """Score records whose reference appeared after they ran (their compare stays not run)."""
    from zoo import by_name, load_reference

    for record in records:
        try:
            reference = load_reference(by_name(record["name"]))
        except FileNotFoundError:
            continue
        record["reference"] = reference["kind"]
        score(record, reference)


def _run_isolated(name: str, timeout: float) -> dict:
    """One model in a subprocess, so a hang or a crash costs one row, not the table."""
    command = [sys.executable, __file__, "--one", name]
    # A session of its own, so that a timeout also ends the sampler's forked workers.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, _ = process.communicate()  # what the stages that finished reported
        partial = [line for line in stdout.splitlines() if line.startswith("{")]
        record = json.loads(partial[-1]) if partial else {"name": name}
        record["error"] = f"timed out after {timeout:.0f} s"
        return record
    done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"name": name, "error": f"exit {done.returncode}: {_short(done.stderr[-600:])}"}
    record = json.loads(lines[-1])
    if "Traceback" in done.stderr:  # the full story of a crash the record shortens
        record["stderr_tail"] = done.stderr[-4000:]
    return record


def _cell(record: dict) -> str:
    if record.get("error") and record.get("path") in (None, "refused", "crashed"):
        return f"{record.get('path', 'error')}: {record['error'][:90]}"
    path = record.get("path", "?")
    fallback = any("falling back" in w for w in record.get("warnings", []))
    return f"{path}{' (fallback)' if fallback else ''}"


def table(records: list) -> str:
    """The markdown table of docs/zoo.md."""
    lines = [
        "| model | kind | NUTS path | NUTS s | NUTS max abs z (limit) | meanfield path | k-hat | "
        "fullrank path | k-hat | compare |",
        "|---" * 10 + "|",
    ]
    for r in records:
        if "nuts" not in r:
            lines.append(f"| {r['name']} | | {r.get('error', '')} | | | | | | | |")
            continue
        # A stage a timeout cut off (the record's error says after how long) shows as such.
        cut = {"path": "timed out", "error": r.get("error", "")}
        nuts, mf, fr, cmp = (r.get(stage, cut) for stage in ("nuts", "meanfield", "fullrank", "compare"))
        z = (
            f"{nuts['max_abs_z']:.1f} ({nuts['z_threshold']:.1f})"
            if "max_abs_z" in nuts
            else nuts.get("check_error", "")
        )
        k = lambda s: f"{s['k_hat']:.2f}" if "k_hat" in s else ""  # noqa: E731
        compared = f"{cmp['rows']} rows" if cmp.get("error") is None else cmp["error"][:60]
        if "timed out" in r.get("error", "") and cmp is cut:
            compared = "timed out"
        if cmp.get("failures"):
            compared += "; failed: " + "; ".join(f"{k}: {v[:60]}" for k, v in cmp["failures"].items())
        lines.append(
            f"| {r['name']} | {r['kind']} | {_cell(nuts)} | {nuts['seconds']:.0f} | {z} | {_cell(mf)} | "
            f"{k(mf)} | {_cell(fr)} | {k(fr)} | {compared} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*")
    parser.add_argument("--one", help="run one model in this process and print its JSON record")
    # NUTS, two SVI fits and compare together: generous, for a loaded machine
    parser.add_argument("--timeout", type=float, default=2400.0, help="seconds per model")
    parser.add_argument("--output", default=RESULTS, help="JSON file to add the models to")
    parser.add_argument("--rescore", action="store_true", help="only score the stored records again")
    parser.add_argument("--merge", nargs="*", default=[], help="also take the records of these JSON files")
    args = parser.parse_args(argv)
    if args.one:
        run_model(args.one, report=lambda record: print(json.dumps(record, default=str), flush=True))
        return 0
    from zoo import ZOO

    previous = {}
    if os.path.exists(args.output):
        with open(args.output) as handle:
            previous = {r["name"]: r for r in json.load(handle)["models"]}
    for path in args.merge:
        with open(path) as handle:
            previous.update({r["name"]: r for r in json.load(handle)["models"]})
    names = [] if args.rescore else (args.names or [e.name for e in ZOO])
    for name in names:
        previous[name] = _run_isolated(name, args.timeout)
        print(f"{name}: done", flush=True)
        _write(args.output, [previous[e.name] for e in ZOO if e.name in previous])
    ordered = [previous[e.name] for e in ZOO if e.name in previous]
    if args.rescore:
        rescore(ordered)
        _write(args.output, ordered)
    print(table(ordered))
    return 0


def _write(path: str, records: list) -> None:
    with open(path, "w") as handle:
        json.dump({"nuts": NUTS_OPTIONS, "svi": SVI_OPTIONS, "models": records}, handle, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
