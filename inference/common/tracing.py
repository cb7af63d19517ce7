"""Evaluate a model at many posterior draws at once, checked against one-at-a-time traces.

Vectorising a model under an extra outer plate is fast but silently wrong for models that were
not written with batching in mind (matrix algebra on latents, Python control flow). Every
vectorised evaluation here is therefore compared with plain traces, and falls back to a loop
when they disagree.

Memory is bounded: draws are evaluated in chunks of at most ``max_elements`` numbers per site
tensor (:data:`MAX_ELEMENTS_PER_CHUNK` by default). A two-draw probe chunk comes first, so a
model that broadcasts wrongly over the draw plate (its tensors growing as the square of the
number of draws, e.g. a scalar latent written ``alpha.unsqueeze(-1)`` next to
``beta[..., g, :]``) is caught at a few kilobytes and evaluated one draw at a time instead.
"""

from __future__ import annotations

import warnings
from typing import Callable, Mapping, Optional

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from vilab.inference.common.enumeration import discrete_posterior_draws, enumerated_sites, marginal_log_joint
from vilab.inference.common.model_handlers import improper_init
from vilab.types import Model

__all__ = [
    "max_plate_nesting",
    "trace_model",
    "evaluate_draws",
    "DrawEvaluation",
    "is_data_site",
    "is_posterior_site",
    "MAX_ELEMENTS_PER_CHUNK",
    "draws_per_chunk",
]

_DRAW_PLATE = "_vilab_draws"
# Numbers per site tensor in one vectorised chunk: 2**22 float64 values are 32 MiB.
MAX_ELEMENTS_PER_CHUNK = 2**22
# Draws in the first, probing chunk.
_PROBE = 2


class _BroadcastError(ValueError):
    """A site's batched tensor is larger than the draws times its one-draw size."""


def trace_model(model: Model, args: tuple, kwargs: dict, condition: Optional[Mapping] = None):
    """Trace ``model`` once (optionally conditioned) and return the pruned trace.

    An ``ImproperUniform`` site without a value is placed uniformly in (-2, 2) on its
    unconstrained space (:func:`~vilab.inference.common.model_handlers.improper_init`): it cannot be
    sampled.
    """
    fn = poutine.condition(model, data=dict(condition)) if condition else model
    trace = poutine.trace(improper_init(fn)).get_trace(*args, **kwargs)
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
    log_joint = sum(
        s["log_prob_sum"] for s in trace.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)
    )
    return values, loglik, torch.as_tensor(log_joint).detach()


def _loop(model, args, kwargs, draws: Mapping[str, torch.Tensor], num_draws: int):
    per = [_single(model, args, kwargs, {k: v[i] for k, v in draws.items()}, True) for i in range(num_draws)]
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
        if log_prob.numel() > num_draws * max(torch.as_tensor(single["log_prob"]).numel(), 1):
            raise _BroadcastError(
                f"site {name!r}: log density of shape {tuple(log_prob.shape)} for "
                f"{num_draws} draws of shape {tuple(single['log_prob'].shape)}"
            )
        log_joint = log_joint + log_prob.reshape(num_draws, -1).sum(-1)
        if is_data_site(site) and name not in draws:
            values[name] = site["value"].detach().expand((num_draws,) + tuple(single["value"].shape))
            loglik[name] = log_prob.reshape((num_draws,) + tuple(single["log_prob"].shape))
        else:
            values[name] = site["value"].detach().reshape((num_draws,) + tuple(single["value"].shape))
    return values, loglik, log_joint


def _vmapped_checked(model, args, kwargs, draws, num_draws, reason, chunk):
    """:func:`_vmapped`, checked against single traces at both ends; ``(result, None)`` or
    ``(None, reason)``."""
    try:
        result = _vmapped(model, args, kwargs, draws, num_draws, chunk)
    except (RuntimeError, ValueError, IndexError, NotImplementedError, TypeError, AssertionError) as error:
        return None, f"{reason}; under torch.func.vmap: {type(error).__name__}: {error}"
    if not _agrees(model, args, kwargs, draws, result, {0, num_draws - 1}):
        return None, f"{reason}; under torch.func.vmap: values differ from single traces"
    return result, None


def _vmapped(model, args, kwargs, draws, num_draws, chunk):
    def one(draw):
        return _single(model, args, kwargs, draw, True)

    pieces = []
    with pyro.validation_enabled(False):  # value checks would read batched tensors
        for start in range(0, num_draws, chunk):
            pieces.append(torch.func.vmap(one)({k: v[start : start + chunk] for k, v in draws.items()}))
    values = {k: torch.cat([p[0][k] for p in pieces]) for k in pieces[0][0]}
    loglik = {k: torch.cat([p[1][k] for p in pieces]) for k in pieces[0][1]}
    return values, loglik, torch.cat([p[2] for p in pieces])


