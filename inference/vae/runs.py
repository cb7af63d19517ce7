"""VAE run directories on disk: write the best weights, read a run back without executing code.

A run directory (written by :func:`~vilab.inference.vae.training.train_vae`) holds
``config.json``, ``model.safetensors``, ``checkpoints/{last,best}.ckpt`` and ``logs/csv-*``.
:func:`check_run_folder` guards it before training: a folder holding a run with other model or
optimisation settings is refused (naming each one), so ``config.json`` always describes the
weights beside it; :func:`set_aside_run` moves an old run away for a fresh start; and
:func:`trim_metrics` drops the log rows a killed run wrote after its last checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Optional

from vilab.fileio import atomic_path
from vilab.inference.vae.checkpoints import load_checkpoint, load_module, save_module
from vilab.models.vae.vae import VAE, VAEConfig, build_vae
from vilab.run_folders import RunFolderError, format_differences, settings_differences

__all__ = [
    "RESUMABLE_SETTINGS",
    "check_run_folder",
    "finish_run",
    "load_run",
    "read_metrics",
    "save_weights",
    "set_aside_run",
    "trim_metrics",
    "write_json",
]

# Settings of config.json that may change when a run is resumed: they change how long or where
# it trains, not the model, the data or the optimisation that produced its checkpoints.
RESUMABLE_SETTINGS = (
    "training.max_epochs",
    "training.patience",
    "training.progress",
    "training.max_time",
    "training.accelerator",
    "training.strategy",
    "training.validate_distributions",
    "data_dir",
)
# Keys of config.json that are records, not settings.
_RECORDS = ("resumes",)


def save_weights(vae: VAE, out_dir: str, source: str) -> str:
    """Write ``out_dir/model.safetensors`` (atomically) with the weights of a checkpoint.

    Args:
        vae: The run's VAE (built by :func:`~vilab.models.vae.vae.build_vae`, so it has ``.config``).
        out_dir: The run directory.
        source: A Lightning checkpoint whose weights are loaded into ``vae`` first; where it
            does not exist, ``vae``'s current weights are written.

    Returns:
        The path of ``model.safetensors``.
    """
    if os.path.exists(source):
        _load_weights_from_checkpoint(vae, source)
    path = os.path.join(out_dir, "model.safetensors")
    save_module(vae, path, metadata={"config": json.dumps(vae.config.to_dict()), "checkpoint": source})
    return path


def _load_weights_from_checkpoint(vae: VAE, path: str) -> None:
    state = load_checkpoint(path)["state_dict"]
    vae.load_state_dict(state, strict=True)


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` as JSON to ``path`` through a temporary file and a rename, so a kill
    never leaves half a file."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as file:
            json.dump(payload, file, indent=2, default=str)


def check_run_folder(out_dir: str, config: dict) -> dict:
    """Check that ``out_dir`` can take the run ``config``; return the ``config.json`` to write.

    ``out_dir`` may be absent, an empty folder, or a run whose recorded settings equal
    ``config`` except for :data:`RESUMABLE_SETTINGS`; those changes are returned recorded under
    ``"resumes"`` (a list of ``{setting: [old, new]}``). Nothing is written.

    Raises:
        RunFolderError: ``out_dir`` is a file, a non-empty folder without ``config.json``, or a
            run with other settings; ``error.differences`` maps each dotted setting to
            ``(old, new)``.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise RunFolderError(f"out_dir: {out_dir!r} is a file; expected a run folder")
    config_path = os.path.join(out_dir, "config.json")
    if not os.path.isfile(config_path):
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            raise RunFolderError(
                f"out_dir: {out_dir!r} holds files but no VAE run (config.json); "
                "expected an empty folder or a run folder; choose another one"
            )
        return config
    old = _read_config(out_dir)
    settings = {k: v for k, v in old.items() if k not in _RECORDS}
    differences = settings_differences(settings, config, ignore=RESUMABLE_SETTINGS)
    if differences:
        error = RunFolderError(
            f"out_dir: {out_dir!r} holds a run with other settings: {format_differences(differences)}; "
            "resume it with its own settings, or start over with resume=False (the old run is "
            "moved aside, not deleted)"
        )
        error.differences = differences
        raise error
    changed = settings_differences(settings, config)
    resumes = list(old.get("resumes", []))
    if changed:
        resumes.append({key: [before, after] for key, (before, after) in changed.items()})
    return {**config, "resumes": resumes} if resumes else config


