"""Checks at the public boundary: data, configuration and what a model asks of a guide."""
from __future__ import annotations

import numbers
from typing import Any, Iterable, Optional

import numpy as np
import torch
from pyro.poutine.util import site_is_subsample

from vilab.inference.tracing import trace_model
from vilab.types import Model

__all__ = ["check_finite_data", "check_init_values", "check_model", "check_positive_int", "check_probability"]


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``; else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int >= {minimum}; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}; got {value}")
    return int(value)


def check_probability(value: Any, name: str) -> float:
    """Return ``value`` if it lies strictly between 0 and 1."""
    if not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name}: expected a number in (0, 1); got {value!r}")
    return float(value)


def _arrays(args: tuple, kwargs: dict) -> Iterable[tuple[str, Any]]:
    for i, value in enumerate(args):
        yield f"args[{i}]", value
    for key, value in kwargs.items():
        yield key, value


def check_finite_data(args: tuple, kwargs: dict) -> None:
    """Raise ``ValueError`` naming the first data argument that holds NaN or inf."""
    for name, value in _arrays(args, kwargs):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            bad = ~torch.isfinite(value)
        elif isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
            bad = ~np.isfinite(value)
        else:
            continue
        if bad.any():
            count = int(bad.sum())
            raise ValueError(
                f"{name}: expected finite data; got {count} NaN/inf value(s) of {value.size if isinstance(value, np.ndarray) else value.numel()} "
                "(drop or impute them before fitting)")


def _describe(args: tuple, kwargs: dict) -> str:
    parts = []
    for name, value in _arrays(args, kwargs):
        shape = getattr(value, "shape", None)
        parts.append(f"{name}: shape {tuple(shape)}" if shape is not None else f"{name}: {type(value).__name__}")
    return "; ".join(parts) or "no arguments"


def check_model(model: Model, args: tuple, kwargs: dict, *, allow_enumerated: bool = False):
    """Trace ``model`` once and check it can be fitted with continuous guides.

    Returns:
        The model trace (log probs computed).

    Raises:
        ValueError: if tracing fails (with the data shapes), if a latent site is discrete
            (unless marked for enumeration and ``allow_enumerated``), or if there is no latent site.
    """
    if not callable(model):
        raise TypeError(f"model: expected a Pyro model (a callable); got {type(model).__name__}")
    check_finite_data(args, kwargs)
    try:
        trace = trace_model(model, args, kwargs)
    except (ValueError, RuntimeError, IndexError, TypeError) as error:
        raise ValueError(
            f"model: failed when run with the given data ({type(error).__name__}: {error}). "
            f"Data passed: {_describe(args, kwargs)}") from error
    latent = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        latent.append(name)
        if site["fn"].has_enumerate_support:
            if allow_enumerated and site["infer"].get("enumerate") == "parallel":
                continue
            raise ValueError(
                f"model: site {name!r} is a discrete latent variable ({type(site['fn']).__name__}); "
                "vilab's guides are continuous. Marginalise it out (e.g. MixtureSameFamily, "
                "DiscreteHMM), or enumerate it: decorate the model with "
                "pyro.infer.config_enumerate and use run_nuts, which sums enumerated sites out")
    if not latent:
        raise ValueError("model: has no latent sample site (every site is observed); nothing to infer")
    return trace


def check_init_values(init_values: Optional[dict], trace, num_chains: int) -> Optional[dict[str, torch.Tensor]]:
    """Validate MCMC starting values against the model's ``trace``.

    Args:
        init_values: constrained values of some or all latent sites, each of the site's shape
            (every chain starts there) or ``(num_chains, *site_shape)`` (one per chain); or ``None``.
        trace: the model's trace (:func:`check_model`).
        num_chains: number of chains.

    Returns:
        ``{site: (num_chains, *site_shape) tensor}`` in the default dtype, or ``None``.

    Raises:
        TypeError: ``init_values`` is not a dict.
        ValueError: a name that is not a latent site, a value of the wrong shape, or one outside
            the site's support.
    """
    if init_values is None:
        return None
    if not isinstance(init_values, dict):
        raise TypeError(f"init_values: expected a dict of site name -> value; got {type(init_values).__name__}")
    latent = {name: site for name, site in trace.nodes.items()
              if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)}
    checked = {}
    for name, value in init_values.items():
        if name not in latent:
            raise ValueError(f"init_values: {name!r} is not a latent site of the model; "
                             f"expected some of {sorted(latent)}")
        site = latent[name]
        shape = tuple(site["value"].shape)
        value = torch.as_tensor(value, dtype=torch.get_default_dtype())
        if tuple(value.shape) == shape:
            value = value.expand(num_chains, *shape)
        elif tuple(value.shape) != (num_chains, *shape):
            raise ValueError(f"init_values[{name!r}]: expected shape {shape} or {(num_chains, *shape)} "
                             f"(one per chain); got {tuple(value.shape)}")
        inside = site["fn"].support.check(value)
        if not bool(torch.as_tensor(inside).all()):
            raise ValueError(f"init_values[{name!r}]: outside the support of {type(site['fn']).__name__} "
                             f"({site['fn'].support})")
        checked[name] = value.clone()
    return checked
