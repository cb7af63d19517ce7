"""vilab: variational inference for latent-variable models on Pyro.

The small public API::

    from vilab import fit_svi, run_nuts, compare, get_guide, get_model, sweep
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["fit_svi", "run_nuts", "compare", "get_guide", "list_guides", "get_model", "list_models", "sweep"]

_EXPORTS = {
    "fit_svi": "vilab.inference",
    "run_nuts": "vilab.inference",
    "compare": "vilab.inference",
    "get_guide": "vilab.guides",
    "list_guides": "vilab.guides",
    "get_model": "vilab.models",
    "list_models": "vilab.models",
    "sweep": "vilab.inference.sweep",
}


def __getattr__(name: str) -> Any:
    # Lazy, so `import vilab` (and the CLI's --help) does not pay for importing torch and pyro.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vilab' has no attribute {name!r}")
