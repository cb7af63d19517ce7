"""``vilab sweep``: models x methods x seeds on Ray into one store, with a leaderboard.

Examples::

    vilab sweep --models eight_schools,normal_normal --methods meanfield,fullrank,nuts --seeds 0,1,2
    vilab sweep --posteriordb ../shared/posteriordb --models 'posteriordb/*' --methods meanfield,nuts
    vilab sweep --config sweep.toml --address 127.0.0.1:6379      # join a running Ray cluster
    vilab sweep --out runs/sweep --leaderboard-only                # rewrite the page from the store

Rerunning the same command into the same ``--out`` skips the finished tasks.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

__all__ = ["add_sweep_command"]


def _names(text: Optional[str]) -> Optional[list[str]]:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def _seeds(args: argparse.Namespace) -> Optional[list[int]]:
    if args.num_seeds is not None:
        return list(range(args.num_seeds))
    if args.seeds is None:
        return None
    try:
        return [int(part) for part in _names(args.seeds)]
    except ValueError:
        raise SystemExit(f"vilab sweep: --seeds: expected comma-separated ints; got {args.seeds!r}") from None


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """Spec fields given on the command line (those left out keep the TOML's or the defaults)."""
    svi = {key: value for key, value in (("num_steps", args.steps), ("lr", args.lr)) if value is not None}
    nuts = {
        key: value
        for key, value in (("num_samples", args.samples), ("num_warmup", args.warmup), ("num_chains", args.chains))
        if value is not None
    }
    options = {
        "svi_options": svi or None,
        "nuts_options": nuts or None,
        "num_draws": args.draws,
        "num_cpus": args.num_cpus,
        "max_retries": args.max_retries,
        "posteriordb": args.posteriordb,
    }
    return {key: value for key, value in options.items() if value is not None}


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vilab.inference.sweep import STORE_NAME, sweep, write_leaderboard

    if args.leaderboard_only:
        try:
            page = write_leaderboard(Path(args.out) / STORE_NAME, args.out)
        except FileNotFoundError as error:
            print(f"vilab sweep: {error}", file=sys.stderr)
            return 2
        print(f"wrote {page} and {page.with_suffix('.csv')}")
        return 0
    if args.config is None and (args.models is None or args.methods is None):
        print("vilab sweep: expected --models and --methods, or --config FILE.toml", file=sys.stderr)
        return 2
    try:
        result = sweep(
            _names(args.models),
            _names(args.methods),
            _seeds(args),
            config=args.config,
            out=args.out,
            address=args.address,
            serial=args.serial,
            progress=not args.quiet,
            **_options(args),
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"vilab sweep: {error}", file=sys.stderr)
        return 2
    print(
        f"sweep: {result.num_tasks} tasks: {result.num_skipped} found finished, {result.num_done} done now, "
        f"{result.num_failed} failed, in {result.wall_time:.1f} s"
    )
    print(f"store {result.store}" + (f"; leaderboard {result.leaderboard}" if result.leaderboard else ""))
    return 1 if result.num_failed else 0


def add_sweep_command(sub: argparse._SubParsersAction) -> None:
    """Add ``vilab sweep`` to the ``vilab`` command's subparsers."""
    cmd = sub.add_parser(
        "sweep",
        help="run models x methods x seeds on Ray into one store, with a leaderboard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument("--config", metavar="FILE.toml", help="the grid and options as TOML (docs/sweeps.md)")
    cmd.add_argument("--models", help="comma-separated: registry names, posteriordb/NAME, 'posteriordb/*', module:attr")
    cmd.add_argument("--methods", help="comma-separated guide or VI method names, and nuts")
    cmd.add_argument("--seeds", help="comma-separated seeds (default 0)")
    cmd.add_argument("--num-seeds", type=int, help="seeds 0..N-1 (instead of --seeds)")
    cmd.add_argument(
        "--posteriordb", metavar="PATH", help="posteriordb folder (default $VILAB_POSTERIORDB or ../shared/posteriordb)"
    )
    cmd.add_argument("--out", default="runs/sweep", help="store and leaderboard folder; a rerun into it resumes")
    cmd.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join (default $RAY_ADDRESS; none: start a local cluster)",
    )
    cmd.add_argument("--serial", action="store_true", help="run the tasks one after another in this process (no Ray)")
    cmd.add_argument("--num-cpus", type=int, help="CPUs each task declares (and its torch threads; default 1)")
    cmd.add_argument("--max-retries", type=int, help="reruns of a task whose worker or node died (default 2)")
    cmd.add_argument("--steps", type=int, help="max SVI steps (default 2000)")
    cmd.add_argument("--lr", type=float, help="Adam learning rate (default 0.02)")
    cmd.add_argument("--draws", type=int, help="guide draws for the metrics (default 1000)")
    cmd.add_argument("--samples", type=int, help="NUTS draws per chain of the nuts method (default 1000)")
    cmd.add_argument("--warmup", type=int, help="NUTS warmup per chain of the nuts method (default 1000)")
    cmd.add_argument("--chains", type=int, help="NUTS chains of the nuts method (default 4)")
    cmd.add_argument("--leaderboard-only", action="store_true", help="only rewrite the leaderboard from --out's store")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    cmd.set_defaults(func=_cmd_sweep)
