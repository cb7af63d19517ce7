"""Run folders that never mix two runs: settings compared before any work, folders swapped whole.

A run folder holds the results of one run and a record of the settings that produced them.
Before a command writes into a folder that already holds a run, :func:`settings_differences`
compares the recorded settings with the requested ones and :class:`RunFolderError` refuses
the folder, naming each differing setting as ``old -> new``. A folder that is written in one
go (a comparison report) is built in a temporary sibling and swapped into place by
:func:`atomic_directory`, so a crash leaves the old folder or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from vilab.errors import VilabError

__all__ = [
    "RunFolderError",
    "atomic_directory",
    "flatten_settings",
    "format_differences",
    "settings_differences",
]


class RunFolderError(VilabError, ValueError):
    """A run folder cannot be used as asked: it is a file, or it holds another run."""


def flatten_settings(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``.

    Tuples become lists, so settings read back from JSON compare equal to the ones written.
    """
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_settings(value, prefix=f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def _same(old: Any, new: Any) -> bool:
    # JSON turns tuples into lists and keeps 1e-3 as 0.001: compare as JSON would read them back.
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(_same(a, b) for a, b in zip(old, new))
    if isinstance(old, bool) or isinstance(new, bool):
        return old is new or old == new and type(old) is type(new)
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return float(old) == float(new)
    return old == new


_MISSING = "(not set)"


def settings_differences(
    old: Mapping[str, Any], new: Mapping[str, Any], *, ignore: Iterable[str] = ()
) -> dict[str, tuple[Any, Any]]:
    """The settings that differ between ``old`` and ``new`` (nested dicts compared key by key).

    Args:
        old: Recorded settings (e.g. a run's ``config.json``).
        new: Requested settings.
        ignore: Dotted keys (``"training.max_epochs"``) allowed to differ.

    Returns:
        ``{dotted key: (old value, new value)}`` in sorted key order; a key present on one side
        only has the value ``"(not set)"`` on the other.
    """
    ignored = set(ignore)
    flat_old, flat_new = flatten_settings(old), flatten_settings(new)
    differences = {}
    for key in sorted(set(flat_old) | set(flat_new)):
        if key in ignored:
            continue
        before, after = flat_old.get(key, _MISSING), flat_new.get(key, _MISSING)
        if not _same(before, after):
            differences[key] = (before, after)
    return differences


def format_differences(differences: Mapping[str, tuple[Any, Any]], names: Mapping[str, str] | None = None) -> str:
    """``"latent_dim 32 -> 16, learning_rate 0.001 -> 0.01"``; ``names`` renames keys (to CLI flags)."""
    names = names or {}
    return ", ".join(f"{names.get(key, key)} {old!r} -> {new!r}" for key, (old, new) in differences.items())


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` whole.

    The old folder (if any) is renamed aside, the new one renamed onto ``path``, then the old
    one deleted: a crash at any point leaves either the complete old folder or the complete new
    one at ``path`` (plus, at worst, a hidden ``.NAME.*`` sibling to delete). On an exception the
    temporary folder is removed and ``path`` is untouched.

    Raises:
        RunFolderError: if ``path`` exists and is not a folder.
    """
    path = Path(os.path.abspath(path))  # "." and "runs/x/" have a name to build beside
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"out: {str(path)!r} is a file; expected a folder (or a path that does not exist)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; results are meant to be shared
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)  # rename(2) is atomic within one file system
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
