"""NumPyro ports of the twelve posteriordb posteriors ported in ``vilab.models.posteriordb.ported``
(bench-only code: NumPyro and JAX come from the ``bench`` extra).

Each port takes the same keyword arguments as its Pyro twin (the posteriordb data fields, as
NumPy arrays or numbers) and defines the same posterior over the same site names, following the
Stan program: flat priors are ``ImproperUniform``, transformed data are computed inside the
model, transformed parameters are ``deterministic`` sites.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

__all__ = ["PORTED_MODELS"]


def _flat(support, event_shape=()):
    return dist.ImproperUniform(support, (), event_shape)


def _regression(columns, y, sigma_prior=None):
    beta = numpyro.sample("beta", _flat(constraints.real, (len(columns),)))
    sigma = numpyro.sample("sigma", sigma_prior if sigma_prior is not None else _flat(constraints.positive))
    with numpyro.plate("data", columns[0].shape[-1]):
        numpyro.sample("obs", dist.Normal(jnp.stack(columns, -1) @ beta, sigma), obs=y)


def _standardize(x, scale=1.0):
    return (x - x.mean()) / (scale * x.std(ddof=1))


def kidscore_momhsiq(mom_hs, mom_iq, kid_score=None):
    _regression([jnp.ones_like(mom_iq), mom_hs, mom_iq], kid_score, dist.HalfCauchy(2.5))


def kidscore_interaction(mom_hs, mom_iq, kid_score=None):
    _regression([jnp.ones_like(mom_iq), mom_hs, mom_iq, mom_hs * mom_iq], kid_score, dist.HalfCauchy(2.5))


def kidscore_interaction_z(mom_hs, mom_iq, kid_score=None):
    z_hs, z_iq = _standardize(mom_hs, 2.0), _standardize(mom_iq, 2.0)
    _regression([jnp.ones_like(z_hs), z_hs, z_iq, z_hs * z_iq], kid_score)


def earn_height(height, earn=None):
    _regression([jnp.ones_like(height), height], earn)


def logearn_logheight_male(height, male, earn=None):
    _regression([jnp.ones_like(height), jnp.log(height), male], jnp.log(earn))


def logearn_interaction_z(height, male, earn=None):
    z_height = _standardize(height)
    _regression([jnp.ones_like(z_height), z_height, male, z_height * male], jnp.log(earn))


def mesquite(diam1, diam2, canopy_height, total_height, density, group, weight=None):
    _regression([jnp.ones_like(group), diam1, diam2, canopy_height, total_height, density, group], weight)


def logmesquite_logvash(diam1, diam2, canopy_height, total_height, group, weight=None):
    columns = [
        jnp.ones_like(group),
        jnp.log(diam1 * diam2 * canopy_height),
        jnp.log(diam1 * diam2),
        jnp.log(diam1 / diam2),
        jnp.log(total_height),
        group,
    ]
    _regression(columns, jnp.log(weight))


def kilpisjarvi(x, pmualpha, psalpha, pmubeta, psbeta, y=None):
    alpha = numpyro.sample("alpha", dist.Normal(pmualpha, psalpha))
    beta = numpyro.sample("beta", dist.Normal(pmubeta, psbeta))
    sigma = numpyro.sample("sigma", _flat(constraints.positive))
    with numpyro.plate("data", x.shape[-1]):
        numpyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)


def diamonds(X, prior_only=0, Y=None):
    centred = X[:, 1:] - X[:, 1:].mean(0)
    b = numpyro.sample("b", dist.Normal(0.0, 1.0).expand([centred.shape[1]]).to_event(1))
    intercept = numpyro.sample("Intercept", dist.StudentT(3.0, 8.0, 10.0))
    # student_t(3, 0, 10) truncated to sigma > 0: the half-t differs from the folded one by a constant.
    sigma = numpyro.sample("sigma", dist.TruncatedDistribution(dist.StudentT(3.0, 0.0, 10.0), low=0.0))
    if prior_only:
        return
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("Y", dist.Normal(intercept + centred @ b, sigma), obs=Y)


def gp_pois_regr(x, k=None):
    rho = numpyro.sample("rho", dist.Gamma(25.0, 4.0))
    alpha = numpyro.sample("alpha", dist.HalfNormal(2.0))
    f_tilde = numpyro.sample("f_tilde", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    distance = x[:, None] - x[None, :]
    cov = alpha**2 * jnp.exp(-0.5 * distance**2 / rho**2) + 1e-10 * jnp.eye(x.shape[-1])
    f = numpyro.deterministic("f", jnp.linalg.cholesky(cov) @ f_tilde)
    numpyro.sample("k", dist.Poisson(jnp.exp(f)).to_event(1), obs=k)


def eight_schools_noncentered(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", sigma.shape[-1]):
        theta_trans = numpyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", theta_trans * tau + mu)
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


PORTED_MODELS = {
    "diamonds-diamonds": diamonds,
    "earnings-earn_height": earn_height,
    "earnings-logearn_interaction_z": logearn_interaction_z,
    "earnings-logearn_logheight_male": logearn_logheight_male,
    "eight_schools-eight_schools_noncentered": eight_schools_noncentered,
    "gp_pois_regr-gp_pois_regr": gp_pois_regr,
    "kidiq-kidscore_interaction": kidscore_interaction,
    "kidiq-kidscore_momhsiq": kidscore_momhsiq,
    "kidiq_with_mom_work-kidscore_interaction_z": kidscore_interaction_z,
    "kilpisjarvi_mod-kilpisjarvi": kilpisjarvi,
    "mesquite-logmesquite_logvash": logmesquite_logvash,
    "mesquite-mesquite": mesquite,
}
"""posteriordb name -> NumPyro model with the Pyro port's keyword arguments."""
