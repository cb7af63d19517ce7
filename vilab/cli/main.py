"""The ``vilab`` command: ``list``, ``compare``, ``sweep`` (and ``vae`` when its module is present).

``vilab compare`` with no model runs the embedded main job: eight schools (non-centred),
meanfield, fullrank and IAF guides against NUTS, written to ``runs/compare``.

Every check of the input (model, guide names, ``--out``) runs before any fitting. ``--out``
takes a new or empty folder, or the report of an earlier comparison: a rerun with the same
settings replaces it (and says so), one with other settings needs ``--force``; a folder holding
anything else is refused. The report is built beside ``--out`` and swapped into place at the
end, so an interrupted run leaves the previous report whole. User errors print one
``vilab: error: ...`` line in the CLI's flags and exit with status 2 (``vilab --debug ...``
shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from vilab.cli.errors import run_command, set_flag_names

__all__ = ["main", "build_parser"]

DEFAULT_MODEL = "eight_schools"
DEFAULT_GUIDES = "meanfield,fullrank,iaf"


def _cmd_list(args: argparse.Namespace) -> int:
    from vilab.guides import list_guides
    from vilab.models import list_models

    print("Models (vilab compare MODEL):")
    for spec in list_models():
        if "posteriordb" not in spec.tags:
            print(f"  {spec.name:<24} {spec.description}")
    print("\nposteriordb problems (vilab compare --posteriordb PATH NAME):")
    for spec in list_models():
        if "posteriordb" in spec.tags:
            print(f"  {spec.name.split('/', 1)[-1]:<40} {spec.description}")
    print("\nGuides (--guides a,b,c):")
    for info in list_guides():
        print(f"  {info.name:<12} {info.description}")
    return 0


def _load_problem(args: argparse.Namespace):
    """(model, model_args, model_kwargs, reference_draws or None, title)."""
    if args.posteriordb:
        from vilab.posteriordb import load_posteriordb

        if not args.model:
            raise ValueError("model: --posteriordb PATH needs a problem NAME, e.g. kidiq-kidscore_momiq")
        problem = load_posteriordb(args.posteriordb, args.model)
        return problem.model, problem.args, problem.kwargs, problem.reference_draws, f"posteriordb: {problem.name}"
    from vilab.models import get_model

    name = args.model or DEFAULT_MODEL
    model, model_args, model_kwargs = get_model(name).load()
    return model, model_args, model_kwargs, None, name


def _check_guides(guides: list[str]) -> None:
    """Raise ``ValueError`` for a guide name that neither the guide registry nor the VI methods know."""
    from vilab.guides import list_guides
    from vilab.inference.vi import METHODS

    known = [info.name for info in list_guides()] + sorted(METHODS)
    unknown = [name for name in guides if name not in known]
    if not guides or unknown:
        raise ValueError(
            f"guides: expected comma-separated names among {', '.join(known)}; "
            f"got {', '.join(map(repr, unknown)) or 'none'} (see `vilab list`)"
        )


# Options that describe the comparison a report holds (--out, --quiet, --force do not).
_SETTINGS = (
    "posteriordb",
    "guides",
    "steps",
    "lr",
    "flows",
    "draws",
    "samples",
    "warmup",
    "chains",
    "target_accept",
    "dense_mass",
    "no_nuts",
    "seed",
)


def _check_out(args: argparse.Namespace, settings: dict) -> None:
    """Refuse ``--out`` unless it may take this comparison's report (see the module docstring)."""
    from vilab.inference.report.save import previous_report

    differences = previous_report(args.out, settings)
    if differences is None:
        return
    if not differences:
        print(
            f"vilab compare: {args.out} holds the report of this same comparison; it is replaced when this one is done",
            file=sys.stderr,
        )
        return
    names = {key: key if key == "model" else args.cli_flags.get(key, key) for key in differences}
    described = ", ".join(f"{names[key]} {old!r} -> {new!r}" for key, (old, new) in differences.items())
    if not args.force:
        raise ValueError(
            f"out: {args.out!r} holds the report of another comparison ({described}); "
            "choose another --out, or add --force to replace it"
        )
    print(
        f"vilab compare: --force: replacing the report in {args.out} ({described}) when this one is done",
        file=sys.stderr,
    )


