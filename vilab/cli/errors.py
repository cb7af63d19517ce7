"""User errors on the command line: one ``vilab: error: ...`` line in the CLI's own words.

The library names arguments as Python does (``num_chains: expected an int >= 1; got 0``); a
command-line user typed ``--chains``. :func:`flag_names` maps every Python name a command can
meet to its flag, :func:`to_flags` rewrites a message with it, and :func:`run_command` turns
the user errors a handler raises (``ValueError``, ``TypeError``, ``FileNotFoundError``) into
that line and exit status 2, while ``vilab --debug ...`` keeps the traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Mapping

__all__ = ["USER_ERRORS", "error_line", "flag_names", "set_flag_names", "to_flags", "run_command"]

# Errors the library raises for bad input (validation); anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError)

# Python argument names (of compare, run_nuts, fit_svi, VAEConfig, TrainingConfig...) -> the
# argparse ``dest`` of the flag that sets them, where the two differ.
PYTHON_NAMES = {
    "num_chains": "chains",
    "num_samples": "samples",
    "num_warmup": "warmup",
    "num_steps": "steps",
    "num_draws": "draws",
    "num_flows": "flows",
    "learning_rate": "lr",
    "latent_dim": "latent",
    "max_epochs": "epochs",
    "iwae_samples": "iw_train_samples",
    "kl_warmup_steps": "kl_warmup",
    "encoder_hidden": "hidden",
    "decoder_hidden": "hidden",
    "num_components": "components",
    "out_dir": "out",
    "directory": "out",
    "guide_names": "guides",
    "num_test": "num_test",
    "refine_steps": "refine_steps",
    "chunk_size": "chunk_size",
}


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``{python name: flag}`` for ``parser``: each option's ``dest`` (``target_accept`` ->
    ``--target-accept``) and each name of :data:`PYTHON_NAMES` whose flag ``parser`` has.
    Positionals are left out: ``model: has no latent site`` reads right as it is."""
    flags: dict[str, str] = {}
    for action in parser._actions:  # argparse has no public iterator over its actions
        if action.option_strings and action.dest not in (argparse.SUPPRESS, "help"):
            flags[action.dest] = max(action.option_strings, key=len)
    for python, dest in PYTHON_NAMES.items():
        if dest in flags and python not in flags:
            flags[python] = flags[dest]
    return flags


def set_flag_names(parser: argparse.ArgumentParser) -> None:
    """Store :func:`flag_names` as the ``cli_flags`` default of ``parser`` and of every
    sub-command under it, so a handler's ``args.cli_flags`` speaks its own command's flags."""
    parser.set_defaults(cli_flags=flag_names(parser))
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                set_flag_names(child)


def to_flags(message: str, flags: Mapping[str, str]) -> str:
    """Rewrite the Python argument names in ``message`` as ``flags`` spells them.

    A name is rewritten where it names an argument: followed by ``:`` or ``=`` (``num_chains:
    expected...``), quoted (``'num_chains'``), or dotted in a setting (``training.learning_rate``).
    Prose is left alone (``seed`` in "a fixed seed").
    """
    if not flags:
        return message
    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))
    argument = re.compile(rf"(?<![\w\-])(?:\w+\.)*({names})\b(?=\s*[:=]|\s+\S+\s+->)")
    quoted = re.compile(rf"(['\"])({names})\1")
    message = argument.sub(lambda m: flags[m.group(1)], message)
    return quoted.sub(lambda m: flags[m.group(2)], message)


def error_line(message: str, args: argparse.Namespace) -> str:
    """``vilab: error: MESSAGE`` with ``args``'s command flags in place of Python names."""
    return f"vilab: error: {to_flags(message, getattr(args, 'cli_flags', {}))}"


def run_command(args: argparse.Namespace) -> int:
    """Run ``args.func(args)``; a user error prints :func:`error_line` and returns 2, Ctrl-C
    prints ``vilab: interrupted`` and returns 130.

    With ``args.debug`` either is raised with its traceback instead.
    """
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as error:
        if getattr(args, "debug", False):
            raise
        print(error_line(str(error), args), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print("vilab: interrupted", file=sys.stderr)
        return 128 + 2  # the shell's status for SIGINT
