"""Checks of a model that every algorithm runs before any fit."""

from __future__ import annotations

__all__ = ["check_no_learned_params"]


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
            "(pyro.sample(name, prior)), or pass a fixed value as data (a model argument)."
        )
