"""Evaluate a model at many posterior draws at once, checked against one-at-a-time traces.

Vectorising a model under an extra outer plate is fast but silently wrong for models that were
not written with batching in mind (matrix algebra on latents, Python control flow). Every
vectorised evaluation here is therefore compared with plain traces at two draws, and falls back
to a loop when they disagree.
"""
from __future__ import annotations

import warnings
from typing import Callable, Mapping, Optional

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from vilab.types import Model

__all__ = ["max_plate_nesting", "trace_model", "evaluate_draws", "DrawEvaluation", "is_data_site",
           "is_posterior_site"]

_DRAW_PLATE = "_vilab_draws"


def trace_model(model: Model, args: tuple, kwargs: dict, condition: Optional[Mapping] = None):
    """Trace ``model`` once (optionally conditioned) and return the pruned trace."""
    fn = poutine.condition(model, data=dict(condition)) if condition else model
    trace = poutine.trace(fn).get_trace(*args, **kwargs)
    trace.compute_log_prob()
    return trace


def max_plate_nesting(*traces, count_batch_dims: bool = False) -> int:
    """The deepest plate dim used by any sample site of ``traces`` (0 when there are no plates).

    With ``count_batch_dims``, a site's distribution batch dims count too: a batched sample
    statement outside any plate still occupies them (what a batching outer plate must clear).
    Subsample sites are skipped.
    """
    depth = 0
    for trace in traces:
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if count_batch_dims:
                depth = max(depth, len(site["fn"].batch_shape))
            for frame in site["cond_indep_stack"]:
                if frame.vectorized and frame.dim is not None:
                    depth = max(depth, -frame.dim)
    return depth


class DrawEvaluation(dict):
    """Per-draw values of a model's sites: ``values[name]`` has shape ``(num_draws, *shape)``;
    ``log_likelihood[name]`` holds the per-element log density of each observed site."""

    def __init__(self, values, log_likelihood, log_joint):
        super().__init__(values=values, log_likelihood=log_likelihood, log_joint=log_joint)


def _single(model, args, kwargs, draw: Mapping[str, torch.Tensor], observed: bool):
    trace = trace_model(model, args, kwargs, condition=draw)
    values, loglik = {}, {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        values[name] = site["value"].detach()
        if is_data_site(site) and name not in draw and observed:
            loglik[name] = site["log_prob"].detach()
    log_joint = sum(s["log_prob_sum"] for s in trace.nodes.values()
                    if s["type"] == "sample" and not site_is_subsample(s))
    return values, loglik, torch.as_tensor(log_joint).detach()


def _loop(model, args, kwargs, draws: Mapping[str, torch.Tensor], num_draws: int):
    per = [_single(model, args, kwargs, {k: v[i] for k, v in draws.items()}, True)
           for i in range(num_draws)]
    values = {k: torch.stack([p[0][k] for p in per]) for k in per[0][0]}
    loglik = {k: torch.stack([p[1][k] for p in per]) for k in per[0][1]}
    return values, loglik, torch.stack([p[2] for p in per])


def _vectorized(model, args, kwargs, draws, num_draws, template):
    nesting = max_plate_nesting(template)
    dim = -(nesting + 1)
    shaped = {}
    for name, value in draws.items():
        site = template.nodes[name]
        batch_rank = len(site["fn"].batch_shape)
        pad = (1,) * (nesting - batch_rank)
        shaped[name] = value.reshape((num_draws,) + pad + tuple(value.shape[1:]))

    def batched():
        with pyro.plate(_DRAW_PLATE, num_draws, dim=dim):
            return model(*args, **kwargs)

    trace = trace_model(batched, (), {}, condition=shaped)
    values, loglik = {}, {}
    log_joint = torch.zeros(num_draws)
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        single = template.nodes[name]
        log_prob = site["log_prob"].detach()
        log_joint = log_joint + log_prob.reshape(num_draws, -1).sum(-1)
        if is_data_site(site) and name not in draws:
            values[name] = site["value"].detach().expand((num_draws,) + tuple(single["value"].shape))
            loglik[name] = log_prob.reshape((num_draws,) + tuple(single["log_prob"].shape))
        else:
            values[name] = site["value"].detach().reshape((num_draws,) + tuple(single["value"].shape))
    return values, loglik, log_joint


def evaluate_draws(
    model: Model,
    args: tuple,
    kwargs: dict,
    draws: Mapping[str, torch.Tensor],
    *,
    vectorize: bool = True,
    warn_fn: Callable[[str], None] | None = None,
) -> DrawEvaluation:
    r"""Run ``model`` conditioned on each of ``num_draws`` draws of its latent sites.

    Args:
        model: The Pyro model.
        args, kwargs: The model's data.
        draws: latent site -> tensor of shape ``(num_draws, *site_shape)``.
        vectorize: try one batched trace first (checked against two single traces).

    Returns:
        A :class:`DrawEvaluation` with ``values`` (every sample site, incl. deterministic ones),
        ``log_likelihood`` (observed sites, per element) and ``log_joint`` (``(num_draws,)``).
    """
    if not draws:
        raise ValueError("draws: expected at least one latent site; got none")
    num_draws = next(iter(draws.values())).shape[0]
    with torch.no_grad():
        if vectorize and num_draws > 1:
            template = trace_model(model, args, kwargs, {k: v[0] for k, v in draws.items()})
            try:
                result = _vectorized(model, args, kwargs, draws, num_draws, template)
                if _agrees(model, args, kwargs, draws, result, num_draws):
                    return DrawEvaluation(*result)
                reason = "vectorised values differ from single traces"
            except (RuntimeError, ValueError, IndexError, NotImplementedError) as error:
                reason = f"{type(error).__name__}: {error}"
            (warn_fn or _warn)(f"model is not vectorisable over draws ({reason}); evaluating draws one by one")
        return DrawEvaluation(*_loop(model, args, kwargs, draws, num_draws))


def _agrees(model, args, kwargs, draws, result, num_draws) -> bool:
    values, loglik, log_joint = result
    for i in {0, num_draws - 1}:
        single_values, single_loglik, single_joint = _single(
            model, args, kwargs, {k: v[i] for k, v in draws.items()}, True)
        if not torch.allclose(log_joint[i], single_joint, rtol=1e-5, atol=1e-6):
            return False
        for name, value in single_values.items():
            if name not in values or values[name][i].shape != value.shape:
                return False
            if not torch.allclose(values[name][i].to(value.dtype), value, rtol=1e-5, atol=1e-6, equal_nan=True):
                return False
        if set(single_loglik) != set(loglik):
            return False
    return True


def is_data_site(site) -> bool:
    """An observed site holding data: not a ``pyro.factor`` term, not a ``pyro.deterministic``."""
    if site["type"] != "sample":
        return False
    infer = site["infer"]
    return (site["is_observed"] and not site_is_subsample(site)
            and not infer.get("is_auxiliary", False) and not infer.get("_deterministic", False))


def is_posterior_site(site) -> bool:
    """A latent sample site or a ``pyro.deterministic`` site: what a posterior draw holds."""
    if site["type"] != "sample" or site_is_subsample(site):
        return False
    return not site["is_observed"] or site["infer"].get("_deterministic", False)


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
