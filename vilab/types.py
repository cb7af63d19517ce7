"""Type aliases shared across vilab.

A *model* is a Pyro model function (or ``PyroModule``); a *guide* is a callable with the
model's signature; *samples* map site names to tensors with leading sample dimensions.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import numpy as np
import torch

__all__ = ["Model", "Guide", "Samples", "ArrayLike", "ReferenceDraws", "ELBOTerms", "LossOutput"]

Model = Callable[..., Any]
Guide = Callable[..., Any]
Samples = dict[str, torch.Tensor]
ArrayLike = Union[np.ndarray, torch.Tensor, float, int]
ReferenceDraws = Mapping[str, ArrayLike]


# Records of the VAE objectives (vilab.inference.vae.objectives), here so that models defining their
# own objective (the hyperspherical VAE) need not import the inference package.
class ELBOTerms(NamedTuple):
    """Per-datapoint ELBO pieces, each ``(batch,)`` (``kl_per_dim``: ``(batch, D)`` or ``None``)."""

    reconstruction: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: Optional[torch.Tensor]

    @property
    def elbo(self) -> torch.Tensor:
        return self.reconstruction - self.kl


class LossOutput(NamedTuple):
    """A scalar loss to minimise (per datapoint) and detached scalars to log."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
