"""The models of a sweep, by name: registry models, posteriordb posteriors and user models.

A name is one of

* a registry name (``vilab list``), e.g. ``"eight_schools"``: its NUTS reference is computed once;
* ``"posteriordb/NAME"``: a posterior with a Pyro port under the sweep's posteriordb folder,
  scored against posteriordb's reference draws; ``"posteriordb/*"`` expands to all of them;
* ``"package.module:attr"``: ``attr`` is a :class:`~vilab.models.registry.ModelSpec` or a
  zero-argument callable returning ``(model, args, kwargs)``; its NUTS reference is computed once.

Names are resolved on the driver before any task starts (:func:`resolve_models`) and loaded again
in each task (:func:`load_problem`), so every node needs the module or the posteriordb folder.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

__all__ = ["POSTERIORDB_PREFIX", "Problem", "load_problem", "resolve_models"]

POSTERIORDB_PREFIX = "posteriordb/"


class Problem(NamedTuple):
    """A loaded model: ``model(*args, **kwargs)`` and its reference draws (``None``: run NUTS)."""

    model: Any
    args: tuple
    kwargs: dict
    reference_draws: Optional[dict[str, np.ndarray]]


def _posteriordb_path(posteriordb: Optional[str]) -> Path:
    from vilab.posteriordb import default_posteriordb_path

    if posteriordb is None:
        return default_posteriordb_path()
    path = Path(posteriordb).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"posteriordb: expected a posteriordb folder; got {str(path)!r}, which does not exist")
    return path


def resolve_models(names: Sequence[str], posteriordb: Optional[str]) -> list[str]:
    """``names`` with ``"posteriordb/*"`` expanded, each checked to exist (without loading data).

    Raises:
        ValueError: a name is neither registered, a posteriordb posterior with a port under the
            folder, nor an importable ``module:attr``.
    """
    resolved: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"models: expected model names (str); got {name!r}")
        if name == POSTERIORDB_PREFIX + "*":
            from vilab.posteriordb import list_posteriordb

            found = list_posteriordb(_posteriordb_path(posteriordb))
            if not found:
                raise ValueError(f"models: 'posteriordb/*' found no posterior with a port under {posteriordb!r}")
            resolved.extend(POSTERIORDB_PREFIX + n for n in found)
        else:
            _check_name(name, posteriordb)
            resolved.append(name)
    return list(dict.fromkeys(resolved))


def _check_name(name: str, posteriordb: Optional[str]) -> None:
    if name.startswith(POSTERIORDB_PREFIX):
        from vilab.posteriordb import list_posteriordb

        available = list_posteriordb(_posteriordb_path(posteriordb))
        if name[len(POSTERIORDB_PREFIX) :] not in available:
            raise ValueError(f"models: expected posteriordb/NAME with NAME in {available}; got {name!r}")
    elif ":" in name:
        _user_attribute(name)
    else:
        from vilab.models import get_model

        try:
            get_model(name)
        except ValueError as error:
            raise ValueError(f"models: {error}; or use posteriordb/NAME or package.module:attr") from error


def _user_attribute(name: str) -> Any:
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"models: expected an importable module in {name!r}; got {error}") from error
    if not hasattr(module, attribute):
        raise ValueError(f"models: expected module {module_name!r} to define {attribute!r}; it does not")
    return getattr(module, attribute)


def load_problem(name: str, posteriordb: Optional[str]) -> Problem:
    """Load a model resolved by :func:`resolve_models`."""
    if name.startswith(POSTERIORDB_PREFIX):
        from vilab.posteriordb import load_posteriordb

        problem = load_posteriordb(_posteriordb_path(posteriordb), name[len(POSTERIORDB_PREFIX) :])
        return Problem(problem.model, problem.args, problem.kwargs, problem.reference_draws)
    if ":" in name:
        target = _user_attribute(name)
        loaded = target.load() if hasattr(target, "load") else target()
    else:
        from vilab.models import get_model

        loaded = get_model(name).load()
    if not (isinstance(loaded, tuple) and len(loaded) == 3):
        raise TypeError(f"models: {name!r} expected to load as (model, args, kwargs); got {type(loaded).__name__}")
    model, args, kwargs = loaded
    return Problem(model, tuple(args), dict(kwargs), None)
