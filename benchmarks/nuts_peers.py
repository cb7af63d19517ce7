"""NUTS against its peers at their best on the same cores: vilab, NumPyro (vectorised and
parallel chains) and nutpie, cold, each checked against the reference in the same run.

For each problem (``peer_problems.py``: every posteriordb posterior with a port, and the zoo's
models as their sources write them) and each sampler, one fresh process runs
4 chains x (1000 warm-up + 1000 draws) in float64 from a uniform(-2, 2) start on the
unconstrained space, with fresh cache directories (``peer_samplers.py``). The samplers:

- ``vilab``: ``vilab.inference.run_nuts(model, *args, num_chains=4, ...)`` on the model as written,
  with its default ``chain_method``; the table says which path it took (fast vectorized, vmap
  batching or the Pyro fallback).
- ``numpyro_vectorized``: NumPyro's NUTS, ``chain_method="vectorized"`` on one device.
- ``numpyro_parallel``: ``chain_method="parallel"`` over ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
  host devices (set before JAX is imported, hence the process per run).
- ``nutpie``: nutpie on the PyMC port (``pymc_models.py``) where there is one; its cold seconds
  include PyMC's and numba's compilation, its sampling seconds are reported apart.

Per run: wall seconds including compilation; ESS/s = the minimum bulk ESS over the model's latent
parameters / those seconds; the maximum |mean error| over the reference's statistics in
reference sds, its largest z-score (combined Monte Carlo error of both means) against a threshold
for a 1e-3 chance of a false alarm, and the largest R-hat. The ratio is vilab's ESS/s over the
better NumPyro configuration's; the summary gives its geometric mean and worst case.

``--warm``: vilab runs twice in one process (the second reuses the cached kernels); its second
run's seconds are compared with nutpie's post-compile sampling seconds (default models: eight
schools and kidiq).

Usage::

    python benchmarks/nuts_peers.py                                   # everything (hours)
    python benchmarks/nuts_peers.py --models eight_schools,kidiq --num-warmup 200 --num-samples 200
    python benchmarks/nuts_peers.py --warm
    python benchmarks/nuts_peers.py --resume                          # go on after a stop

The results file is rewritten after each problem, so a stopped run keeps what it finished.

Writes ``benchmarks/results/nuts_peers.json`` (``nuts_peers_warm.json`` with ``--warm``).
Timings depend on the machine's load; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from peer_report import accuracy, min_bulk_ess, ratio_summary, tables  # noqa: E402

__all__ = ["main", "run_one", "score"]

SAMPLERS = ("vilab", "numpyro_vectorized", "numpyro_parallel", "nutpie")
WARM_MODELS = ("eight_schools", "kidiq")
RESULTS = HERE / "results"


def _environment(sampler: str, cache: str, settings: dict) -> dict:
    """A fresh kernel cache for every compiler (a user's first run of a model), vilab's virtual
    machine library as installed, host devices for NumPyro's parallel chains."""
    env = dict(os.environ)
    env.update(
        VILAB_CACHE_DIR=settings["vilab_cache"],
        TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
        NUMBA_CACHE_DIR=os.path.join(cache, "numba"),
        PYTENSOR_FLAGS=f"base_compiledir={os.path.join(cache, 'pytensor')}",
    )
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if sampler == "numpyro_parallel":
        flags.append(f"--xla_force_host_platform_device_count={settings['num_chains']}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def run_one(sampler: str, problem: str, settings: dict) -> tuple[dict, dict]:
    """One sampler on one problem in a fresh process; returns (draws, record)."""
    with tempfile.TemporaryDirectory(prefix="nuts-peers-") as cache:
        spec = {**settings, "sampler": sampler, "problem": problem, "out": os.path.join(cache, "run")}
        command = [sys.executable, str(HERE / "peer_samplers.py"), json.dumps(spec)]
        env = _environment(sampler, cache, settings)
        # A session of its own, so that a timeout also ends the worker's children (vilab's chain
        # processes, a compile server).
        with subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        ) as process:
            try:
                _, stderr = process.communicate(timeout=settings["timeout"])
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
                return {}, {"error": f"timed out after {settings['timeout']:.0f} s"}
            except BaseException:  # Ctrl-C or SIGTERM here: the worker's session must not outlive us
                os.killpg(process.pid, signal.SIGKILL)
                raise
        out = Path(spec["out"])
        if not out.with_suffix(".json").exists():
            return {}, {"error": f"worker exited {process.returncode}: {stderr[-400:]}"}
        record = json.loads(out.with_suffix(".json").read_text())
        if "error" in record:
            return {}, record
        with np.load(out.with_suffix(".npz")) as stored:
            return {name: stored[name] for name in stored.files}, record


def _install_vilab(directory: str) -> None:
    """Build vilab's virtual machine library into ``directory`` (what ``make install`` does once
    per installation, about 10 s), so that no timed run pays for it."""
    code = "from vilab.inference.engine.backends.vm import build_library; print(build_library())"
    env = {**os.environ, "VILAB_CACHE_DIR": directory}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode != 0:  # as `make install`: vilab then runs without it
        print(f"note: vilab's virtual machine library was not built: {done.stderr.strip()[-300:]}")


def _latent_sites(problem) -> list[str]:
    import pyro
    import torch
    from pyro.poutine.util import site_is_subsample

    torch.set_default_dtype(torch.float64)
    model, args, kwargs = problem.pyro()
    trace = pyro.poutine.trace(model).get_trace(*args, **kwargs)
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)
        and not site["infer"].get("enumerate")
    ]


