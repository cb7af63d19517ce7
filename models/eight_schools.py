r"""Eight schools: the hierarchical model every sampler is tried on first.

References:
    Rubin, D. B. "Estimation in parallel randomized experiments", 1981.
    Gelman et al. "Bayesian Data Analysis", 3rd ed., 2013, section 5.5.
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch

from vilab.models.registry import ModelSpec, register_model

__all__ = ["eight_schools_centered", "eight_schools_noncentered", "eight_schools_data"]

_Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
_SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


def eight_schools_data() -> dict:
    """The classic data: ``J = 8``, effects ``y`` and their standard errors ``sigma``."""
    dtype = torch.get_default_dtype()
    return {"J": 8, "sigma": torch.tensor(_SIGMA, dtype=dtype), "y": torch.tensor(_Y, dtype=dtype)}


def _check(J: int, sigma: torch.Tensor, y: Optional[torch.Tensor]) -> None:
    if not isinstance(J, int) or J < 1:
        raise ValueError(f"J: expected a positive int; got {J!r}")
    if tuple(sigma.shape) != (J,):
        raise ValueError(f"sigma: expected shape ({J},); got {tuple(sigma.shape)}")
    if y is not None and tuple(y.shape) != (J,):
        raise ValueError(f"y: expected shape ({J},); got {tuple(y.shape)}")


def eight_schools_centered(J: int, sigma: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
    r"""Centred parameterisation (a funnel: hard for NUTS and for mean-field VI).

    .. math:: \mu \sim \mathcal N(0, 5^2),\ \tau \sim \mathrm{HalfCauchy}(5),\
        \theta_j \sim \mathcal N(\mu, \tau^2),\ y_j \sim \mathcal N(\theta_j, \sigma_j^2).

    Args:
        J: number of schools.
        sigma: standard errors, shape ``(J,)``.
        y: observed effects, shape ``(J,)``; ``None`` for the prior predictive.

    Sites: ``mu`` ``()``, ``tau`` ``()``, ``theta`` ``(J,)`` and ``obs`` ``(J,)`` in plate ``school``.
    """
    _check(J, sigma, y)
    mu = pyro.sample("mu", dist.Normal(sigma.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(sigma.new_tensor(5.0)))
    with pyro.plate("school", J):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def eight_schools_noncentered(J: int, sigma: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
    r"""Non-centred parameterisation: :math:`\theta_j = \mu + \tau \eta_j`, :math:`\eta_j \sim \mathcal N(0,1)`.

    Same posterior over :math:`(\mu, \tau, \theta)` as :func:`eight_schools_centered`;
    ``theta`` is a ``pyro.deterministic`` site of shape ``(J,)``.
    """
    _check(J, sigma, y)
    mu = pyro.sample("mu", dist.Normal(sigma.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(sigma.new_tensor(5.0)))
    with pyro.plate("school", J):
        eta = pyro.sample("eta", dist.Normal(sigma.new_tensor(0.0), 1.0))
        theta = pyro.deterministic("theta", mu + tau * eta)
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def _loader(model):
    def load():
        data = eight_schools_data()
        return model, (data["J"], data["sigma"]), {"y": data["y"]}

    return load


register_model(
    ModelSpec(
        "eight_schools",
        _loader(eight_schools_noncentered),
        "Eight schools, non-centred (hierarchical)",
        tags=("hierarchical",),
    )
)
register_model(
    ModelSpec(
        "eight_schools_centered",
        _loader(eight_schools_centered),
        "Eight schools, centred (funnel geometry)",
        tags=("hierarchical",),
    )
)
