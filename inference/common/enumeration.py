r"""Discrete sites marked for enumeration: posterior draws and the marginal density.

NUTS (and an ELBO with ``TraceEnum_ELBO``) sum a model's enumerated discrete sites out, so a
draw holds only the continuous sites :math:`\theta`. Its discrete sites are then drawn from
their conditional posterior :math:`z \sim p(z \mid x, \theta)` with Pyro's ``infer_discrete``
(forward-filter backward-sample; Obermeyer et al. 2019), one :math:`z` per :math:`\theta` draw;
the log-likelihood of a draw is computed given that posterior :math:`z`, and the density used
for importance weights is the marginal

.. math:: \log p(x, \theta) = \log \sum_z p(x, z, \theta),

computed with ``TraceEnum_ELBO`` per draw.

References:
    Obermeyer et al., "Tensor Variable Elimination for Plated Factor Graphs", 2019,
    arXiv:1902.03210.
"""

from __future__ import annotations

from typing import Mapping

import pyro
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, infer_discrete
from pyro.poutine.util import site_is_subsample

from vilab.types import Model

__all__ = [
    "enumerated_sites",
    "hide_enumerated",
    "discrete_posterior_draws",
    "marginal_log_joint",
    "enumerated_objective",
]

_DRAW_PLATE = "_vilab_discrete_draws"


def enumerated_sites(trace) -> list[str]:
    """Latent discrete sites of a model trace marked ``infer={"enumerate": "parallel"}``
    (``pyro.infer.config_enumerate``)."""
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)
        and site["fn"].has_enumerate_support
        and site["infer"].get("enumerate") == "parallel"
    ]


def hide_enumerated(model: Model, trace) -> Model:
    """``model`` with its enumerated sites hidden, for building a guide of the others (as
    Pyro's GMM tutorial does with ``poutine.block(model, expose=...)``)."""
    hidden = enumerated_sites(trace)
    return poutine.block(model, hide=hidden) if hidden else model


def enumerated_objective(trace, guide, elbo: str, backend: str) -> tuple[str, str]:
    """The ``(elbo, backend)`` that fit a guide to a model with enumerated sites: ``"enum"``
    (``TraceEnum_ELBO``) on Pyro's SVI; unchanged for a model without any.

    Raises:
        ValueError: an objective, backend or guide that cannot sum enumerated sites out.
    """
    names = enumerated_sites(trace)
    if not names:
        return elbo, backend
    if guide == "laplace":
        raise ValueError(
            f"guide: 'laplace' takes its Hessian with the enumerated site(s) {names} drawn from "
            "their prior, not summed out; expected another guide (e.g. 'fullrank')"
        )
    if elbo != "trace":
        raise ValueError(
            f"elbo: {elbo!r} cannot sum out the enumerated site(s) {names}; expected 'trace', "
            "which runs as TraceEnum_ELBO"
        )
    if backend == "compiled":
        raise ValueError(
            f"backend: 'compiled' cannot sum out the enumerated site(s) {names}; expected 'auto' or 'pyro'"
        )
    return "enum", "pyro"


def _plate_nesting(trace) -> int:
    dims = [
        -frame.dim
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.dim is not None
    ]
    return max(dims, default=0)


def _one_posterior_draw(model, args, kwargs, draw, names, nesting, temperature=1):
    conditioned = poutine.condition(model, data=dict(draw))
    sampler = infer_discrete(conditioned, first_available_dim=-(nesting + 1), temperature=temperature)
    trace = poutine.trace(sampler).get_trace(*args, **kwargs)
    return {name: trace.nodes[name]["value"].detach() for name in names}


def _batched_posterior_draws(model, args, kwargs, draws, names, template, nesting, temperature=1):
    """All draws at once under an outer plate; enumeration goes left of that plate."""
    num_draws = next(iter(draws.values())).shape[0]
    shaped = {}
    for name, value in draws.items():
        pad = (1,) * (nesting - len(template.nodes[name]["fn"].batch_shape))
        shaped[name] = value.reshape((num_draws,) + pad + tuple(value.shape[1:]))

    def batched(*args, **kwargs):
        with pyro.plate(_DRAW_PLATE, num_draws, dim=-(nesting + 1)):
            return poutine.condition(model, data=shaped)(*args, **kwargs)

    sampler = infer_discrete(batched, first_available_dim=-(nesting + 2), temperature=temperature)
    trace = poutine.trace(sampler).get_trace(*args, **kwargs)
    return {
        name: trace.nodes[name]["value"].detach().reshape((num_draws,) + template.nodes[name]["value"].shape)
        for name in names
    }


@torch.no_grad()
def discrete_posterior_draws(
    model: Model, args: tuple, kwargs: dict, draws: Mapping[str, torch.Tensor], template
) -> dict[str, torch.Tensor]:
    r"""One draw of every enumerated site from :math:`p(z \mid x, \theta_s)` per continuous draw.

    Args:
        model: a model with enumerated sites (``config_enumerate``).
        args, kwargs: its data.
        draws: continuous latent site -> ``(S, *site_shape)``.
        template: one trace of the model (site shapes and plates).

    Returns:
        enumerated site -> ``(S, *site_shape)``. All draws run as one batched ``infer_discrete``
        when its most probable assignments (``temperature=0``) agree with per-draw runs at the
        first and last draw; otherwise one run per draw.
    """
    names = enumerated_sites(template)
    nesting = _plate_nesting(template)
    num_draws = next(iter(draws.values())).shape[0]
    try:
        modes = _batched_posterior_draws(model, args, kwargs, draws, names, template, nesting, temperature=0)
        for i in {0, num_draws - 1}:
            single = _one_posterior_draw(
                model, args, kwargs, {k: v[i] for k, v in draws.items()}, names, nesting, temperature=0
            )
            if any(not torch.equal(modes[n][i], single[n]) for n in names):
                raise ValueError("batched and single modes differ")
        return _batched_posterior_draws(model, args, kwargs, draws, names, template, nesting)
    except (RuntimeError, ValueError, IndexError, NotImplementedError):
        # Models that do not broadcast over an outer plate (e.g. ``locs[assignment]``).
        per = [
            _one_posterior_draw(model, args, kwargs, {k: v[i] for k, v in draws.items()}, names, nesting)
            for i in range(num_draws)
        ]
        return {name: torch.stack([p[name] for p in per]) for name in names}


@torch.no_grad()
def marginal_log_joint(
    model: Model, args: tuple, kwargs: dict, draws: Mapping[str, torch.Tensor], template
) -> torch.Tensor:
    r""":math:`\log p(x, \theta_s)` with every enumerated site summed out, per draw: ``(S,)``."""
    elbo = TraceEnum_ELBO(max_plate_nesting=_plate_nesting(template))

    def no_guide(*args, **kwargs):
        pass

    num_draws = next(iter(draws.values())).shape[0]
    out = torch.empty(num_draws)
    for i in range(num_draws):
        conditioned = poutine.condition(model, data={k: v[i] for k, v in draws.items()})
        out[i] = -elbo.loss(conditioned, no_guide, *args, **kwargs)
    return out
