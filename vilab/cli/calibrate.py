"""``vilab calibrate MODEL --method NAME``: VSBC of a VI method (SBC of ``nuts``) on a model.

Simulates parameters from the prior and data from the model, fits the method to each data
set, tests the symmetry of the truth's posterior quantiles (VSBC) or the uniformity of its
ranks (SBC, ``--method nuts``) per parameter, and writes ``calibration.json``,
``calibration.csv`` and ``calibration.png`` into ``--out``. Exits 0 when every parameter
passes, 1 when one is flagged, 2 on bad input::

    vilab calibrate eight_schools_centered --method meanfield --simulations 100 --out runs/vsbc
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_calibrate_command", "calibrate_command"]


def add_calibrate_command(subparsers: Any) -> None:
    """Add ``calibrate`` to ``subparsers``."""
    parser = subparsers.add_parser("calibrate", help="VSBC of a VI method (SBC of nuts) on a registered model")
    parser.add_argument("model", help="registered model name (see `vilab list`)")
    parser.add_argument(
        "--method", default="meanfield", help="guide or method name (meanfield, fullrank, pathfinder, bam, ...) or nuts"
    )
    parser.add_argument("--simulations", type=int, default=100, help="prior simulations, one fit each")
    parser.add_argument("--draws", type=int, default=1000, help="guide draws per fit (VSBC)")
    parser.add_argument("--steps", type=int, default=None, help="SVI steps per fit (SVI guides only)")
    parser.add_argument("--alpha", type=float, default=0.05, help="family failure budget (Bonferroni)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/calibrate", help="output directory (default runs/calibrate)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=calibrate_command)


def calibrate_command(args: argparse.Namespace) -> int:
    """Run the check, print the per-parameter verdicts, write the report."""
    import torch

    from vilab.inference.comparison.calibration import calibrate
    from vilab.models import get_model

    torch.set_default_dtype(torch.float64)
    try:
        model, model_args, model_kwargs = get_model(args.model).load()
    except (ValueError, TypeError) as error:
        print(f"vilab calibrate: {error}", file=sys.stderr)
        return 2
    options = {"num_steps": args.steps} if args.steps is not None else {}
    try:
        result = calibrate(
            model,
            *model_args,
            method=args.method,
            num_simulations=args.simulations,
            num_draws=args.draws,
            seed=args.seed,
            alpha=args.alpha,
            method_options=options,
            progress=not args.quiet,
            **model_kwargs,
        )
    except (ValueError, TypeError) as error:
        print(f"vilab calibrate: {error}", file=sys.stderr)
        return 2
    print(
        f"{result.test} of {result.method} on {args.model}: {result.num_simulations} simulations, "
        f"failure budget alpha={result.alpha} (Bonferroni over {len(result.table)} parameters)"
    )
    print(
        result.table[["parameter", "statistic", "p_value", "mean_quantile", "verdict"]].to_string(
            index=False, float_format=lambda v: f"{v:.3g}"
        )
    )
    if result.unconverged:
        print(
            f"warning: {len(result.unconverged)} of {result.num_simulations} fits did not converge; a flag may "
            "mean 'cannot fit what the prior generates' rather than 'biased' (raise --steps)",
            file=sys.stderr,
        )
    if result.failures:
        print(f"warning: {len(result.failures)} fits failed and were left out", file=sys.stderr)
    out = result.save(args.out)
    print(f"\nwrote {out}/calibration.png (and calibration.json, calibration.csv)")
    return 1 if result.flagged else 0
