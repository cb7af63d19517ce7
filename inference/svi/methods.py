r"""VI methods that are not SVI on a guide (DADVI, Pathfinder, batch-and-match, ...).

Each method is a function ``fit(model, *args, seed=..., progress=..., **options, **model_kwargs)``
that returns an :class:`~vilab.inference.svi.api.SVIResult` whose ``guide`` is a Pyro guide
(usually :func:`~vilab.inference.vi.gaussian.gaussian_guide`), so ``fit_svi(model, "name")``
and ``compare(..., guides=("name",))`` run it like any guide family. Methods are registered
here by name as ``"module:function"`` and imported only when used.
"""

from __future__ import annotations

import importlib
from typing import Callable

__all__ = ["METHODS", "get_method", "is_method"]

# name -> "vilab.inference.vi.<module>:<function>"; each method module adds its own line.
METHODS: dict[str, str] = {
    "pathfinder": "vilab.inference.vi.pathfinder:fit_pathfinder",
    "multipathfinder": "vilab.inference.vi.pathfinder:fit_multipathfinder",
    "bam": "vilab.inference.vi.bam:fit_bam",
    "gsm": "vilab.inference.vi.bam:fit_gsm",
    "dadvi": "vilab.inference.vi.dadvi:fit_dadvi",
}


def is_method(name: object) -> bool:
    """Whether ``name`` is the name of a registered VI method."""
    return isinstance(name, str) and name in METHODS


def get_method(name: str) -> Callable:
    """The fit function registered as ``name``."""
    if name not in METHODS:
        raise ValueError(f"method: expected one of {sorted(METHODS)}; got {name!r}")
    module, function = METHODS[name].split(":")
    return getattr(importlib.import_module(module), function)