def set_aside_run(out_dir: str) -> Optional[str]:
    """Rename a run folder ``out_dir`` to the first free ``out_dir.old-N``, so training can start
    over there without losing the old run; returns the new path (``None`` when ``out_dir`` holds
    no run).

    Raises:
        RunFolderError: ``out_dir`` is a file, or a non-empty folder that is not a run.
    """
    if not os.path.exists(out_dir) or (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        return None
    if not os.path.isfile(os.path.join(out_dir, "config.json")):
        check_run_folder(out_dir, {})  # raises: a file, or a folder of files that are no run
    base = os.path.normpath(out_dir)
    number = 1
    while os.path.exists(f"{base}.old-{number}"):
        number += 1
    os.replace(base, f"{base}.old-{number}")
    return f"{base}.old-{number}"


def trim_metrics(out_dir: str, step: int, *, keep: Optional[str] = None) -> int:
    """Drop the rows of ``out_dir/logs/csv-*/metrics.csv`` logged at ``step`` or later.

    A run killed mid-epoch resumes from its last checkpoint (taken after global step ``step``),
    so rows the killed process logged after it would be logged again: this removes them first.
    Each file is rewritten atomically; a row cut short by the kill is dropped too.

    Args:
        out_dir: The run directory.
        step: The global step of the checkpoint the run resumes from.
        keep: A log version (``"csv-2"``) to leave alone: the resumed run's own.

    Returns:
        The number of rows dropped.
    """
    dropped = 0
    for version in _log_versions(out_dir):
        path = os.path.join(out_dir, "logs", version, "metrics.csv")
        if version == keep or not os.path.isfile(path):
            continue
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            fields, rows = reader.fieldnames, list(reader)
        kept = [row for row in rows if _logged_before(row, step)]
        if len(kept) == len(rows):
            continue
        dropped += len(rows) - len(kept)
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=fields)
                writer.writeheader()
                writer.writerows(kept)
    return dropped


def _logged_before(row: dict[str, Any], step: int) -> bool:
    if None in row.values() or None in row:  # a line cut short (or run on) by a kill mid-write
        return False
    try:
        return int(float(row["step"])) < step
    except (KeyError, ValueError):
        return False


def _log_versions(out_dir: str) -> list[str]:
    log_dir = os.path.join(out_dir, "logs")
    if not os.path.isdir(log_dir):
        return []
    return sorted(
        (d for d in os.listdir(log_dir) if d.startswith("csv-") and d[4:].isdigit()), key=lambda d: int(d[4:])
    )


def finish_run(out_dir: str) -> str:
    """Write ``out_dir/model.safetensors`` from the run's best checkpoint (by validation bound;
    its last one where there is none), as :func:`~vilab.inference.vae.training.train_vae` does
    when training ends: for a run stopped by a signal or a non-finite loss, to evaluate it
    without training on.

    Returns:
        The path of ``model.safetensors``.

    Raises:
        FileNotFoundError: if ``out_dir`` is not a run directory or has no checkpoint.
        vilab.inference.vae.checkpoints.CheckpointError: if the checkpoint is truncated or tampered.
    """
    sources = [os.path.join(out_dir, "checkpoints", name) for name in ("best.ckpt", "last.ckpt")]
    source = next((path for path in sources if os.path.isfile(path)), None)
    vae = build_vae(VAEConfig.from_dict(_read_config(out_dir)["vae"]))
    if source is None:
        raise FileNotFoundError(
            f"out_dir: {out_dir!r} has no checkpoint (checkpoints/best.ckpt or "
            "last.ckpt); it stopped before its first epoch ended"
        )
    return save_weights(vae, out_dir, source)


def load_run(out_dir: str) -> tuple[VAE, dict]:
    """Rebuild the VAE of a run directory and load ``model.safetensors`` (no code executed).

    Returns:
        ``(vae, config)`` where ``config`` is the parsed ``config.json``.

    Raises:
        FileNotFoundError: if ``out_dir`` is not a run directory.
        vilab.inference.vae.checkpoints.CheckpointError: if the weights are truncated or tampered.
    """
    config = _read_config(out_dir)
    vae = build_vae(VAEConfig.from_dict(config["vae"]))
    load_module(vae, os.path.join(out_dir, "model.safetensors"))
    vae.eval()
    return vae, config


def _read_config(out_dir: str) -> dict:
    config_path = os.path.join(out_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"out_dir: {out_dir!r} is not a vilab VAE run (no config.json); create one with `vilab vae train --out DIR`"
        )
    with open(config_path) as file:
        return json.load(file)


def read_metrics(out_dir: str) -> list[dict[str, float]]:
    """Rows of every ``out_dir/logs/csv-*/metrics.csv`` (resumed runs in order) as dicts.

    Empty cells are dropped.
    """
    rows = []
    for version in _log_versions(out_dir):
        path = os.path.join(out_dir, "logs", version, "metrics.csv")
        if os.path.isfile(path):
            with open(path) as file:
                rows += [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(file)]
    return rows
