"""A registry of named models, each bundled with its default data.

``get_model(name).load()`` returns ``(model, args, kwargs)`` ready for ``fit_svi``,
``run_nuts`` or ``compare``; the CLI and the benchmarks look models up here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from vilab.types import Model

__all__ = ["ModelSpec", "register_model", "get_model", "list_models"]


@dataclass(frozen=True)
class ModelSpec:
    """A named model and how to build its default problem.

    Attributes:
        name: Registry key, e.g. ``"eight_schools"``.
        loader: Zero-argument callable returning ``(model, args, kwargs)``.
        description: One line shown by ``vilab list``.
        exact_posterior: Optional zero-argument callable returning the closed-form posterior
            (a dict of site name -> ``torch.distributions.Distribution``) for conjugate models.
        log_evidence: Optional zero-argument callable returning the exact ``log p(x)``.
        tags: Free-form labels (``"conjugate"``, ``"posteriordb"``, ``"slow"``...).
    """

    name: str
    loader: Callable[[], tuple[Model, tuple, dict]]
    description: str = ""
    exact_posterior: Optional[Callable[[], dict[str, Any]]] = None
    log_evidence: Optional[Callable[[], float]] = None
    tags: tuple[str, ...] = field(default_factory=tuple)

    def load(self) -> tuple[Model, tuple, dict]:
        """Return ``(model, args, kwargs)`` for this model's default data."""
        return self.loader()


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry (a name may be registered once)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_model(name: str) -> ModelSpec:
    """Look up a registered model by name.

    Raises:
        ValueError: if ``name`` is unknown; the message lists the known names.

    Example:
        >>> from vilab.models import get_model
        >>> spec = get_model("normal_normal")
        >>> spec.description
        'Normal mean, known variance (closed-form posterior)'
        >>> model, args, kwargs = spec.load()  # ready for fit_svi(model, guide, *args, **kwargs)
    """
    _ensure_loaded()
    if not isinstance(name, str):
        raise TypeError(f"name: expected a model name (str); got {type(name).__name__}")
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"model: unknown model {name!r}; known models: {known}")
    return _REGISTRY[name]


def list_models() -> list[ModelSpec]:
    """All registered models, sorted by name."""
    _ensure_loaded()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _ensure_loaded() -> None:
    # Model modules register themselves on import; importing the package imports them all.
    import vilab.models  # noqa: F401
