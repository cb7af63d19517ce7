"""Atomic, checksummed, code-free checkpoints.

Two formats, both loadable without executing code from the file:

* **safetensors** for final weights (:func:`save_safetensors`, :func:`load_safetensors`,
  :func:`save_module`, :func:`load_module`); a SHA-256 of the tensors is kept in the header
  metadata;
* **torch zip** for training state (Lightning checkpoints with optimizer and loop state), read
  with ``torch.load(weights_only=True)``; a SHA-256 of the whole content is stored under the key
  ``"vilab_checksum"`` (:func:`save_checkpoint`, :func:`load_checkpoint`).

Every save writes a temporary file in the target directory, flushes it to disk and renames it
over the target, so a killed process leaves either the old file or the new one, never half a
file. A truncated, tampered or foreign file raises :class:`CheckpointError` naming the path.
:class:`AtomicCheckpointIO` plugs the torch format into Lightning's ``Trainer``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Optional

import torch
from lightning.pytorch.plugins.io import CheckpointIO
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from vilab.fileio import atomic_path
from vilab.errors import CheckpointError

__all__ = [
    "CheckpointError",
    "content_digest",
    "atomic_write",
    "save_checkpoint",
    "load_checkpoint",
    "save_safetensors",
    "load_safetensors",
    "save_module",
    "load_module",
    "AtomicCheckpointIO",
]

_CHECKSUM_KEY = "vilab_checksum"


def _feed(hasher, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        flat = torch.empty(obj.numel(), dtype=obj.dtype).copy_(obj.detach().cpu().reshape(-1))
        hasher.update(f"T{flat.dtype}{tuple(obj.shape)}".encode())
        hasher.update(flat.view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        hasher.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            hasher.update(repr(key).encode())
            _feed(hasher, obj[key])
    elif isinstance(obj, (list, tuple)):
        hasher.update(f"L{len(obj)}".encode())
        for item in obj:
            _feed(hasher, item)
    else:
        hasher.update(f"S{type(obj).__name__}:{obj!r}".encode())


def content_digest(obj: Any) -> str:
    """SHA-256 over nested dicts/lists/tensors/scalars, independent of dict order."""
    hasher = hashlib.sha256()
    _feed(hasher, obj)
    return hasher.hexdigest()


def atomic_write(path: str, write_fn: Callable[[Any], None]) -> None:
    """Call ``write_fn(file)`` on a temporary file next to ``path``, fsync, then rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as file:
            write_fn(file)
            file.flush()
            os.fsync(file.fileno())


def save_checkpoint(checkpoint: dict[str, Any], path: str) -> None:
    """Atomically save a dict of tensors/scalars/containers with an embedded checksum.

    Raises:
        TypeError: if ``checkpoint`` is not a dict.
    """
    if not isinstance(checkpoint, dict):
        raise TypeError(f"checkpoint: expected a dict; got {type(checkpoint).__name__}")
    payload = {k: v for k, v in checkpoint.items() if k != _CHECKSUM_KEY}
    payload[_CHECKSUM_KEY] = content_digest(payload)
    atomic_write(path, lambda file: torch.save(payload, file))


def load_checkpoint(path: str, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a file written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: if the file is missing, truncated, holds code objects, lacks the
            checksum or its content does not match it.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError/UnpicklingError/EOFError/...
        raise CheckpointError(
            f"checkpoint {path!r} cannot be read safely (truncated, corrupted or holding non-tensor objects): {error}"
        ) from error
    if not isinstance(payload, dict) or _CHECKSUM_KEY not in payload:
        raise CheckpointError(
            f"checkpoint {path!r} has no {_CHECKSUM_KEY!r}; it was not written "
            "by vilab.inference.vae.checkpoints.save_checkpoint"
        )
    expected = payload.pop(_CHECKSUM_KEY)
    if content_digest(payload) != expected:
        raise CheckpointError(f"checkpoint {path!r} fails its checksum: its content was modified after it was saved")
    return payload


def save_safetensors(tensors: dict[str, torch.Tensor], path: str, *, metadata: Optional[dict[str, str]] = None) -> None:
    """Atomically save tensors as safetensors with a SHA-256 of the tensors in the metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = dict(metadata or {})
    meta[_CHECKSUM_KEY] = content_digest(tensors)
    data = safetensors_save(tensors, metadata=meta)
    atomic_write(path, lambda file: file.write(data))


def load_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load ``(tensors, metadata)`` saved by :func:`save_safetensors`, checking the checksum.

    Raises:
        CheckpointError: if the file is missing, truncated or tampered with.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file {path!r} does not exist")
    with open(path, "rb") as file:
        data = file.read()
    try:
        tensors = safetensors_load(data)
        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__", {})
    except (SafetensorError, ValueError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"weights file {path!r} is not a readable safetensors file (truncated or corrupted?): {error}"
        ) from error
    expected = metadata.pop(_CHECKSUM_KEY, None)
    if expected is None or content_digest(tensors) != expected:
        raise CheckpointError(
            f"weights file {path!r} fails its checksum: its content was "
            "modified after it was saved (or it was not written by vilab)"
        )
    return tensors, metadata


def save_module(module: nn.Module, path: str, *, metadata: Optional[dict[str, str]] = None) -> None:
    """Atomically save ``module.state_dict()`` as checksummed safetensors."""
    save_safetensors(dict(module.state_dict()), path, metadata=metadata)


def load_module(module: nn.Module, path: str) -> dict[str, str]:
    """Load weights saved by :func:`save_module` into ``module`` (strict); return the metadata."""
    tensors, metadata = load_safetensors(path)
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"weights file {path!r} does not fit this model: {error}") from error
    return metadata


class AtomicCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO``: atomic, checksummed saves; ``weights_only`` loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        save_checkpoint(checkpoint, str(path))

    def load_checkpoint(self, path, map_location: Any = "cpu", weights_only=None) -> dict[str, Any]:
        return load_checkpoint(str(path), map_location=map_location)

    def remove_checkpoint(self, path) -> None:
        if os.path.exists(path):
            os.remove(path)
