"""Checks at the public boundary: data, configuration and what a model asks of a guide."""

from __future__ import annotations

import difflib
import inspect
import numbers
from typing import Any, Collection, Iterable, Mapping, Optional

import numpy as np
import torch
from pyro.poutine.util import site_is_subsample

from vilab.inference.common.tracing import trace_model
from vilab.types import Model

__all__ = [
    "check_finite_data",
    "check_init_values",
    "check_model",
    "check_positive_int",
    "check_probability",
    "check_seed",
    "check_options",
    "check_model_kwargs",
    "did_you_mean",
    "keyword_options",
]

# numpy's legacy seeding (which ``pyro.set_rng_seed`` calls) takes 0 <= seed < 2**32.
_MAX_SEED = 2**32 - 1


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``; else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int >= {minimum}; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}; got {value}")
    return int(value)


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices`` to ``name``, else ``""``."""
    close = _closest(name, choices)
    return f" (did you mean {close!r}?)" if close else ""


def _closest(name: str, choices: Iterable[str]) -> Optional[str]:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return close[0] if close else None


def check_seed(value: Any, name: str = "seed", *, allow_none: bool = False) -> Optional[int]:
    """Return ``value`` if it is an int in ``[0, 2**32 - 1]`` (or ``None`` where allowed)."""
    if value is None and allow_none:
        return None
    expected = f"an int in [0, {_MAX_SEED}]" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name}: expected {expected}; got {type(value).__name__} {value!r}"
            + (" (pass seed=0, or any other int)" if value is None else "")
        )
    if not 0 <= value <= _MAX_SEED:
        raise ValueError(f"{name}: expected {expected}; got {value}")
    return int(value)


def keyword_options(function) -> tuple[str, ...]:
    """The keyword-only options of ``function`` (``run_nuts``'s ``num_samples``, ...)."""
    return tuple(
        name
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    )


def check_options(options: Optional[Mapping], name: str, allowed: Collection[str], what: str = "option") -> dict:
    """Return ``options`` as a dict after checking each key is one of ``allowed``.

    Raises:
        TypeError: ``options`` is not a dict (or ``None``).
        ValueError: a key that is not allowed, with the closest allowed key as a suggestion.
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"{name}: expected a dict of option name -> value; got {type(options).__name__}")
    for key in options:
        if key not in allowed:
            raise ValueError(
                f"{name}: unknown {what} {key!r}{did_you_mean(key, allowed)}; expected some of {sorted(allowed)}"
            )
    return dict(options)


def check_model_kwargs(model: Model, kwargs: Mapping, caller: str, options: Collection[str]) -> None:
    """Check that every extra keyword argument of ``caller`` is a parameter of ``model``.

    ``run_nuts(model, data, num_step=500)`` would otherwise pass ``num_step`` to the model as
    data (or fail deep inside it). Models taking ``**kwargs`` accept any name.

    Raises:
        TypeError: naming the argument, the model's parameters and the closest option of
            ``caller``.
    """
    try:
        parameters = inspect.signature(model).parameters
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check against
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [
        n
        for n, p in parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    for key in kwargs:
        if key not in accepted:
            close = _closest(key, options)
            hint = f"; did you mean {caller}'s option {close!r}?" if close else ""
            raise TypeError(
                f"{caller}: keyword {key!r} is neither an option of {caller} nor a parameter of "
                f"the model (expected one of {accepted}; got {key!r}){hint}"
            )


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
                "(drop or impute them before fitting)"
            )


def _describe(args: tuple, kwargs: dict) -> str:
    parts = []
    for name, value in _arrays(args, kwargs):
        shape = getattr(value, "shape", None)
        parts.append(f"{name}: shape {tuple(shape)}" if shape is not None else f"{name}: {type(value).__name__}")
    return "; ".join(parts) or "no arguments"


# Prior draws tried before a model is declared broken: a prior whose support includes points
# where the model fails (a correlation outside (-1, 1), a covariance that is not positive-
# definite) fails on some draws only; a model that fails everywhere fails on all of them.
PRIOR_DRAWS_TRIED = 20


def _trace_some_prior_draw(model: Model, args: tuple, kwargs: dict):
    first = None
    for _ in range(PRIOR_DRAWS_TRIED):
        try:
            return trace_model(model, args, kwargs)
        except (ValueError, RuntimeError, IndexError, TypeError) as error:
            first = first or error
            if not isinstance(error, (ValueError, RuntimeError)):
                break  # an IndexError or a TypeError does not depend on where the prior draw fell
    raise ValueError(
        f"model: failed when run with the given data ({type(first).__name__}: {first}). "
        f"Data passed: {_describe(args, kwargs)}"
    ) from first


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
    trace = _trace_some_prior_draw(model, args, kwargs)
    latent = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        latent.append(name)
        if site["fn"].has_enumerate_support:
            if site["infer"].get("enumerate") == "parallel":
                if allow_enumerated:
                    continue
                raise ValueError(
                    f"model: site {name!r} is a discrete latent variable marked for enumeration, which "
                    "this method cannot sum out; use run_nuts, or fit_svi/compare with a registry guide "
                    "(TraceEnum_ELBO sums it out), or marginalise it (e.g. MixtureSameFamily)"
                )
            raise ValueError(
                f"model: site {name!r} is a discrete latent variable ({type(site['fn']).__name__}); "
                "vilab's guides are continuous. Marginalise it out (e.g. MixtureSameFamily, "
                "DiscreteHMM), or enumerate it: decorate the model with "
                "pyro.infer.config_enumerate and use run_nuts, which sums enumerated sites out"
            )
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
    latent = {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }
    checked = {}
    for name, value in init_values.items():
        if name not in latent:
            raise ValueError(
                f"init_values: {name!r} is not a latent site of the model; expected some of {sorted(latent)}"
            )
        site = latent[name]
        shape = tuple(site["value"].shape)
        value = torch.as_tensor(value, dtype=torch.get_default_dtype())
        if tuple(value.shape) == shape:
            value = value.expand(num_chains, *shape)
        elif tuple(value.shape) != (num_chains, *shape):
            raise ValueError(
                f"init_values[{name!r}]: expected shape {shape} or {(num_chains, *shape)} "
                f"(one per chain); got {tuple(value.shape)}"
            )
        inside = site["fn"].support.check(value)
        if not bool(torch.as_tensor(inside).all()):
            raise ValueError(
                f"init_values[{name!r}]: outside the support of {type(site['fn']).__name__} ({site['fn'].support})"
            )
        checked[name] = value.clone()
    return checked
