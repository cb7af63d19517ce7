"""Draws from a fitted guide with their log density, vectorised where the guide allows.

Vectorised draws come in chunks of at most :data:`~vilab.inference.common.tracing.MAX_ELEMENTS_PER_CHUNK`
numbers (counting every latent site of one draw, as a joint guide's latent vector does), so the
guide's own per-draw tensors stay bounded whatever ``num_samples`` is.
"""

from __future__ import annotations

from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from vilab.inference.common.enumeration import enumerated_sites
from vilab.inference.common.tracing import MAX_ELEMENTS_PER_CHUNK, is_posterior_site, max_plate_nesting
from vilab.types import Guide, Samples

__all__ = ["GuideDraws", "draw_from_guide"]


class GuideDraws(NamedTuple):
    """``samples``: latent site -> ``(num_samples, *site_shape)``; ``log_q``: ``(num_samples,)``."""

    samples: Samples
    log_q: torch.Tensor


def _log_q(trace, num_samples: int | None) -> torch.Tensor:
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site):
            log_prob = site["log_prob"]
            total = total + (log_prob.reshape(num_samples, -1).sum(-1) if num_samples else log_prob.sum())
    return torch.as_tensor(total)


def _vectorized(guide, args, kwargs, num_samples, model_trace, latent):
    dim = -(max_plate_nesting(model_trace) + 1)

    def batched():
        with pyro.plate("_vilab_guide_draws", num_samples, dim=dim):
            return guide(*args, **kwargs)

    trace = poutine.trace(batched).get_trace()
    trace.compute_log_prob()
    samples = {
        name: trace.nodes[name]["value"].reshape((num_samples,) + model_trace.nodes[name]["value"].shape)
        for name in latent
    }
    return GuideDraws(samples, _log_q(trace, num_samples).expand(num_samples).clone())


def _looped(guide, args, kwargs, num_samples, latent):
    values, log_q = {name: [] for name in latent}, []
    for _ in range(num_samples):
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
        trace.compute_log_prob()
        for name in latent:
            values[name].append(trace.nodes[name]["value"])
        log_q.append(_log_q(trace, None))
    return GuideDraws({k: torch.stack(v) for k, v in values.items()}, torch.stack(log_q))


def _chunked(guide, args, kwargs, num_samples, model_trace, latent, max_elements) -> GuideDraws:
    per_draw = sum(model_trace.nodes[name]["value"].numel() for name in latent)
    chunk = max(1, max_elements // max(per_draw, 1))
    parts = [
        _vectorized(guide, args, kwargs, min(chunk, num_samples - start), model_trace, latent)
        for start in range(0, num_samples, chunk)
    ]
    return GuideDraws(
        {k: torch.cat([p.samples[k] for p in parts]) for k in latent}, torch.cat([p.log_q for p in parts])
    )


@torch.no_grad()
def draw_from_guide(
    guide: Guide,
    args: tuple,
    kwargs: dict,
    num_samples: int,
    model_trace,
    *,
    max_elements: int = MAX_ELEMENTS_PER_CHUNK,
) -> GuideDraws:
    """Draw ``num_samples`` latent values from ``guide`` and their :math:`\\log q(z)`.

    Args:
        guide: a fitted guide (callable with the model's signature).
        args, kwargs: the model's data.
        num_samples: ``S``.
        model_trace: one trace of the model (gives latent names, shapes and plate depth).
        max_elements: the most latent numbers drawn in one vectorised call of the guide.
    """
    # Enumerated sites are summed out by the objective, not drawn by the guide.
    enumerated = set(enumerated_sites(model_trace))
    latent = [
        n for n, s in model_trace.nodes.items() if is_posterior_site(s) and not s["is_observed"] and n not in enumerated
    ]
    try:
        draws = _chunked(guide, args, kwargs, num_samples, model_trace, latent, max_elements)
    except (RuntimeError, ValueError, KeyError, NotImplementedError, IndexError):
        draws = None
    if draws is None or not torch.isfinite(draws.log_q).any():
        draws = _looped(guide, args, kwargs, num_samples, latent)
    return draws
