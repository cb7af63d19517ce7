"""NUTS speed on small problems: vilab's vectorized NUTS vs Pyro's NUTS (jit on/off) vs NumPyro.

For each problem and sampler (run alternately, in one process, on the same machine) it records
the wall time including any compilation, the minimum bulk ESS over the latent parameters, ESS/s
and the ratio of ESS/s to NumPyro's. NumPyro and JAX come from the ``bench`` extra; problems
without a NumPyro port report no NumPyro row.

Usage::

    python benchmarks/nuts_speed.py                       # eight schools + every posteriordb port
    python benchmarks/nuts_speed.py --problems eight_schools --samplers vilab numpyro
    python benchmarks/nuts_speed.py --num-warmup 200 --num-samples 200   # quick look
    python benchmarks/nuts_speed.py --samplers vilab numpyro --seeds 0 1 2  # pooled over seeds
    python benchmarks/nuts_speed.py --problems arma-arma11 --samplers vilab numpyro --init reference-mean

Writes ``benchmarks/results/nuts_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import arviz as az
import numpy as np
import torch

__all__ = ["PROBLEMS", "SAMPLERS", "main"]

SAMPLERS = ("vilab", "pyro", "pyro_jit", "numpyro")
RESULTS = Path(__file__).resolve().parent / "results" / "nuts_speed.json"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # numpyro_models.py sits beside this script


def _eight_schools():
    from vilab.models.eight_schools import eight_schools_data, eight_schools_noncentered

    data = eight_schools_data()
    return eight_schools_noncentered, (data["J"], data["sigma"]), {"y": data["y"]}


def _posteriordb(name):
    def load():
        from vilab.posteriordb import default_posteriordb_path, load_posteriordb

        problem = load_posteriordb(default_posteriordb_path(), name)
        return problem.model, problem.args, problem.kwargs

    return load


def _problems() -> dict:
    problems = {"eight_schools": _eight_schools}
    try:
        from vilab.posteriordb import default_posteriordb_path, list_posteriordb

        for name in list_posteriordb(default_posteriordb_path()):
            problems[name] = _posteriordb(name)
    except (ImportError, FileNotFoundError) as error:
        print(f"posteriordb problems skipped: {error}")
    return problems


PROBLEMS = _problems()


def min_bulk_ess(samples: dict[str, np.ndarray]) -> float:
    """Minimum bulk ESS over every scalar component of ``(chain, draw, ...)`` arrays."""
    dataset = az.convert_to_dataset({name: np.asarray(value) for name, value in samples.items()})
    return float(min(np.min(az.ess(dataset, method="bulk")[name].values) for name in samples))


def reference_mean(problem: str) -> dict[str, torch.Tensor]:
    """The posteriordb reference posterior mean of ``problem``'s sites (constrained), where every
    chain of every sampler starts under ``--init reference-mean``: a multimodal posterior
    (arma11's MA term has a non-invertible second mode) then gets one mode for both samplers."""
    from vilab.posteriordb import default_posteriordb_path, load_posteriordb, unflatten_samples

    if problem not in PROBLEMS or problem == "eight_schools":
        raise NotImplementedError(f"no posteriordb reference for {problem}")
    draws = unflatten_samples(load_posteriordb(default_posteriordb_path(), problem).reference_draws, 2)
    return {name: value.mean((0, 1)) for name, value in draws.items()}


def _latent_names(model, args, kwargs) -> list[str]:
    import pyro
    from pyro.poutine.util import site_is_subsample

    trace = pyro.poutine.trace(model).get_trace(*args, **kwargs)
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    ]


def run_vilab(model, args, kwargs, options):
    from vilab.inference.engine.processes import server as fast_background
    from vilab.inference.nuts.sampler import sample_vectorized_nuts

    if options["inductor_cache"] == "cold":
        # Cold for every run, as a user's first run of a model: a fresh cache directory (the same
        # problem under another seed traces the same graphs, a cache hit), and a fresh compile
        # server (one that has compiled a graph keeps it in memory and would skip g++).
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="vilab-inductor-")
        fast_background.shutdown()
    init = options.get("init_values")
    options = {
        key: value for key, value in options.items() if key not in ("inductor_cache", "seeds", "init", "init_values")
    }
    chains = options["num_chains"]
    init = None if init is None else {name: value.expand(chains, *value.shape) for name, value in init.items()}
    result = sample_vectorized_nuts(model, args, kwargs, progress=False, init_values=init, **options)
    names = _latent_names(model, args, kwargs)
    samples = {name: result.samples[name].numpy() for name in names}
    return (
        samples,
        int(result.sample_stats["diverging"].sum()),
        {"compiled": bool(result.compiled), "backend": result.backend, "fuse_decision": result.fuse_decision},
    )


