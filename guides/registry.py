"""Guides by name: every variational family vilab knows, built on Pyro's autoguides.

``get_guide("fullrank", model)`` returns a fresh guide; a guide object passes through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from pyro.infer import autoguide
from pyro.infer.autoguide.initialization import init_to_median

from vilab.guides.flows import AutoFlow
from vilab.types import Guide, Model

__all__ = ["GuideInfo", "AutoMAP", "get_guide", "list_guides", "guide_name"]


class AutoMAP(autoguide.AutoDelta):
    """A point estimate (``AutoDelta``) whose ``quantiles`` are the point itself."""

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs) -> dict:
        points = self.median(*args, **kwargs)
        return {k: v.expand((len(quantiles),) + v.shape).clone() for k, v in points.items()}


@dataclass(frozen=True)
class GuideInfo:
    """A registered guide family: ``build(model, **options)`` makes one."""

    name: str
    build: Callable[..., Guide]
    description: str
    options: tuple[str, ...] = ()


def _meanfield(model, init_scale=0.1):
    return autoguide.AutoNormal(model, init_loc_fn=init_to_median, init_scale=init_scale)


def _fullrank(model, init_scale=0.1):
    return autoguide.AutoMultivariateNormal(model, init_loc_fn=init_to_median, init_scale=init_scale)


def _lowrank(model, rank=None, init_scale=0.1):
    return autoguide.AutoLowRankMultivariateNormal(model, init_loc_fn=init_to_median, init_scale=init_scale, rank=rank)


def _laplace(model):
    return autoguide.AutoLaplaceApproximation(model, init_loc_fn=init_to_median)


def _map(model):
    return AutoMAP(model, init_loc_fn=init_to_median)


def _flow(kind):
    def build(model, num_flows=2, hidden_dims=None, init_scale=0.1):
        return AutoFlow(model, kind, num_flows=num_flows, hidden_dims=hidden_dims, init_scale=init_scale)

    return build


_FLOW_OPTIONS = ("num_flows", "hidden_dims", "init_scale")
_GUIDES: dict[str, GuideInfo] = {
    info.name: info
    for info in [
        GuideInfo("meanfield", _meanfield, "diagonal Gaussian per site (AutoNormal)", ("init_scale",)),
        GuideInfo("fullrank", _fullrank, "full-covariance Gaussian (AutoMultivariateNormal)", ("init_scale",)),
        GuideInfo("lowrank", _lowrank, "low-rank + diagonal Gaussian", ("rank", "init_scale")),
        GuideInfo("laplace", _laplace, "Gaussian at the MAP with the Hessian's inverse", ()),
        GuideInfo("map", _map, "point estimate (MAP, AutoDelta)", ()),
        GuideInfo("iaf", _flow("iaf"), "inverse autoregressive flow, K layers", _FLOW_OPTIONS),
        GuideInfo("nsf", _flow("nsf"), "neural spline (autoregressive) flow, K layers", _FLOW_OPTIONS),
        GuideInfo("planar", _flow("planar"), "planar flow, K layers", _FLOW_OPTIONS),
        GuideInfo("radial", _flow("radial"), "radial flow, K layers", _FLOW_OPTIONS),
        GuideInfo("sylvester", _flow("sylvester"), "Sylvester flow, K layers", _FLOW_OPTIONS),
    ]
}


def list_guides() -> list[GuideInfo]:
    """Every registered guide family, in registry order."""
    return list(_GUIDES.values())


def guide_name(guide: Any) -> str:
    """A display name: the registry key for a name, else the guide's class name."""
    return guide if isinstance(guide, str) else type(guide).__name__


def get_guide(guide: str | Guide, model: Model, **options: Any) -> Guide:
    """Build a registered guide for ``model``, or pass a guide object through.

    Args:
        guide: a registry name (see :func:`list_guides`) or a guide callable.
        model: the Pyro model the guide approximates the posterior of.
        **options: family options, e.g. ``num_flows=4`` for flows, ``rank=2`` for ``lowrank``.

    Raises:
        ValueError: unknown name (the message lists the known ones) or an option the family
            does not take.
        TypeError: ``guide`` is neither a name nor callable.

    Example:
        >>> from vilab.guides import get_guide
        >>> from vilab.models import get_model
        >>> model, args, kwargs = get_model("normal_normal").load()
        >>> type(get_guide("meanfield", model)).__name__
        'AutoNormal'
    """
    if not isinstance(guide, str):
        if not callable(guide):
            raise TypeError(f"guide: expected a guide name or a callable guide; got {type(guide).__name__}")
        if options:
            raise ValueError(f"guide options {sorted(options)} only apply to guides given by name")
        return guide
    if guide not in _GUIDES:
        raise ValueError(f"guide: unknown guide {guide!r}; known guides: {', '.join(_GUIDES)}")
    info = _GUIDES[guide]
    unknown = set(options) - set(info.options)
    if unknown:
        raise ValueError(f"guide {guide!r}: unknown options {sorted(unknown)}; it takes {list(info.options)}")
    return info.build(model, **options)