def evaluate_draws(
    model: Model,
    args: tuple,
    kwargs: dict,
    draws: Mapping[str, torch.Tensor],
    *,
    vectorize: bool = True,
    warn_fn: Callable[[str], None] | None = None,
    max_elements: int = MAX_ELEMENTS_PER_CHUNK,
    marginalize: bool = True,
) -> DrawEvaluation:
    r"""Run ``model`` conditioned on each of ``num_draws`` draws of its latent sites.

    A model's enumerated discrete sites (``config_enumerate``) that ``draws`` lacks are first
    drawn from their conditional posterior given each draw
    (:func:`~vilab.inference.common.enumeration.discrete_posterior_draws`); ``values`` hold those
    draws and ``log_likelihood`` is computed given them.

    Args:
        model: The Pyro model.
        args, kwargs: The model's data.
        draws: latent site -> tensor of shape ``(num_draws, *site_shape)``.
        vectorize: evaluate chunks of draws as batched traces (each checked against single
            traces), falling back to one trace per draw.
        max_elements: the most numbers a site's tensor may hold in one batched trace; a chunk
            holds :func:`draws_per_chunk` draws.
        marginalize: with enumerated sites, make ``log_joint`` the marginal
            :math:`\log p(x, \theta)` (one ``TraceEnum_ELBO`` evaluation per draw) rather than
            :math:`\log p(x, z, \theta)` at the posterior draw of :math:`z`.

    Returns:
        A :class:`DrawEvaluation` with ``values`` (every sample site, incl. deterministic ones),
        ``log_likelihood`` (observed sites, per element) and ``log_joint`` (``(num_draws,)``).
    """
    if not draws:
        raise ValueError("draws: expected at least one latent site; got none")
    num_draws = next(iter(draws.values())).shape[0]
    with torch.no_grad():
        template = trace_model(model, args, kwargs, {k: v[0] for k, v in draws.items()})
        marginal = None
        if any(name not in draws for name in enumerated_sites(template)):
            if marginalize:
                marginal = marginal_log_joint(model, args, kwargs, draws, template)
            draws = {**draws, **_discrete_draws(model, args, kwargs, draws, template, max_elements)}
            template = trace_model(model, args, kwargs, {k: v[0] for k, v in draws.items()})
        result = None
        if vectorize and num_draws > 1:
            result, reason = _chunked(model, args, kwargs, draws, template, draws_per_chunk(template, max_elements))
            if result is None:  # a model written for one draw (no plate broadcasting) still runs under vmap
                result, reason = _vmapped_checked(
                    model, args, kwargs, draws, num_draws, reason, draws_per_chunk(template, max_elements)
                )
            if result is None:
                (warn_fn or _warn)(f"model is not vectorisable over draws ({reason}); evaluating draws one by one")
        values, loglik, log_joint = result or _loop(model, args, kwargs, draws, num_draws)
        return DrawEvaluation(values, loglik, log_joint if marginal is None else marginal)


def _discrete_draws(model, args, kwargs, draws, template, max_elements) -> dict[str, torch.Tensor]:
    """Posterior draws of the enumerated sites, chunk by chunk: enumeration multiplies a
    chunk's tensors by the number of values a site takes."""
    values = max(
        int(template.nodes[name]["fn"].enumerate_support(expand=False).numel()) for name in enumerated_sites(template)
    )
    chunk = draws_per_chunk(template, max(1, max_elements // values))
    num_draws = next(iter(draws.values())).shape[0]
    parts = [
        discrete_posterior_draws(model, args, kwargs, {k: v[start : start + chunk] for k, v in draws.items()}, template)
        for start in range(0, num_draws, chunk)
    ]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def draws_per_chunk(template, max_elements: int = MAX_ELEMENTS_PER_CHUNK) -> int:
    """How many draws one batched trace may hold: ``max_elements`` over the largest site
    tensor (value or log density) of one draw's ``template`` trace; at least one."""
    per_draw = max(
        (
            max(torch.as_tensor(site["value"]).numel(), torch.as_tensor(site.get("log_prob", 0.0)).numel())
            for site in template.nodes.values()
            if site["type"] == "sample"
        ),
        default=1,
    )
    return max(1, max_elements // max(per_draw, 1))


def _chunked(model, args, kwargs, draws, template, chunk: int):
    """Batched evaluation chunk by chunk, the first a small probe; ``(result, None)``, or
    ``(None, reason)`` at the first chunk that fails or disagrees with single traces."""
    num_draws = next(iter(draws.values())).shape[0]
    starts = [0, *range(min(_PROBE, num_draws), num_draws, chunk)]
    parts = []
    for start, stop in zip(starts, [*starts[1:], num_draws]):
        part = {k: v[start:stop] for k, v in draws.items()}
        try:
            result = _vectorized(model, args, kwargs, part, stop - start, template)
        # AssertionError: a model's own shape asserts (NumPyro's BNN example) fail under the batch.
        except (RuntimeError, ValueError, IndexError, NotImplementedError, TypeError, AssertionError) as error:
            return None, f"{type(error).__name__}: {error}"
        # The probe is checked at both ends, every later chunk at its last draw.
        checked = {0, stop - start - 1} if start == 0 else {stop - start - 1}
        if not _agrees(model, args, kwargs, part, result, checked):
            return None, "vectorised values differ from single traces"
        parts.append(result)
    values = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
    loglik = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
    return (values, loglik, torch.cat([p[2] for p in parts])), None


def _agrees(model, args, kwargs, draws, result, indices) -> bool:
    values, loglik, log_joint = result
    for i in indices:
        single_values, single_loglik, single_joint = _single(
            model, args, kwargs, {k: v[i] for k, v in draws.items()}, True
        )
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
    return (
        site["is_observed"]
        and not site_is_subsample(site)
        and not infer.get("is_auxiliary", False)
        and not infer.get("_deterministic", False)
    )


def is_posterior_site(site) -> bool:
    """A latent sample site or a ``pyro.deterministic`` site: what a posterior draw holds."""
    if site["type"] != "sample" or site_is_subsample(site):
        return False
    return not site["is_observed"] or site["infer"].get("_deterministic", False)


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
