"""NumPyro ports of the benchmark problems (bench-only code: NumPyro and JAX come from the
``bench`` extra).

Each port takes the same keyword arguments as the Pyro model it mirrors (the posteriordb data
fields, or eight schools' ``J``, ``sigma``, ``y``) as NumPy arrays or numbers, and defines the
same posterior over the same site names; flat priors are ``ImproperUniform`` and the ordered
means of the mixtures are ``ImproperUniform`` on the ordered cone plus their normal densities
as a factor, as Stan writes them. Recursions (ARMA errors, GARCH variances, the HMM forward
pass) use ``jax.lax.scan``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

__all__ = ["NUMPYRO_MODELS"]


def _flat(support, event_shape=()):
    return dist.ImproperUniform(support, (), event_shape)


def eight_schools(J, sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", J):
        eta = numpyro.sample("eta", dist.Normal(0.0, 1.0))
        numpyro.sample("obs", dist.Normal(mu + tau * eta, sigma), obs=y)


def ar_k(K, y, T=None):
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 10.0).expand([K]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    length = y.shape[0]
    lags = jnp.stack([y[K - k : length - k] for k in range(1, K + 1)], -1)
    numpyro.sample("y", dist.Normal(alpha + lags @ beta, sigma), obs=y[K:])


def arma11(y, T=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    phi = numpyro.sample("phi", dist.Normal(0.0, 2.0))
    theta = numpyro.sample("theta", dist.Normal(0.0, 2.0))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    first = y[0] - (mu + phi * mu)

    def step(error, pair):
        previous, current = pair
        error = current - (mu + phi * previous + theta * error)
        return error, error

    _, rest = jax.lax.scan(step, first, (y[:-1], y[1:]))
    errors = jnp.concatenate([first[None], rest])
    numpyro.factor("y", dist.Normal(0.0, sigma).log_prob(errors).sum())


def garch11(sigma1, y, T=None):
    mu = numpyro.sample("mu", _flat(constraints.real))
    alpha0 = numpyro.sample("alpha0", _flat(constraints.positive))
    alpha1 = numpyro.sample("alpha1", dist.Uniform(0.0, 1.0))
    fraction = numpyro.sample("beta1_fraction", dist.Uniform(0.0, 1.0))
    beta1 = numpyro.deterministic("beta1", (1.0 - alpha1) * fraction)
    numpyro.factor("beta1_jacobian", jnp.log1p(-alpha1))

    def step(variance, previous):
        variance = alpha0 + alpha1 * (previous - mu) ** 2 + beta1 * variance
        return variance, variance

    _, rest = jax.lax.scan(step, jnp.asarray(sigma1, dtype=y.dtype) ** 2, y[:-1])
    variance = jnp.concatenate([jnp.asarray([sigma1**2], dtype=y.dtype), rest])
    numpyro.sample("y", dist.Normal(mu, jnp.sqrt(variance)), obs=y)


def hmm_example(y, N=None, K=2):
    theta1 = numpyro.sample("theta1", dist.Dirichlet(jnp.ones(2)))
    theta2 = numpyro.sample("theta2", dist.Dirichlet(jnp.ones(2)))
    mu = numpyro.sample("mu", _flat(constraints.positive_ordered_vector, (2,)))
    numpyro.factor("mu_prior", dist.Normal(jnp.array([3.0, 10.0]), 1.0).log_prob(mu).sum())
    log_transition = jnp.log(jnp.stack([theta1, theta2]))
    emission = dist.Normal(mu, 1.0).log_prob(y[:, None])  # (N, 2)

    def step(gamma, log_emission):
        gamma = jax.nn.logsumexp(gamma[:, None] + log_transition, 0) + log_emission
        return gamma, None

    gamma, _ = jax.lax.scan(step, emission[0], emission[1:])
    numpyro.factor("y", jax.nn.logsumexp(gamma))


def low_dim_gauss_mix(y, N=None):
    mu = numpyro.sample("mu", _flat(constraints.ordered_vector, (2,)))
    numpyro.factor("mu_prior", dist.Normal(0.0, 2.0).log_prob(mu).sum())
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    theta = numpyro.sample("theta", dist.Beta(5.0, 5.0))
    components = dist.Normal(mu, sigma).log_prob(y[:, None]) + jnp.log(jnp.stack([theta, 1.0 - theta]))
    numpyro.factor("y", jax.nn.logsumexp(components, -1).sum())


def _regression(beta, sigma, design, target):
    numpyro.sample("obs", dist.Normal(design @ beta, sigma), obs=target)


def kidscore_momiq(mom_iq, kid_score):
    beta = numpyro.sample("beta", _flat(constraints.real, (2,)))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    _regression(beta, sigma, jnp.stack([jnp.ones_like(mom_iq), mom_iq], -1), kid_score)


def logmesquite(diam1, diam2, canopy_height, total_height, density, group, weight):
    beta = numpyro.sample("beta", _flat(constraints.real, (7,)))
    sigma = numpyro.sample("sigma", _flat(constraints.positive))
    logs = [jnp.log(x) for x in (diam1, diam2, canopy_height, total_height, density)]
    _regression(beta, sigma, jnp.stack([jnp.ones_like(group), *logs, group], -1), jnp.log(weight))


def nes(real_ideo, race_adj, age_discrete, educ1, gender, income, partyid7):
    beta = numpyro.sample("beta", _flat(constraints.real, (9,)))
    sigma = numpyro.sample("sigma", _flat(constraints.positive))
    ages = [(age_discrete == a).astype(real_ideo.dtype) for a in (2, 3, 4)]
    columns = [jnp.ones_like(real_ideo), real_ideo, race_adj, *ages, educ1, gender, income]
    _regression(beta, sigma, jnp.stack(columns, -1), partyid7)


def blr(X, y):
    beta = numpyro.sample("beta", dist.Normal(0.0, 10.0).expand([X.shape[-1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(10.0))
    _regression(beta, sigma, X, y)


NUMPYRO_MODELS = {
    "eight_schools": eight_schools,
    "arK-arK": ar_k,
    "arma-arma11": arma11,
    "garch-garch11": garch11,
    "hmm_example-hmm_example": hmm_example,
    "kidiq-kidscore_momiq": kidscore_momiq,
    "low_dim_gauss_mix-low_dim_gauss_mix": low_dim_gauss_mix,
    "mesquite-logmesquite": logmesquite,
    "nes2000-nes": nes,
    "sblrc-blr": blr,
}
"""Problem name (as in ``benchmarks/nuts_speed.py``) -> NumPyro model."""
