"""Checks of ``compare``'s, ``fit_svi``'s and ``run_nuts``'s arguments, run before any fit.

A misspelled guide name or option must fail in the first second, not after NUTS has run for
an hour; each message names the argument, what was expected, what was received and the closest
valid name.
"""
from __future__ import annotations

import inspect
from collections import Counter
from typing import Any, Mapping, Optional, Sequence

from vilab.guides.registry import guide_name, list_guides
from vilab.inference.validation import check_model_kwargs, check_options, check_seed, did_you_mean, keyword_options
from vilab.types import Model

__all__ = ["check_guide", "check_compare_arguments", "check_no_learned_params", "method_names",
           "SVI_OPTIONS_SET_BY_COMPARE", "NUTS_OPTIONS_SET_BY_COMPARE"]

# compare passes these itself, so they cannot come in svi_options / nuts_options.
SVI_OPTIONS_SET_BY_COMPARE = ("seed", "progress", "guide_options")
NUTS_OPTIONS_SET_BY_COMPARE = ("seed", "progress")


def _method_options(name: str) -> Optional[tuple[str, ...]]:
    """The options a registered VI method takes (``None``: it takes any keyword)."""
    from vilab.inference.vi import get_method

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
    from vilab.inference.vi import METHODS

    if isinstance(guide, str):
        families = {info.name: info.options for info in list_guides()}
        known = [*families, *METHODS]
        if guide not in known:
            raise ValueError(f"{argument}: unknown guide {guide!r}{did_you_mean(guide, known)}; "
                             f"known guides: {', '.join(known)}")
        allowed = families[guide] if guide in families else _method_options(guide)
        if options is not None and allowed is not None:
            check_options(options, f"guide_options[{guide!r}]", allowed)
    elif not callable(guide):
        raise TypeError(f"{argument}: expected a guide name or a callable guide; got {type(guide).__name__} {guide!r}")
    elif options:
        raise ValueError(f"guide_options: {sorted(options)} given for the guide object {guide_name(guide)}; "
                         "options apply to guides given by name (build the object with them instead)")


def method_names(guides: Sequence[Any]) -> list[str]:
    """One unique display name per guide: the registry name or class name, with ``_2``,
    ``_3``, ... for repeats (two ``AutoNormal`` objects are ``AutoNormal`` and ``AutoNormal_2``)."""
    names: list[str] = []
    counts: Counter = Counter()
    for guide in guides:
        base = guide_name(guide)
        counts[base] += 1
        name = base if counts[base] == 1 else f"{base}_{counts[base]}"
        while name in names or name == "nuts":
            counts[base] += 1
            name = f"{base}_{counts[base]}"
        names.append(name)
    return names


def check_compare_arguments(model: Model, kwargs: Mapping, *, guides: Any, seed: Any, svi_options: Any,
                            nuts_options: Any, guide_options: Any) -> None:
    """Everything ``compare`` can check without running the model: guides, option dicts (keys
    and values), the seed and the model's keyword data."""
    from vilab.inference.compare import compare
    from vilab.inference.nuts import check_nuts_options, run_nuts
    from vilab.inference.svi import check_svi_options, fit_svi

    if isinstance(guides, str) or not isinstance(guides, Sequence):
        raise TypeError(f"guides: expected a sequence of guide names or objects; got {guides!r}"
                        + (f" (write guides=({guides!r},))" if isinstance(guides, str) else ""))
    check_seed(seed)
    svi_allowed = [o for o in keyword_options(fit_svi) if o not in SVI_OPTIONS_SET_BY_COMPARE]
    nuts_allowed = [o for o in keyword_options(run_nuts) if o not in NUTS_OPTIONS_SET_BY_COMPARE]
    check_svi_options(**check_options(svi_options, "svi_options", svi_allowed))
    check_nuts_options(**check_options(nuts_options, "nuts_options", nuts_allowed))
    named = [g for g in guides if isinstance(g, str)]
    options = check_options(guide_options, "guide_options", named, what="guide name (not among guides)")
    for i, guide in enumerate(guides):
        check_guide(guide, options.get(guide) if isinstance(guide, str) else None, f"guides[{i}]")
    for key, value in options.items():
        if not isinstance(value, Mapping):
            raise TypeError(f"guide_options[{key!r}]: expected a dict of option name -> value; "
                            f"got {type(value).__name__}")
    check_model_kwargs(model, kwargs, "compare", [*keyword_options(compare), *svi_allowed, *nuts_allowed])


def check_no_learned_params(trace, caller: str) -> None:
    """Refuse a model with ``pyro.param`` (or ``pyro.module``) sites.

    NUTS conditions on whatever value the global param store holds, while SVI learns the value
    along with each guide: the methods would answer different questions, and the comparison
    would show the difference as the guides' error.

    Raises:
        ValueError: naming the parameter sites and the two ways out.
    """
    params = [name for name, site in trace.nodes.items() if site["type"] == "param"]
    if params:
        shown = ", ".join(repr(p) for p in params[:5]) + (f" and {len(params) - 5} more" if len(params) > 5 else "")
        raise ValueError(
            f"{caller}: the model has learned parameter(s) {shown} (pyro.param / pyro.module); expected a "
            "model whose unknowns are all sample sites. NUTS would condition on whatever value Pyro's "
            "param store holds while each guide learns its own. Make each a sample site with a prior "
            "(pyro.sample(name, prior)), or pass a fixed value as data (a model argument).")
