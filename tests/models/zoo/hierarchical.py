"""Hierarchical models: eight schools, baseball, UCB admissions, cafes, lung function, LKJ.

Pyro-sourced models are the source's code; NumPyro-sourced ones read ``numpyro``/``jnp`` as
``pyro``/``torch`` token for token (``jnp.dot`` as ``torch.matmul``, ``jnp.outer`` as
``torch.outer``), keeping their indexing and plates.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import Beta, Binomial, HalfCauchy, Normal, Pareto, Uniform
from pyro.distributions.util import scalar_like
from pyro.infer.reparam import TransformReparam

__all__ = [
    "eight_schools_centered",
    "eight_schools_noncentered",
    "fully_pooled",
    "not_pooled",
    "partially_pooled",
    "partially_pooled_with_logit",
    "glmm",
    "cafe_varying_slopes",
    "osic_hierarchical",
    "lkj_model",
]


def eight_schools_centered(J, sigma, y=None):
    """NumPyro's README: eight schools, centred."""
    mu = pyro.sample("mu", dist.Normal(0, 5))
    tau = pyro.sample("tau", dist.HalfCauchy(5))
    with pyro.plate("J", J):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def eight_schools_noncentered(J, sigma, y=None):
    """NumPyro's README: eight schools, non-centred with ``TransformReparam``."""
    mu = pyro.sample("mu", dist.Normal(0, 5))
    tau = pyro.sample("tau", dist.HalfCauchy(5))
    with pyro.plate("J", J):
        with pyro.poutine.reparam(config={"theta": TransformReparam()}):
            theta = pyro.sample(
                "theta", dist.TransformedDistribution(dist.Normal(0.0, 1.0), dist.transforms.AffineTransform(mu, tau))
            )
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def fully_pooled(at_bats, hits):
    """Pyro's baseball example: one success probability for all players."""
    phi_prior = Uniform(scalar_like(at_bats, 0), scalar_like(at_bats, 1))
    phi = pyro.sample("phi", phi_prior)
    num_players = at_bats.shape[0]
    with pyro.plate("num_players", num_players):
        return pyro.sample("obs", Binomial(at_bats, phi), obs=hits)


def not_pooled(at_bats, hits):
    """Pyro's baseball example: one independent probability per player."""
    num_players = at_bats.shape[0]
    with pyro.plate("num_players", num_players):
        phi_prior = Uniform(scalar_like(at_bats, 0), scalar_like(at_bats, 1))
        phi = pyro.sample("phi", phi_prior)
        return pyro.sample("obs", Binomial(at_bats, phi), obs=hits)


def partially_pooled(at_bats, hits):
    """Pyro's baseball example: Beta(m kappa, (1 - m) kappa) probabilities."""
    num_players = at_bats.shape[0]
    m = pyro.sample("m", Uniform(scalar_like(at_bats, 0), scalar_like(at_bats, 1)))
    kappa = pyro.sample("kappa", Pareto(scalar_like(at_bats, 1), scalar_like(at_bats, 1.5)))
    with pyro.plate("num_players", num_players):
        phi_prior = Beta(m * kappa, (1 - m) * kappa)
        phi = pyro.sample("phi", phi_prior)
        return pyro.sample("obs", Binomial(at_bats, phi), obs=hits)


def partially_pooled_with_logit(at_bats, hits):
    """Pyro's baseball example: normal logits with a shared location and scale."""
    num_players = at_bats.shape[0]
    loc = pyro.sample("loc", Normal(scalar_like(at_bats, -1), scalar_like(at_bats, 1)))
    scale = pyro.sample("scale", HalfCauchy(scale=scalar_like(at_bats, 1)))
    with pyro.plate("num_players", num_players):
        alpha = pyro.sample("alpha", Normal(loc, scale))
        return pyro.sample("obs", Binomial(at_bats, logits=alpha), obs=hits)