def score(problem, draws: dict, record: dict, latent: list[str]) -> dict:
    """Add ESS, ESS/s and the accuracy against the reference to a run's record (a new dict)."""
    present = [name for name in latent if name in draws]
    ess = min_bulk_ess({name: draws[name] for name in present})
    seconds = record["seconds"][-1]
    flat = {name: value.reshape((-1,) + value.shape[2:]) for name, value in draws.items()}
    num_chains = next(iter(draws.values())).shape[0]
    checked = accuracy(problem.statistics(flat), problem.reference(), num_chains)
    return {
        **record,
        "min_bulk_ess": ess,
        "ess_per_second": ess / seconds,
        "latent_missing": sorted(set(latent) - set(present)),
        **checked,
    }


def _samplers_for(name: str, wanted: list, ports: dict) -> list[str]:
    return [
        s
        for s in wanted
        if s == "vilab"
        or (s.startswith("numpyro") and name in ports["numpyro"])
        or (s == "nutpie" and name in ports["nutpie"])
    ]


def _machine() -> dict:
    versions = {}
    for package in ("vilab", "torch", "pyro-ppl", "numpyro", "jax", "nutpie", "pymc"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:  # noqa: BLE001 - PackageNotFoundError: the peer is not installed
            versions[package] = None
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
        "versions": versions,
    }


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated problems (default: all; --warm: eight_schools,kidiq)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help=f"comma-separated among {','.join(SAMPLERS)}")
    parser.add_argument("--num-chains", type=int, default=4)
    parser.add_argument("--num-warmup", type=int, default=1000)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="nutpie's cores (default: all)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before a run is stopped")
    parser.add_argument("--warm", action="store_true", help="vilab's second run vs nutpie's sampling time")
    parser.add_argument("--report", action="store_true", help="print the tables of --out's results; run nothing")
    parser.add_argument("--resume", action="store_true", help="keep the problems --out already holds")
    parser.add_argument("--out", type=Path, help="results file (default benchmarks/results/nuts_peers[_warm].json)")
    args = parser.parse_args(argv)
    samplers = args.samplers.split(",")
    unknown = sorted(set(samplers) - set(SAMPLERS))
    if unknown:
        parser.error(f"--samplers: expected names among {SAMPLERS}; got {unknown}")
    if args.warm and args.samplers == parser.get_default("samplers"):
        samplers = ["vilab", "nutpie"]
    return args, samplers


