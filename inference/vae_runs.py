"""VAE run directories on disk: write the best weights, read a run back without executing code.

A run directory (written by :func:`~vilab.inference.vae_training.train_vae`) holds
``config.json``, ``model.safetensors``, ``checkpoints/{last,best}.ckpt`` and ``logs/csv-*``.
"""
from __future__ import annotations

import csv
import json
import os

from vilab.inference.checkpoints import load_checkpoint, load_module, save_module
from vilab.models.vae import VAE, VAEConfig, build_vae

__all__ = ["finish_run", "load_run", "read_metrics", "save_weights", "write_json"]


def save_weights(vae: VAE, out_dir: str, source: str) -> str:
    """Write ``out_dir/model.safetensors`` (atomically) with the weights of a checkpoint.

    Args:
        vae: The run's VAE (built by :func:`~vilab.models.vae.build_vae`, so it has ``.config``).
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
    tmp = path + ".tmp"
    with open(tmp, "w") as file:
        json.dump(payload, file, indent=2, default=str)
    os.replace(tmp, path)


def finish_run(out_dir: str) -> str:
    """Write ``out_dir/model.safetensors`` from the run's best checkpoint (by validation bound;
    its last one where there is none), as :func:`~vilab.inference.vae_training.train_vae` does
    when training ends: for a run stopped by a signal or a non-finite loss, to evaluate it
    without training on.

    Returns:
        The path of ``model.safetensors``.

    Raises:
        FileNotFoundError: if ``out_dir`` is not a run directory or has no checkpoint.
        vilab.inference.checkpoints.CheckpointError: if the checkpoint is truncated or tampered.
    """
    sources = [os.path.join(out_dir, "checkpoints", name) for name in ("best.ckpt", "last.ckpt")]
    source = next((path for path in sources if os.path.isfile(path)), None)
    vae = build_vae(VAEConfig.from_dict(_read_config(out_dir)["vae"]))
    if source is None:
        raise FileNotFoundError(f"out_dir: {out_dir!r} has no checkpoint (checkpoints/best.ckpt or "
                                "last.ckpt); it stopped before its first epoch ended")
    return save_weights(vae, out_dir, source)


def load_run(out_dir: str) -> tuple[VAE, dict]:
    """Rebuild the VAE of a run directory and load ``model.safetensors`` (no code executed).

    Returns:
        ``(vae, config)`` where ``config`` is the parsed ``config.json``.

    Raises:
        FileNotFoundError: if ``out_dir`` is not a run directory.
        vilab.inference.checkpoints.CheckpointError: if the weights are truncated or tampered.
    """
    config = _read_config(out_dir)
    vae = build_vae(VAEConfig.from_dict(config["vae"]))
    load_module(vae, os.path.join(out_dir, "model.safetensors"))
    vae.eval()
    return vae, config


def _read_config(out_dir: str) -> dict:
    config_path = os.path.join(out_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"out_dir: {out_dir!r} is not a vilab VAE run (no config.json); "
                                "create one with `vilab vae train --out DIR`")
    with open(config_path) as file:
        return json.load(file)


def read_metrics(out_dir: str) -> list[dict[str, float]]:
    """Rows of every ``out_dir/logs/csv-*/metrics.csv`` (resumed runs in order) as dicts.

    Empty cells are dropped.
    """
    log_dir = os.path.join(out_dir, "logs")
    if not os.path.isdir(log_dir):
        return []
    rows = []
    versions = sorted((d for d in os.listdir(log_dir) if d.startswith("csv-")),
                      key=lambda d: int(d.split("-")[1]))
    for version in versions:
        path = os.path.join(log_dir, version, "metrics.csv")
        if os.path.isfile(path):
            with open(path) as file:
                rows += [{k: float(v) for k, v in row.items() if v not in ("", None)}
                         for row in csv.DictReader(file)]
    return rows
