"""Per-step time of the compiled SVI step on the virtual machine vs as ``torch.fx`` code, per guide.

For each guide it fits the closed-form linear regression twice per runner, with ``--short`` and
``--long`` steps (early stopping off), and reports ``(wall_long - wall_short) / (long - short)``:
the setup (tracing, translating, the eager checks) cancels. It also prints the runner each fit
used (``config["step_runner"]``) and the ELBO's gap to the log evidence. Timings need an idle
machine: on a loaded one they say nothing.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/svi_step_runners.py
    OMP_NUM_THREADS=1 python benchmarks/svi_step_runners.py --guides fullrank --short 200 --long 2200
"""

from __future__ import annotations

import argparse
import warnings

import torch

from vilab.inference import fit_svi
from vilab.models import conjugate

__all__ = ["main"]


def _fit(guide: str, compiler: str, num_steps: int, data: tuple):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short fits do not converge; that is not measured here
        return fit_svi(
            conjugate.linear_regression,
            guide,
            *data,
            num_steps=num_steps,
            lr=0.05,
            lr_decay=0.01,
            early_stop=False,
            progress=False,
            seed=0,
            backend="compiled",
            compiler=compiler,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guides", nargs="+", default=["meanfield", "fullrank", "lowrank", "iaf", "nsf"])
    parser.add_argument("--short", type=int, default=200)
    parser.add_argument("--long", type=int, default=2200)
    options = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    data = conjugate.default_regression_data()
    log_evidence = conjugate.linear_regression_log_evidence(*data)
    print(f"{'guide':10s} {'runner':7s} {'us/step':>9s} {'ELBO gap':>9s}")
    for guide in options.guides:
        for compiler in ("vm", "graph"):
            short, long = (_fit(guide, compiler, steps, data) for steps in (options.short, options.long))
            per_step = (long.wall_time - short.wall_time) / (options.long - options.short)
            gap = log_evidence - long.elbo_estimate(20000, seed=1)[0]
            print(f"{guide:10s} {long.config['step_runner']:7s} {per_step * 1e6:9.1f} {gap:9.5f}", flush=True)


if __name__ == "__main__":
    main()
