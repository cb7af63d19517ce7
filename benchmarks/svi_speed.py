"""SVI steps per second: vilab's ``fit_svi`` vs Pyro's SVI (``Trace_ELBO``, ``JitTrace_ELBO``) vs
NumPyro's SVI, for the same guide families on the same problems.

Every rate is ``num_steps / wall time`` of one fit, guide construction and any compilation
included (JAX's jit for NumPyro, the first-step trace for ``JitTrace_ELBO``, the traced and
checked step of vilab's compiled backend, and for ``vilab_inductor``, ``fit_svi(compiler="inductor")``,
the fused kernel's compilation). The rate after that setup is reported too: for NumPyro
the steps after the first (compiling) one, for vilab the steps after ``fit_svi``'s setup. One particle, Adam
(Pyro's ``ClippedAdam``, as ``fit_svi`` uses), learning rate 0.01. The samplers of one problem
and guide run one after another in one process. NumPyro and JAX come from the ``bench`` extra.

Usage::

    python benchmarks/svi_speed.py                      # eight schools, kidiq, mesquite, arK
    python benchmarks/svi_speed.py --problems eight_schools --guides meanfield --num-steps 500

Writes ``benchmarks/results/svi_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nuts_speed import PROBLEMS  # noqa: E402

__all__ = ["IMPLEMENTATIONS", "GUIDES", "main"]

IMPLEMENTATIONS = ("vilab", "vilab_inductor", "pyro", "pyro_jit", "numpyro")
GUIDES = ("meanfield", "fullrank", "iaf")
DEFAULT_PROBLEMS = ("eight_schools", "kidiq-kidscore_momiq", "mesquite-logmesquite", "arK-arK")
RESULTS = Path(__file__).resolve().parent / "results" / "svi_speed.json"
LEARNING_RATE = 0.01


def run_vilab(model, args, kwargs, guide, num_steps, compiler="auto"):
    """``fit_svi`` with its default backend; returns the backend and the rate of the steps after
    the setup (for the compiled backend, tracing and checking the step, and with
    ``compiler="inductor"`` compiling the fused kernel)."""
    from vilab.inference import fit_svi

    result = fit_svi(
        model,
        guide,
        *args,
        num_steps=num_steps,
        lr=LEARNING_RATE,
        early_stop=False,
        progress=False,
        seed=0,
        compiler=compiler,
        **kwargs,
    )
    backend = result.config["backend"] + (" fused" if result.config.get("fused") else "")
    return backend, num_steps / (result.wall_time - result.config["setup_seconds"])


def bind_constants(model, args, kwargs):
    """``model`` as a function of its tensor positional arguments only, the others (sizes such
    as ``J`` or ``T``, ``None``) and the keyword arguments bound: ``JitTrace_ELBO`` traces a
    function of tensors and rejects anything else. Returns the function and its arguments."""
    tensors = tuple(a for a in args if isinstance(a, torch.Tensor))

    def bound(*tensor_args):
        supplied = iter(tensor_args)
        return model(*[next(supplied) if isinstance(a, torch.Tensor) else a for a in args], **kwargs)

    return bound, tensors


def run_pyro(model, args, kwargs, guide, num_steps, jit):
    import pyro
    from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO
    from pyro.optim import ClippedAdam

    from vilab.guides import get_guide

    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    if jit:
        model, args = bind_constants(model, args, kwargs)
        kwargs = {}
    elbo = JitTrace_ELBO(ignore_jit_warnings=True) if jit else Trace_ELBO()
    svi = SVI(model, get_guide(guide, model), ClippedAdam({"lr": LEARNING_RATE}), elbo)
    for _ in range(num_steps):
        svi.step(*args, **kwargs)


def run_numpyro(problem, args, kwargs, guide, num_steps):
    """NumPyro's SVI with a jitted ``update`` called in a Python loop; returns the rate of the
    steps after the first (which compiles)."""
    import jax
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal
    from numpyro.optim import Adam

    from numpyro_models import NUMPYRO_MODELS

    jax.config.update("jax_enable_x64", torch.get_default_dtype() == torch.float64)
    model = NUMPYRO_MODELS[problem]
    auto = {"meanfield": AutoNormal, "fullrank": AutoMultivariateNormal, "iaf": AutoIAFNormal}[guide]
    svi = SVI(model, auto(model), Adam(LEARNING_RATE), Trace_ELBO())
    numpy_args = [a.numpy() if isinstance(a, torch.Tensor) else a for a in args]
    numpy_kwargs = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    state = svi.init(jax.random.PRNGKey(0), *numpy_args, **numpy_kwargs)
    update = jax.jit(lambda s: svi.update(s, *numpy_args, **numpy_kwargs))
    state, loss = update(state)
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for _ in range(num_steps - 1):
        state, loss = update(state)
    jax.block_until_ready(loss)
    return (num_steps - 1) / (time.perf_counter() - start)


def measure(problem: str, implementation: str, guide: str, num_steps: int) -> dict:
    model, args, kwargs = PROBLEMS[problem]()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    backend = None
    if implementation in ("vilab", "vilab_inductor"):
        compiler = "inductor" if implementation == "vilab_inductor" else "auto"
        backend, steady = run_vilab(model, args, kwargs, guide, num_steps, compiler)
    elif implementation in ("pyro", "pyro_jit"):
        run_pyro(model, args, kwargs, guide, num_steps, jit=implementation == "pyro_jit")
    else:
        steady = run_numpyro(problem, args, kwargs, guide, num_steps)
    wall = time.perf_counter() - start
    return {
        "problem": problem,
        "implementation": implementation,
        "guide": guide,
        "num_steps": num_steps,
        "wall_s": wall,
        "steps_per_s": num_steps / wall,
        "load_average": [load_before, os.getloadavg()[0]],
        "steady_steps_per_s": steady if implementation not in ("pyro", "pyro_jit") else None,
        "backend": backend,
    }


def _table(rows: list[dict]) -> str:
    ok = [r for r in rows if "error" not in r and r["implementation"] == "numpyro"]
    reference = {(r["problem"], r["guide"]): r for r in ok}
    lines = [
        "| problem | guide | implementation | wall s | steps/s (all) | vs NumPyro (all) | "
        "steps/s after setup | vs NumPyro (after setup) | load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['problem']} | {r['guide']} | {r['implementation']} | - | - | - | - | - | {r['error']} |"
            )
            continue
        ref = reference.get((r["problem"], r["guide"]))
        name = r["implementation"] + (f" ({r['backend']})" if r.get("backend") else "")
        ratio = f"{r['steps_per_s'] / ref['steps_per_s']:.2f}" if ref else "-"
        steady = r.get("steady_steps_per_s")
        steady_ratio = (
            f"{steady / ref['steady_steps_per_s']:.2f}" if ref and steady and ref.get("steady_steps_per_s") else "-"
        )
        lines.append(
            f"| {r['problem']} | {r['guide']} | {name} | {r['wall_s']:.1f} | {r['steps_per_s']:.0f} | "
            f"{ratio} | {f'{steady:.0f}' if steady else '-'} | {steady_ratio} | "
            f"{r['load_average'][0]:.1f}-{r['load_average'][1]:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="*", default=list(DEFAULT_PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--guides", nargs="*", default=list(GUIDES), choices=GUIDES)
    parser.add_argument("--implementations", nargs="*", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--num-steps", type=int, default=2000)
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="use Inductor's on-disk cache as a user's repeated runs do; by default a fresh "
        "cache directory makes every compilation cold",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    arguments = parser.parse_args(argv)
    if not arguments.warm_cache:
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="vilab-inductor-")
    torch.set_default_dtype(torch.float64)
    rows = []
    for problem in arguments.problems:
        for guide in arguments.guides:
            for implementation in arguments.implementations:  # alternate within each problem and guide
                try:
                    rows.append(measure(problem, implementation, guide, arguments.num_steps))
                # AssertionError: Pyro's own check in its param store when JitTrace_ELBO traces
                # an AutoIAFNormal (the guide's parameters are created inside the trace).
                except (RuntimeError, ValueError, NotImplementedError, ImportError, AssertionError) as error:
                    where = traceback.extract_tb(error.__traceback__)[-1]
                    rows.append(
                        {
                            "problem": problem,
                            "implementation": implementation,
                            "guide": guide,
                            "error": f"{type(error).__name__}: {str(error)[:80]} "
                            f"({os.path.basename(where.filename)}:{where.lineno})",
                        }
                    )
                print(_table(rows[-1:]).splitlines()[-1], flush=True)
    print(_table(rows))
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(
        json.dumps(
            {
                "num_steps": arguments.num_steps,
                "rows": rows,
                "torch_threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
            },
            indent=2,
        )
    )
    return rows


if __name__ == "__main__":
    main()
