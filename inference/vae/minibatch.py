"""A small Adam loop for models whose loss needs more than the images (labels, sequences).

The Lightning trainer in :mod:`vilab.inference.vae.training` feeds ``batch[0]`` to a loss;
the sequential and multimodal models here need whole batches, so :func:`fit_minibatch` calls
``loss_fn(batch, step) -> (loss, metrics)`` and returns a plain record.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import nn

__all__ = ["MinibatchResult", "fit_minibatch"]


class MinibatchResult(NamedTuple):
    """Per-epoch mean loss and metrics, and the wall time in seconds."""

    losses: list[float]
    metrics: list[dict[str, float]]
    wall_time: float


def fit_minibatch(
    module: nn.Module,
    loss_fn: Callable[[Any, int], tuple[torch.Tensor, dict]],
    loader: Iterable,
    *,
    num_epochs: int = 1,
    learning_rate: float = 1e-3,
    max_seconds: float = math.inf,
    gradient_clip: float = 10.0,
) -> MinibatchResult:
    """Minimise ``loss_fn(batch, step)`` over ``module.parameters()`` with Adam.

    Args:
        module: Holds every trained parameter.
        loss_fn: ``(batch, step) -> (scalar loss, {name: float})``.
        loader: Re-iterable batches.
        num_epochs: Passes over ``loader``.
        learning_rate: Adam step size.
        max_seconds: Stop after this wall-clock budget (checked after each step).
        gradient_clip: Gradient-norm clip.

    Raises:
        ValueError: for a non-positive epoch count or a non-finite loss (naming the step).
    """
    if num_epochs < 1:
        raise ValueError(f"num_epochs: expected a positive integer; got {num_epochs}")
    optimizer = torch.optim.Adam(module.parameters(), lr=learning_rate)
    losses, history, step, start = [], [], 0, time.perf_counter()
    for _ in range(num_epochs):
        totals, count = {}, 0
        for batch in loader:
            loss, metrics = loss_fn(batch, step)
            if not torch.isfinite(loss):
                raise ValueError(f"loss: became {loss.item()} at step {step}")
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(module.parameters(), gradient_clip)
            optimizer.step()
            step, count = step + 1, count + 1
            for key, value in {"loss": float(loss.detach()), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            if time.perf_counter() - start > max_seconds:
                break
        history.append({key: value / max(count, 1) for key, value in totals.items()})
        losses.append(history[-1].get("loss", math.nan))
        if time.perf_counter() - start > max_seconds:
            break
    return MinibatchResult(losses, history, time.perf_counter() - start)
