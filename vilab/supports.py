r"""Unconstraining transforms for supports that ``torch.distributions.biject_to`` lacks.

A ``MixtureSameFamily`` site (``dist.MixtureSameFamily(dist.Categorical(w), dist.Normal(loc,
scale))``, as Pyro users write a mixture prior) has the support
``MixtureSameFamilyConstraint(c)``, where ``c`` is its component's support: a draw of the
mixture is a draw of one component, so it lives in ``c`` with ``c``'s event dims
(``MixtureSameFamilyConstraint.event_dim`` is ``c.event_dim``). torch registers no transform
for that wrapper, so every sampler or autoguide stops with ``NotImplementedError: Cannot
transform MixtureSameFamilyConstraint constraints``. The bijection to ``c`` is the right one:
:math:`T_{\text{mixture}} = T_c`, e.g. the identity for a ``Normal`` component,
``exp`` for a ``LogNormal`` one.

Why the global registry: vilab's own code could unwrap the constraint, but Pyro's autoguides
(``AutoNormal``, ``AutoMultivariateNormal``: ``meanfield``, ``fullrank``) and Pyro's NUTS (the
fallback) call ``torch.distributions.biject_to(site["fn"].support)`` themselves, so the only
public hook that reaches them is torch's constraint registry. The entries are added once, when
vilab's inference or guides are imported, and only where torch has none (a torch that learns
the constraint keeps its own transform).
"""

from __future__ import annotations

from torch.distributions import biject_to, constraints, transform_to
from torch.distributions.constraint_registry import ConstraintRegistry

__all__ = ["register_missing_supports"]


def _register_mixture(registry: ConstraintRegistry) -> None:
    try:
        registry(constraints.MixtureSameFamilyConstraint(constraints.real))
    except NotImplementedError:
        registry.register(constraints.MixtureSameFamilyConstraint, lambda c: registry(c.base_constraint))


def register_missing_supports() -> None:
    """Give ``biject_to`` and ``transform_to`` an entry for ``MixtureSameFamilyConstraint``
    (the component's transform) where torch has none. Idempotent."""
    for registry in (biject_to, transform_to):
        _register_mixture(registry)


register_missing_supports()