def glmm(dept, male, applications, admit=None):
    """NumPyro's ucbadmit example (``m_glmm5``): correlated varying intercepts and slopes per
    department, non-centred, ``v[dept, 0]`` indexing."""
    v_mu = pyro.sample("v_mu", dist.Normal(0, torch.tensor([4.0, 1.0])))

    sigma = pyro.sample("sigma", dist.HalfNormal(torch.ones(2)))
    L_Rho = pyro.sample("L_Rho", dist.LKJCholesky(2, concentration=2))
    scale_tril = sigma[..., None] * L_Rho
    # non-centered parameterization
    num_dept = len(np.unique(dept))
    z = pyro.sample("z", dist.Normal(torch.zeros((num_dept, 2)), 1))
    v = torch.matmul(scale_tril, z.T).T

    logits = v_mu[0] + v[dept, 0] + (v_mu[1] + v[dept, 1]) * male
    if admit is None:
        # we use a Delta site to record probs for predictive distribution
        probs = torch.sigmoid(logits)
        pyro.sample("probs", dist.Delta(probs), obs=probs)
    pyro.sample("admit", dist.Binomial(applications, logits=logits), obs=admit)


def cafe_varying_slopes(cafe, afternoon, wait):
    """Statistical Rethinking m14.1 in NumPyro: varying intercepts and slopes with an LKJ prior
    on their correlation."""
    a = pyro.sample("a", dist.Normal(5, 2))
    b = pyro.sample("b", dist.Normal(-1, 0.5))
    sigma_cafe = pyro.sample("sigma_cafe", dist.Exponential(1).expand([2]))
    sigma = pyro.sample("sigma", dist.Exponential(1))
    Rho = pyro.sample("Rho", dist.LKJ(2, 2))
    cov = torch.outer(sigma_cafe, sigma_cafe) * Rho
    a_cafe_b_cafe = pyro.sample("a_cafe,b_cafe", dist.MultivariateNormal(torch.stack([a, b]), cov).expand([20]))
    a_cafe, b_cafe = a_cafe_b_cafe[:, 0], a_cafe_b_cafe[:, 1]
    mu = a_cafe[cafe] + b_cafe[cafe] * afternoon
    pyro.sample("wait", dist.Normal(mu, sigma), obs=wait)


def osic_hierarchical(patient_code, Weeks, FVC_obs=None):
    """NumPyro's "Bayesian Hierarchical Linear Regression" tutorial: per-patient intercepts
    ``α[patient_code]`` and slopes ``β[patient_code]`` (Greek site names as written)."""
    μ_α = pyro.sample("μ_α", dist.Normal(0.0, 500.0))
    σ_α = pyro.sample("σ_α", dist.HalfNormal(100.0))
    μ_β = pyro.sample("μ_β", dist.Normal(0.0, 3.0))
    σ_β = pyro.sample("σ_β", dist.HalfNormal(3.0))

    n_patients = len(np.unique(patient_code))

    with pyro.plate("plate_i", n_patients):
        α = pyro.sample("α", dist.Normal(μ_α, σ_α))
        β = pyro.sample("β", dist.Normal(μ_β, σ_β))

    σ = pyro.sample("σ", dist.HalfNormal(100.0))

    FVC_est = α[patient_code] + β[patient_code] * Weeks

    with pyro.plate("data", len(patient_code)):
        pyro.sample("obs", dist.Normal(FVC_est, σ), obs=FVC_obs)


def lkj_model(y):
    """Pyro's LKJ example: a multivariate normal with HalfCauchy variances and an LKJ prior on
    the correlation's Cholesky factor (``torch.mm``, as written)."""
    d = y.shape[1]
    N = y.shape[0]
    options = dict(dtype=y.dtype, device=y.device)
    # Vector of variances for each of the d variables
    theta = pyro.sample("theta", dist.HalfCauchy(torch.ones(d, **options)))
    # Lower cholesky factor of a correlation matrix
    concentration = torch.ones((), **options)  # Implies a uniform distribution over correlation matrices
    L_omega = pyro.sample("L_omega", dist.LKJCholesky(d, concentration))
    # Lower cholesky factor of the covariance matrix
    L_Omega = torch.mm(torch.diag(theta.sqrt()), L_omega)
    # For inference with SVI, one might prefer to use torch.bmm(theta.sqrt().diag_embed(), L_omega)

    # Vector of expectations
    mu = torch.zeros(d, **options)

    with pyro.plate("observations", N):
        obs = pyro.sample("obs", dist.MultivariateNormal(mu, scale_tril=L_Omega), obs=y)
    return obs
