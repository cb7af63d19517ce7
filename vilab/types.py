"""Type aliases shared across vilab.

A *model* is a Pyro model function (or ``PyroModule``); a *guide* is a callable with the
model's signature; *samples* map site names to tensors with leading sample dimensions.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import numpy as np
import torch

__all__ = ["Model", "Guide", "Samples", "ArrayLike", "ReferenceDraws"]

Model = Callable[..., Any]
Guide = Callable[..., Any]
Samples = dict[str, torch.Tensor]
ArrayLike = Union[np.ndarray, torch.Tensor, float, int]
ReferenceDraws = Mapping[str, ArrayLike]
