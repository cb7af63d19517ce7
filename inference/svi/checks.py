"""Checks of a guide argument (a registry name, a VI method's name or a guide object) and of
its options, run before any fit: a misspelled name fails in the first second, with the closest
valid name."""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional

from vilab.guides.registry import guide_name, list_guides
from vilab.inference.common.validation import check_options, did_you_mean, keyword_options

__all__ = ["check_guide"]


def _method_options(name: str) -> Optional[tuple[str, ...]]:
    """The options a registered VI method takes (``None``: it takes any keyword)."""
    from vilab.inference.svi.methods import get_method

    function = get_method(name)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(function).parameters.values()):
        return None
    return tuple(o for o in keyword_options(function) if o not in ("seed", "progress"))


def check_guide(guide: Any, options: Optional[Mapping] = None, argument: str = "guide") -> None:
    """Check a guide (a registry name, a VI method's name or a callable) and its options.

    Raises:
        ValueError: an unknown name (with the closest known one), or an option its family does
            not take, or options given for a guide object.
        TypeError: ``guide`` is neither a name nor callable.
    """
    from vilab.inference.svi.methods import METHODS

    if isinstance(guide, str):
        families = {info.name: info.options for info in list_guides()}
        known = [*families, *METHODS]
        if guide not in known:
            raise ValueError(
                f"{argument}: unknown guide {guide!r}{did_you_mean(guide, known)}; known guides: {', '.join(known)}"
            )
        allowed = families[guide] if guide in families else _method_options(guide)
        if options is not None and allowed is not None:
            check_options(options, f"guide_options[{guide!r}]", allowed)
    elif not callable(guide):
        raise TypeError(f"{argument}: expected a guide name or a callable guide; got {type(guide).__name__} {guide!r}")
    elif options:
        raise ValueError(
            f"guide_options: {sorted(options)} given for the guide object {guide_name(guide)}; "
            "options apply to guides given by name (build the object with them instead)"
        )