def main(argv=None) -> int:
    from peer_problems import peer_ports, problems, select

    # SIGTERM as an exception, so that run_one ends the running worker's session too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    args, samplers = _parse(argv)
    if args.report:
        return _report(args)
    available = problems()
    names = args.models.split(",") if args.models else (list(WARM_MODELS) if args.warm else None)
    ports = peer_ports()
    # Without --models: the zoo's models that have a NumPyro twin (the others give no ratio).
    chosen = (
        select(available, names)
        if names
        else [n for n in available if n.startswith("posteriordb/") or n in ports["numpyro"]]
    )
    settings = dict(
        num_chains=args.num_chains,
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        seed=args.seed,
        cores=args.cores,
        timeout=args.timeout,
        repeats=2 if args.warm else 1,
        vilab_cache=tempfile.mkdtemp(prefix="nuts-peers-vilab-"),  # mode 0700, as vilab requires
    )
    _install_vilab(settings["vilab_cache"])
    out = args.out or RESULTS / ("nuts_peers_warm.json" if args.warm else "nuts_peers.json")
    results = _earlier(out, settings) if args.resume else {}
    for name in chosen:
        if name in results:
            print(f"{name}: kept from {out}", flush=True)
            continue
        latent = _latent_sites(available[name])
        results[name] = {}
        for sampler in _samplers_for(name, samplers, ports):
            start, load = time.perf_counter(), os.getloadavg()[0]
            draws, record = run_one(sampler, name, settings)
            record = {**record, "load_average_before": load}  # other work on the machine skews the ratio
            if draws:
                record = score(available[name], draws, record, latent)
            results[name][sampler] = record
            status = (
                record.get("error")
                or f"{record['ess_per_second']:.2f} ESS/s, err {record['max_abs_mean_error_sd']:.3f} sd"
            )
            print(f"{name} {sampler} ({time.perf_counter() - start:.0f} s): {status}", flush=True)
        _write(out, settings, samplers, args.warm, results)  # each problem as it ends: a stopped run keeps them
    shutil.rmtree(settings["vilab_cache"], ignore_errors=True)
    summary = _write(out, settings, samplers, args.warm, results)
    print(tables(results, summary, warm=args.warm))
    print(f"wrote {out}")
    return 0


def _report(args) -> int:
    """``--report``: the tables and summary of a results file, recomputed, without running."""
    out = args.out or RESULTS / ("nuts_peers_warm.json" if args.warm else "nuts_peers.json")
    record = json.loads(out.read_text())
    summary = ratio_summary(record["problems"], warm=record["settings"]["warm"])
    print(tables(record["problems"], summary, warm=record["settings"]["warm"]))
    return 0


def _comparable(settings: dict) -> dict:
    return {key: settings[key] for key in ("num_chains", "num_warmup", "num_samples", "seed", "repeats")}


def _earlier(out: Path, settings: dict) -> dict:
    """The problems an earlier run with the same settings wrote to ``out`` (``--resume``)."""
    if not out.exists():
        return {}
    earlier = json.loads(out.read_text())
    if _comparable(earlier["settings"]) != _comparable(settings):
        raise SystemExit(f"--resume: {out} was written with other settings ({_comparable(earlier['settings'])})")
    return earlier["problems"]


def _write(out: Path, settings: dict, samplers: list, warm: bool, results: dict) -> dict:
    summary = ratio_summary(results, warm=warm)
    shown = {key: value for key, value in settings.items() if key != "vilab_cache"}
    record = {
        "settings": {**shown, "samplers": samplers, "warm": warm},
        "machine": _machine(),
        "problems": results,
        "summary": summary,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".json.tmp")
    partial.write_text(json.dumps(record, indent=1, default=float))
    os.replace(partial, out)
    return summary


if __name__ == "__main__":
    sys.exit(main())
