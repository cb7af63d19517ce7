"""Save and load fitted guides without executing code (safetensors + JSON metadata).

A saved guide is its parameters plus the registry name and options that rebuild it; loading
rebuilds the guide for the model, runs it once on the data to create its parameters, and
copies the saved values in. Files are written atomically.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from pyro import poutine
from pyro.infer.autoguide import AutoMultivariateNormal
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vilab.fileio import atomic_path
from vilab.guides.registry import get_guide
from vilab.types import Guide, Model

__all__ = ["save_guide", "load_guide"]

_FORMAT = "vilab-guide-1"


def save_guide(guide: Guide, path: str | os.PathLike, *, name: str, options: Optional[dict] = None) -> None:
    """Write ``guide``'s parameters and how to rebuild it to ``path``.

    Args:
        guide: a fitted guide (an ``nn.Module``; call it once before saving).
        path: destination file (``.safetensors``).
        name: its registry name (``"fullrank"``...).
        options: the family options it was built with.
    """
    if not isinstance(guide, torch.nn.Module):
        raise TypeError(f"guide: expected an nn.Module guide; got {type(guide).__name__}")
    state = {k: v.detach().clone().contiguous() for k, v in guide.state_dict().items()}
    if not state:
        raise ValueError("guide: has no parameters yet; fit it (or call it once) before saving")
    metadata = {
        "format": _FORMAT,
        "name": name,
        "options": json.dumps(options or {}),
        "kind": "laplace-gaussian" if _is_laplace_gaussian(guide) else "registry",
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def _is_laplace_gaussian(guide) -> bool:
    # Pyro's laplace_approximation() returns a Gaussian whose loc/scale/scale_tril are buffers.
    return isinstance(guide, AutoMultivariateNormal) and "loc" in dict(guide.named_buffers())


def _laplace_gaussian(model, args, kwargs, state) -> AutoMultivariateNormal:
    """Rebuild the Gaussian of ``AutoLaplaceApproximation.laplace_approximation`` from its buffers."""
    guide = AutoMultivariateNormal(model)
    with torch.no_grad(), poutine.block():
        guide._setup_prototype(*args, **kwargs)
    for name in ("loc", "scale", "scale_tril"):
        if name not in state:
            raise ValueError(f"path: the saved Laplace guide lacks {name!r}")
        delattr(guide, name)
        guide.register_buffer(name, state[name])
    return guide


def load_guide(path: str | os.PathLike, model: Model, *args: Any, **kwargs: Any) -> Guide:
    """Rebuild a guide saved by :func:`save_guide` for ``model(*args, **kwargs)``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is truncated, tampered with, or not a vilab guide.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no saved guide at {os.fspath(path)!r}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"path: {os.fspath(path)!r} is not a readable guide file (truncated or corrupted): {error}"
        ) from error
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"path: expected a {_FORMAT} file; got format {metadata.get('format')!r}")
    if metadata.get("kind") == "laplace-gaussian":
        return _laplace_gaussian(model, args, kwargs, state)
    guide = get_guide(metadata["name"], model, **json.loads(metadata.get("options", "{}")))
    with torch.no_grad(), poutine.block():
        guide(*args, **kwargs)  # creates the parameters with their shapes
    try:
        guide.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"path: saved parameters do not fit this model's guide: {error}") from error
    return guide
