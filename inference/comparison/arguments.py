"""Checks of ``compare``'s arguments, run before any fit.

A misspelled guide name or option must fail in the first second, not after NUTS has run for
an hour; each message names the argument, what was expected, what was received and the closest
valid name.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

from vilab.guides.registry import guide_name
from vilab.inference.common.validation import check_model_kwargs, check_options, check_seed, keyword_options
from vilab.inference.nuts.api import check_nuts_options, run_nuts
from vilab.inference.svi.api import check_svi_options, fit_svi
from vilab.inference.svi.checks import check_guide
from vilab.types import Model

__all__ = ["check_compare_arguments", "method_names", "SVI_OPTIONS_SET_BY_COMPARE", "NUTS_OPTIONS_SET_BY_COMPARE"]

# compare passes these itself, so they cannot come in svi_options / nuts_options.
SVI_OPTIONS_SET_BY_COMPARE = ("seed", "progress", "guide_options")
NUTS_OPTIONS_SET_BY_COMPARE = ("seed", "progress")


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


def check_compare_arguments(
    model: Model,
    kwargs: Mapping,
    *,
    guides: Any,
    seed: Any,
    svi_options: Any,
    nuts_options: Any,
    guide_options: Any,
    compare_options: Sequence[str] = (),
) -> None:
    """Everything ``compare`` can check without running the model: guides, option dicts (keys
    and values), the seed and the model's keyword data (``compare_options``: compare's own
    keyword options, which a model keyword must not shadow)."""
    if isinstance(guides, str) or not isinstance(guides, Sequence):
        raise TypeError(
            f"guides: expected a sequence of guide names or objects; got {guides!r}"
            + (f" (write guides=({guides!r},))" if isinstance(guides, str) else "")
        )
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
            raise TypeError(
                f"guide_options[{key!r}]: expected a dict of option name -> value; got {type(value).__name__}"
            )
    check_model_kwargs(model, kwargs, "compare", [*compare_options, *svi_allowed, *nuts_allowed])
