"""Where compiled kernels are cached, and the check that makes loading them safe.

Loading a cached kernel runs code: Inductor's generated Python source is executed and its
shared library loaded, and the virtual machine's library is loaded with ``ctypes``. Inductor's
default cache is ``<system temp dir>/torchinductor_<user>``, a path anyone on the machine can
create first and fill. So every cache vilab reads lives in one per-user directory,
``$VILAB_CACHE_DIR`` (default ``~/.cache/vilab``), and before anything in it is loaded the
directory must be owned by this user and writable by no one else, and so must every file a cache
marker names (:func:`private_file`: a regular file inside the directory); otherwise nothing is loaded
from it (kernels are compiled again or the run stays unfused) and :func:`cache_problem` says why.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

__all__ = ["cache_root", "inductor_cache_dir", "cache_problem", "private_directory", "private_file"]


def cache_root() -> Path:
    """``$VILAB_CACHE_DIR``, default ``~/.cache/vilab``."""
    return Path(os.environ.get("VILAB_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vilab"))


def private_directory(path: Path) -> Path:
    """Create ``path`` (mode 0700) if needed and check that it is a directory owned by this user
    and not writable by group or others, nor is any parent up to the cache root's. Raises
    ``PermissionError`` naming the path and the problem."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_owned(path, stat.S_ISDIR, "a directory, not a link or a file")
    return path


def _check_owned(path, kind, expected: str) -> None:
    """``path`` is of ``kind`` (``stat.S_ISDIR``, ``stat.S_ISREG``; never a link), owned by this
    user and writable by no one else; otherwise ``PermissionError`` naming the problem."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not kind(info.st_mode):
        raise PermissionError(f"{path}: expected {expected}")
    if info.st_uid != os.getuid():
        raise PermissionError(f"{path}: owned by uid {info.st_uid}, not by this user (uid {os.getuid()})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            f"{path}: writable by group or others (mode {stat.S_IMODE(info.st_mode):o}); run `chmod go-w {path}`"
        )


def private_file(path: str, root: Path) -> str:
    """``path`` where it may be loaded: a regular file (not a link) inside ``root`` (after
    resolving every link on the way), owned by this user and writable by no one else. A cache
    marker names the files a kernel is loaded from; this keeps a marker from pointing anywhere
    else (a shared temporary directory, another user's file). Raises ``PermissionError`` naming
    the path and the problem."""
    resolved = Path(os.path.realpath(path))
    if not resolved.is_relative_to(Path(os.path.realpath(root))):
        raise PermissionError(f"{path}: outside the private cache {root}; not loaded")
    _check_owned(path, stat.S_ISREG, "a regular file, not a link or a directory")
    return path


def inductor_cache_dir() -> Path:
    """The per-user directory for Inductor's cache, checked by :func:`private_directory`.
    A ``TORCHINDUCTOR_CACHE_DIR`` the user set is kept, and checked the same way."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and _is_inductor_default(chosen):
        chosen = None  # Inductor sets its default into the variable when it first runs
    return private_directory(Path(chosen) if chosen else cache_root() / "inductor")


def _is_inductor_default(path: str) -> bool:
    parent, name = os.path.split(os.path.abspath(path))
    return name.startswith("torchinductor_") and parent in (os.path.abspath(tempfile.gettempdir()), "/var/tmp")


def cache_problem() -> str:
    """Empty where the kernel cache may be used; otherwise why not. Sets
    ``TORCHINDUCTOR_CACHE_DIR`` to the checked directory, so Inductor (in this process and in
    forked compile servers) writes and reads there rather than in the shared temp directory."""
    try:
        directory = inductor_cache_dir()
    except OSError as error:
        return f"the kernel cache is not private ({error})"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    return ""