def _cmd_compare(args: argparse.Namespace) -> int:
    import torch

    from vilab.inference import compare
    from vilab.inference.report.save import warnings_for

    torch.set_default_dtype(torch.float64)
    guides = [g.strip() for g in args.guides.split(",") if g.strip()]
    _check_guides(guides)
    model, model_args, model_kwargs, reference, title = _load_problem(args)
    settings = {"model": title, **{key: getattr(args, key) for key in _SETTINGS}, "guides": guides}
    _check_out(args, settings)
    flows = {"num_flows": args.flows}
    report = compare(
        model,
        *model_args,
        guides=guides,
        reference=reference,
        include_nuts=reference is not None and not args.no_nuts,
        seed=args.seed,
        num_draws=args.draws,
        svi_options={"num_steps": args.steps, "lr": args.lr},
        nuts_options={
            "num_samples": args.samples,
            "num_warmup": args.warmup,
            "num_chains": args.chains,
            "target_accept": args.target_accept,
            "dense_mass": args.dense_mass,
        },
        guide_options={g: flows for g in guides if g in ("iaf", "nsf", "planar", "radial", "sylvester")},
        progress=not args.quiet,
        **model_kwargs,
    )
    report.title = f"vilab compare: {title}"
    report.settings = settings
    out = report.save(args.out)
    columns = [
        c
        for c in (
            "mean_abs_error_sd",
            "max_abs_error_sd",
            "mean_abs_log_sd_ratio",
            "k_hat",
            "elbo",
            "wall_time",
            "ess_per_second",
            "num_divergences",
        )
        if c in report.summary.columns
    ]
    print(report.summary[columns].to_string(float_format=lambda v: f"{v:.3g}"))
    for note in warnings_for(report):
        print(f"warning: {note}")
    print(f"\nwrote {out}/report.html (and report.md, metrics.json, summary.csv, table.csv, *.nc, *.png)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``vilab`` command."""
    parser = argparse.ArgumentParser(prog="vilab", description="Variational inference vs NUTS on Pyro models.")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the Python traceback of an error (before the command: vilab --debug ...)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list models, posteriordb problems and guides").set_defaults(func=_cmd_list)
    cmp = sub.add_parser("compare", help="fit guides and NUTS on a model and compare them")
    cmp.add_argument("model", nargs="?", help=f"registered model (default {DEFAULT_MODEL}) or posteriordb NAME")
    cmp.add_argument("--posteriordb", metavar="PATH", help="a posteriordb folder; MODEL is then a problem name")
    cmp.add_argument("--guides", default=DEFAULT_GUIDES, help=f"comma-separated guides (default {DEFAULT_GUIDES})")
    cmp.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    cmp.add_argument(
        "--steps",
        type=int,
        default=6000,
        help="max SVI steps per guide (a fit stops earlier once its convergence test passes)",
    )
    cmp.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
    cmp.add_argument("--flows", type=int, default=2, help="K, layers of flow guides")
    cmp.add_argument("--draws", type=int, default=4000, help="guide draws for metrics and PSIS")
    cmp.add_argument("--samples", type=int, default=1000, help="NUTS draws per chain")
    cmp.add_argument("--warmup", type=int, default=1000, help="NUTS warmup steps per chain")
    cmp.add_argument("--chains", type=int, default=4, help="NUTS chains")
    cmp.add_argument("--target-accept", type=float, default=0.8)
    cmp.add_argument("--dense-mass", action="store_true", help="adapt a dense mass matrix")
    cmp.add_argument(
        "--no-nuts", action="store_true", help="with --posteriordb, score only the guides against the reference draws"
    )
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--quiet", action="store_true", help="no progress output")
    cmp.add_argument("--force", action="store_true", help="replace the report of another comparison in --out")
    cmp.set_defaults(func=_cmd_compare)
    try:
        from vilab.cli.vae import add_vae_commands
    except ImportError:  # the VAE commands live in their own module
        add_vae_commands = None
    if add_vae_commands is not None:
        add_vae_commands(sub)
    from vilab.cli.advanced import add_advanced_commands

    add_advanced_commands(sub)
    from vilab.cli.calibrate import add_calibrate_command

    add_calibrate_command(sub)
    from vilab.cli.sweep import add_sweep_command

    add_sweep_command(sub)
    set_flag_names(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``vilab`` console script: exit status 0, 2 for a user error (one
    ``vilab: error:`` line on stderr), or 128 + N for a run stopped by signal N."""
    args = build_parser().parse_args(argv)
    return run_command(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
