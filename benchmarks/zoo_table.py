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
    messages = [_short(w.message) for w in caught
                if issubclass(w.category, (RuntimeWarning, UserWarning)) and "vilab" in str(w.filename) + str(w.message)
                or "fit_svi" in str(w.message) or "run_nuts" in str(w.message) or "compare" in str(w.message)]
    return value, sorted(set(messages)), error, time.perf_counter() - start


def _nuts(entry, model, args, kwargs, reference):
    import vilab
    from zoo.check import nuts_z_scores, z_threshold

    result, messages, error, seconds = _caught(lambda: vilab.run_nuts(model, *args, **NUTS_OPTIONS, **kwargs))
    record = {"seconds": seconds, "warnings": messages, "error": error}
    if result is None:
        record["path"] = "refused" if error and error.startswith(("ValueError", "TypeError")) else "crashed"
        return record
    config = result.config
    record.update(path=config.get("backend"), leaf_backend=config.get("leaf_backend"),
                  fuse_decision=str(config.get("fuse_decision")), divergences=result.num_divergences,
                  wall_time=result.wall_time)
    try:
        scores = nuts_z_scores(entry, result.samples, reference)
        record.update(z_scores=scores, max_abs_z=max(abs(z) for z in scores.values()),
                      z_threshold=z_threshold(len(scores)))
    except Exception as exception:  # noqa: BLE001 - e.g. a statistic's site missing from the samples
        record["check_error"] = f"{type(exception).__name__}: {_short(exception)}"
    return record


def _svi(entry, model, args, kwargs, reference, guide):
    import vilab
    from vilab.inference.diagnostics import psis
    from zoo.check import tensor_draws, weighted_z_scores

    result, messages, error, seconds = _caught(lambda: vilab.fit_svi(model, guide, *args, **SVI_OPTIONS, **kwargs))
    record = {"seconds": seconds, "warnings": messages, "error": error}
    if result is None:
        record["path"] = "refused" if error and error.startswith(("ValueError", "TypeError")) else "crashed"
        return record
    record.update(path=result.config.get("backend"), converged=bool(result.converged), num_steps=result.num_steps,
                  final_loss=float(np.mean(result.losses[-50:])))
    try:
        draws = result.draws(4000, seed=0)
        log_weights = np.asarray(draws.log_weights.detach(), dtype=float)
        smoothed = psis(log_weights)
        statistics = entry.stats(tensor_draws(draws.samples, 1))
        errors = {k: (float(np.mean(statistics[k])) - ref["mean"]) / ref["sd"] for k, ref in reference["summary"].items()}
        record.update(k_hat=smoothed.k_hat, psis_ess=smoothed.ess,
                      max_abs_mean_error_sd=max(abs(v) for v in errors.values()))
        if np.isfinite(smoothed.k_hat) and smoothed.k_hat < 0.7:
            scores = weighted_z_scores(entry, draws.samples, smoothed.log_weights, smoothed.ess, reference)
            record["max_abs_psis_z"] = max(abs(z) for z in scores.values())
    except Exception as exception:  # noqa: BLE001
        record["check_error"] = f"{type(exception).__name__}: {_short(exception)}"
    return record


def _compare(entry, model, args, kwargs, reference):
    import vilab

    report, messages, error, seconds = _caught(lambda: vilab.compare(
        model, *args, guides=("meanfield",), reference=reference["draws"], svi_options=dict(num_steps=1000),
        num_draws=1000, progress=False, **kwargs))
    record = {"seconds": seconds, "warnings": messages, "error": error}
    if report is not None:
        record.update(rows=int(len(report.table)), failures=report.failures,
                      parameters=sorted(set(report.table["parameter"])))
    return record


def run_model(name: str) -> dict:
    """Everything for one model, in this process."""
    import torch

    torch.set_default_dtype(torch.float64)
    from zoo import by_name, load_reference

    entry = by_name(name)
    reference = load_reference(entry)
    record = {"name": name, "kind": entry.kind, "source": entry.source, "features": list(entry.features),
              "reference": reference["kind"], "note": entry.note}
    built = lambda: entry.inputs(entry.data())  # noqa: E731 - a fresh model (PyroModule state) per method
    record["nuts"] = _nuts(entry, *built(), reference)
    for guide in ("meanfield", "fullrank"):
        record[guide] = _svi(entry, *built(), reference, guide)
    record["compare"] = _compare(entry, *built(), reference)
    return record


def _run_isolated(name: str, timeout: float) -> dict:
    """One model in a subprocess, so a hang or a crash costs one row, not the table."""
    command = [sys.executable, __file__, "--one", name]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"name": name, "error": f"exit {done.returncode}: {_short(done.stderr[-600:])}"}
    return json.loads(lines[-1])


def _cell(record: dict) -> str:
    if record.get("error") and record.get("path") in (None, "refused", "crashed"):
        return f"{record.get('path', 'error')}: {record['error'][:90]}"
    path = record.get("path", "?")
    fallback = any("falling back" in w for w in record.get("warnings", []))
    return f"{path}{' (fallback)' if fallback else ''}"


def table(records: list) -> str:
    """The markdown table of docs/zoo.md."""
    lines = ["| model | kind | NUTS path | NUTS s | NUTS max abs z (limit) | meanfield path | k-hat | "
             "fullrank path | k-hat | compare |", "|---" * 10 + "|"]
    for r in records:
        if "nuts" not in r:
            lines.append(f"| {r['name']} | | {r.get('error', '')} | | | | | | | |")
            continue
        nuts, mf, fr, cmp = r["nuts"], r["meanfield"], r["fullrank"], r["compare"]
        z = f"{nuts['max_abs_z']:.1f} ({nuts['z_threshold']:.1f})" if "max_abs_z" in nuts else nuts.get("check_error", "")
        k = lambda s: f"{s['k_hat']:.2f}" if "k_hat" in s else ""  # noqa: E731
        compared = f"{cmp['rows']} rows" if cmp.get("error") is None else cmp["error"][:60]
        lines.append(f"| {r['name']} | {r['kind']} | {_cell(nuts)} | {nuts['seconds']:.0f} | {z} | {_cell(mf)} | "
                     f"{k(mf)} | {_cell(fr)} | {k(fr)} | {compared} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*")
    parser.add_argument("--one", help="run one model in this process and print its JSON record")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per model")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_model(args.one), default=str))
        return 0
    from zoo import ZOO

    names = args.names or [e.name for e in ZOO]
    previous = {}
    if os.path.exists(RESULTS):
        with open(RESULTS) as handle:
            previous = {r["name"]: r for r in json.load(handle)["models"]}
    for name in names:
        previous[name] = _run_isolated(name, args.timeout)
        print(f"{name}: done", flush=True)
        ordered = [previous[e.name] for e in ZOO if e.name in previous]
        with open(RESULTS, "w") as handle:
            json.dump({"nuts": NUTS_OPTIONS, "svi": SVI_OPTIONS, "models": ordered}, handle, indent=1, default=str)
    print(table(ordered))
    return 0


if __name__ == "__main__":
    sys.exit(main())
