r"""A ``MixtureSameFamily`` latent site: its transform, NUTS against quadrature, SVI runs.

The posterior of a two-component Normal mixture prior under a Normal likelihood is computed on
a grid (trapezoid rule); ``run_nuts``'s mean must lie within ``Z * sd / sqrt(ESS)`` of it.
"""

import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.stats import norm
from torch.distributions import biject_to, constraints, transform_to

from vilab.inference import fit_svi, run_nuts

Z = norm.ppf(1 - 0.001 / 2)
WEIGHTS, LOCS, SCALES = (0.3, 0.7), (-1.0, 1.5), (1.0, 0.8)
NOISE, Y = 1.0, 0.5


def mixture_prior_model(y):
    r""":math:`x \sim 0.3\,N(-1, 1) + 0.7\,N(1.5, 0.8^2)`, :math:`y \mid x \sim N(x, 1)`."""
    prior = dist.MixtureSameFamily(
        dist.Categorical(torch.tensor(WEIGHTS)), dist.Normal(torch.tensor(LOCS), torch.tensor(SCALES))
    )
    x = pyro.sample("x", prior)
    pyro.sample("y", dist.Normal(x, NOISE), obs=y)


def quadrature_posterior() -> tuple[float, float]:
    """Posterior mean and sd of ``x`` by the trapezoid rule on a fine grid."""
    grid = np.linspace(-12.0, 12.0, 200_001)
    prior = sum(w * norm.pdf(grid, m, s) for w, m, s in zip(WEIGHTS, LOCS, SCALES))
    density = prior * norm.pdf(Y, grid, NOISE)
    density /= np.trapezoid(density, grid)
    mean = np.trapezoid(grid * density, grid)
    return float(mean), float(math.sqrt(np.trapezoid((grid - mean) ** 2 * density, grid)))


@pytest.mark.parametrize(
    "component, expected",
    [
        (dist.Normal(torch.zeros(2), torch.ones(2)), torch.distributions.transforms.IndependentTransform),
        (dist.LogNormal(torch.zeros(2), torch.ones(2)), torch.distributions.transforms.ExpTransform),
    ],
)
def test_a_mixture_support_takes_its_components_transform(component, expected):
    support = dist.MixtureSameFamily(dist.Categorical(torch.ones(2)), component).support
    for registry in (biject_to, transform_to):
        transform = registry(support)
        assert transform == registry(component.support)
        assert transform.codomain.event_dim == support.event_dim


def test_a_multivariate_component_keeps_its_event_dim():
    component = dist.Normal(torch.zeros(2, 3), 1.0).to_event(1)
    support = dist.MixtureSameFamily(dist.Categorical(torch.ones(2)), component).support
    assert biject_to(support).codomain.event_dim == 1 == support.event_dim
    assert isinstance(support, constraints.MixtureSameFamilyConstraint)


def test_run_nuts_on_a_mixture_prior_matches_quadrature():
    result = run_nuts(
        mixture_prior_model, torch.tensor(Y), num_samples=500, num_warmup=500, num_chains=2, seed=0, progress=False
    )
    draws = result.samples["x"].numpy()
    ess = float(az.ess(draws))
    exact_mean, exact_sd = quadrature_posterior()
    assert abs(draws.mean() - exact_mean) < Z * exact_sd / math.sqrt(ess), (draws.mean(), exact_mean, ess)
    assert abs(draws.std() - exact_sd) < Z * exact_sd / math.sqrt(2 * ess), (draws.std(), exact_sd, ess)


@pytest.mark.parametrize("guide", ["meanfield", "fullrank"])
def test_fit_svi_fits_a_mixture_prior(guide):
    result = fit_svi(mixture_prior_model, guide, torch.tensor(Y), num_steps=300, seed=0, progress=False)
    assert np.all(np.isfinite(result.losses))
    draws = result.draws(200, seed=0).samples["x"]
    assert draws.shape[0] == 200 and torch.isfinite(draws).all()


def plated_mixture_model(y):
    """The mixture prior on each of ``len(y)`` independent latents in a plate."""
    prior = dist.MixtureSameFamily(
        dist.Categorical(torch.tensor(WEIGHTS)), dist.Normal(torch.tensor(LOCS), torch.tensor(SCALES))
    )
    with pyro.plate("data", len(y)):
        x = pyro.sample("x", prior)
        pyro.sample("y", dist.Normal(x, NOISE), obs=y)


def bivariate_mixture_model(y):
    """A mixture of two ``Independent(Normal)`` components on a 2-vector latent."""
    locs = torch.tensor([[-1.0, 1.0], [1.5, -1.5]])
    prior = dist.MixtureSameFamily(dist.Categorical(torch.tensor(WEIGHTS)), dist.Normal(locs, 1.0).to_event(1))
    x = pyro.sample("x", prior)
    pyro.sample("y", dist.Normal(x, NOISE).to_event(1), obs=y)


@pytest.mark.parametrize("model", [plated_mixture_model, bivariate_mixture_model])
def test_run_nuts_and_fit_svi_take_plated_and_multivariate_mixtures(model):
    y = torch.tensor([0.5, -0.5])
    result = run_nuts(model, y, num_samples=20, num_warmup=20, num_chains=2, seed=0, progress=False)
    assert result.samples["x"].shape == (2, 20, 2)
    fit = fit_svi(model, "fullrank", y, num_steps=50, seed=0, progress=False)
    assert fit.draws(10, seed=0).samples["x"].shape == (10, 2)