def _run_pyro(model, args, kwargs, options, jit):
    from pyro.infer import MCMC, NUTS

    kernel = NUTS(
        model,
        target_accept_prob=options["target_accept"],
        jit_compile=jit,
        ignore_jit_warnings=True,
        full_mass=options["dense_mass"],
    )
    mcmc = MCMC(
        kernel,
        num_samples=options["num_samples"],
        warmup_steps=options["num_warmup"],
        num_chains=options["num_chains"],
        disable_progbar=True,
    )
    mcmc.run(*args, **kwargs)
    names = _latent_names(model, args, kwargs)
    samples = mcmc.get_samples(group_by_chain=True)
    divergences = sum(len(v) for v in mcmc.diagnostics().get("divergences", {}).values())
    return {name: samples[name].numpy() for name in names}, divergences, {}


def _to_numpy(value):
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def run_numpyro(problem, model, args, kwargs, options):
    """NumPyro's NUTS on its port of ``problem`` (``benchmarks/numpyro_models.py``), chains
    vectorized; the data are the Pyro problem's, converted to NumPy."""
    import jax
    from numpyro.infer import MCMC, NUTS, init_to_uniform, init_to_value

    jax.config.update("jax_enable_x64", torch.get_default_dtype() == torch.float64)
    from numpyro_models import NUMPYRO_MODELS

    if problem not in NUMPYRO_MODELS:
        raise NotImplementedError("no NumPyro port")
    init = options.get("init_values")
    strategy = init_to_uniform if init is None else init_to_value(values={k: _to_numpy(v) for k, v in init.items()})
    kernel = NUTS(
        NUMPYRO_MODELS[problem],
        target_accept_prob=options["target_accept"],
        dense_mass=options.get("dense_mass", False),
        init_strategy=strategy,
    )
    mcmc = MCMC(
        kernel,
        num_warmup=options["num_warmup"],
        num_samples=options["num_samples"],
        num_chains=options["num_chains"],
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(
        jax.random.PRNGKey(options["seed"]),
        *[_to_numpy(a) for a in args],
        extra_fields=("diverging",),
        **{k: _to_numpy(v) for k, v in kwargs.items()},
    )
    samples = jax.block_until_ready(mcmc.get_samples(group_by_chain=True))
    divergences = int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
    names = _latent_names(model, args, kwargs)
    return {name: np.asarray(samples[name]) for name in names}, divergences, {}


def measure(problem: str, sampler: str, options: dict) -> dict:
    """Run one sampler on one problem; return wall time, min bulk ESS, ESS/s and the load average."""
    model, args, kwargs = PROBLEMS[problem]()
    if options.get("init") == "reference-mean":
        options = {**options, "init_values": reference_mean(problem)}
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    if sampler == "vilab":
        samples, divergences, extra = run_vilab(model, args, kwargs, options)
    elif sampler in ("pyro", "pyro_jit"):
        if "init_values" in options:
            raise NotImplementedError("--init reference-mean is not wired to Pyro's NUTS here")
        pyro_options = {
            k: options[k] for k in ("num_samples", "num_warmup", "num_chains", "target_accept", "dense_mass")
        }
        samples, divergences, extra = _run_pyro(model, args, kwargs, pyro_options, jit=sampler == "pyro_jit")
    else:
        samples, divergences, extra = run_numpyro(problem, model, args, kwargs, options)
    wall = time.perf_counter() - start
    ess = min_bulk_ess(samples)
    return {
        "problem": problem,
        "sampler": sampler,
        "wall_s": wall,
        "min_bulk_ess": ess,
        "ess_per_s": ess / wall,
        "divergences": divergences,
        "load_average": [load_before, os.getloadavg()[0]],
        **extra,
    }


def _table(rows: list[dict]) -> str:
    numpyro_rate = {
        (row["problem"], row.get("seed", 0)): row["ess_per_s"]
        for row in rows
        if row["sampler"] == "numpyro" and "error" not in row
    }
    lines = [
        "| problem | sampler | seed | wall s | min bulk ESS | ESS/s | vs NumPyro | divergences | load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        seed = row.get("seed", 0)
        if "error" in row:
            lines.append(f"| {row['problem']} | {row['sampler']} | {seed} | - | - | - | - | {row['error']} | - |")
            continue
        reference = numpyro_rate.get((row["problem"], seed))
        ratio_text = f"{row['ess_per_s'] / reference:.2f}" if reference else "-"
        lines.append(
            f"| {row['problem']} | {row['sampler']} | {seed} | {row['wall_s']:.1f} | {row['min_bulk_ess']:.0f} | "
            f"{row['ess_per_s']:.1f} | {ratio_text} | {row['divergences']} | "
            f"{row['load_average'][0]:.1f}-{row['load_average'][1]:.1f} |"
        )
    return "\n".join(lines)


def _summary(rows: list[dict]) -> str:
    """Per problem and sampler over the seeds: pooled ESS/s (total ESS over total wall time),
    its ratio to NumPyro's, and the range of the per-seed ratios."""
    pooled: dict = {}
    for row in rows:
        if "error" not in row:
            ess_wall_rates = pooled.setdefault((row["problem"], row["sampler"]), [0.0, 0.0, {}])
            ess_wall_rates[0] += row["min_bulk_ess"]
            ess_wall_rates[1] += row["wall_s"]
            ess_wall_rates[2][row.get("seed", 0)] = row["ess_per_s"]
    lines = [
        "| problem | sampler | seeds | pooled ESS/s | vs NumPyro (pooled) | per-seed ratios |",
        "|---|---|---|---|---|---|",
    ]
    for (problem, sampler), (ess, wall, rates) in pooled.items():
        reference = pooled.get((problem, "numpyro"))
        ratio, spread = "-", "-"
        if reference and sampler != "numpyro":
            ratio = f"{(ess / wall) / (reference[0] / reference[1]):.2f}"
            per_seed = [rate / reference[2][seed] for seed, rate in rates.items() if seed in reference[2]]
            spread = f"{min(per_seed):.2f}-{max(per_seed):.2f}" if per_seed else "-"
        lines.append(f"| {problem} | {sampler} | {len(rates)} | {ess / wall:.1f} | {ratio} | {spread} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="*", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--samplers", nargs="*", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--num-warmup", type=int, default=1000)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--num-chains", type=int, default=4)
    parser.add_argument("--target-accept", type=float, default=0.8)
    parser.add_argument("--float32", action="store_true", help="run in float32 (default float64)")
    parser.add_argument(
        "--dense-mass",
        action="store_true",
        help="adapt a dense mass matrix (vilab, Pyro and NumPyro alike; default diagonal)",
    )
    parser.add_argument(
        "--compiler",
        default="auto",
        choices=("auto", "inductor", "graph", "vm"),
        help="vilab's leaf compiler (sample_vectorized_nuts(compiler=...))",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="vilab's processes (sample_vectorized_nuts(workers=...)); default: one per core, at most one per chain",
    )
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="use Inductor's on-disk cache as a user's repeated runs do; by default a fresh "
        "cache directory makes every compilation cold",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="*",
        default=[0],
        help="one run per seed, problem and sampler (min bulk ESS varies by seed); a summary pools them",
    )
    parser.add_argument(
        "--init",
        choices=("uniform", "reference-mean"),
        default="uniform",
        help="where chains start: uniform in (-2, 2) unconstrained (Stan's and both "
        "samplers' default), or every chain at the posteriordb reference mean",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    arguments = parser.parse_args(argv)
    if not arguments.warm_cache:
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="vilab-inductor-")
    torch.set_default_dtype(torch.float32 if arguments.float32 else torch.float64)
    options = {
        "num_warmup": arguments.num_warmup,
        "num_samples": arguments.num_samples,
        "num_chains": arguments.num_chains,
        "target_accept": arguments.target_accept,
        "seeds": arguments.seeds,
        "dense_mass": arguments.dense_mass,
        "compiler": arguments.compiler,
        "init": arguments.init,
        "workers": arguments.workers,
        "inductor_cache": "warm" if arguments.warm_cache else "cold",
    }
    rows = []
    for seed in arguments.seeds:
        for problem in arguments.problems:
            for sampler in arguments.samplers:  # alternate samplers within each problem
                try:
                    rows.append({**measure(problem, sampler, {**options, "seed": seed}), "seed": seed})
                except (NotImplementedError, ImportError) as error:
                    rows.append({"problem": problem, "sampler": sampler, "seed": seed, "error": str(error)})
                print(_table(rows[-1:]).splitlines()[-1], flush=True)
                _write(arguments.out, options, rows)  # after every row, so a cut-short run keeps its rows
    print(_table(rows))
    print()
    print(_summary(rows))
    return rows


def _write(path: Path, options: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {"options": options, "rows": rows, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
