"""Exact posterior moments (and exact draws, for ``compare``) of the zoo's conjugate models.

Each ``*_moments`` returns statistic -> (mean, sd); each ``*_draws`` returns site -> array of
``num_draws`` exact posterior draws with the site's shape.
"""

from __future__ import annotations

import numpy as np
from scipy import special

__all__ = [
    "beta_moments",
    "coin_moments",
    "coin_draws",
    "scale_moments",
    "scale_draws",
    "poll_moments",
    "poll_draws",
    "fully_pooled_moments",
    "fully_pooled_draws",
    "not_pooled_moments",
    "not_pooled_draws",
    "coal_moments",
    "coal_draws",
    "missing_moments",
    "missing_draws",
]


def beta_moments(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return a / (a + b), np.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))


def coin_moments(data):
    mean, sd = beta_moments(10 + data["data"].sum(), 10 + len(data["data"]) - data["data"].sum())
    return {"latent_fairness": (float(mean), float(sd))}


def coin_draws(data, num_draws, rng):
    heads = data["data"].sum()
    return {"latent_fairness": rng.beta(10 + heads, 10 + len(data["data"]) - heads, num_draws)}


def _scale_posterior():
    # prior N(8.5, 1), one measurement 9.5 with sd 0.75
    precision = 1.0 + 1.0 / 0.75**2
    return (8.5 + 9.5 / 0.75**2) / precision, 1.0 / np.sqrt(precision)


def scale_moments(data):
    return {"weight": _scale_posterior()}


def scale_draws(data, num_draws, rng):
    mean, sd = _scale_posterior()
    return {"weight": rng.normal(mean, sd, num_draws)}


def poll_moments(data):
    alpha = 1.0 + data["counts"]
    means, sds = beta_moments(alpha, alpha.sum() - alpha)
    return {f"theta[{k + 1}]": (float(m), float(s)) for k, (m, s) in enumerate(zip(means, sds))}


def poll_draws(data, num_draws, rng):
    return {"theta": rng.dirichlet(1.0 + data["counts"], num_draws)}


def fully_pooled_moments(data):
    hits, misses = data["hits"].sum(), (data["at_bats"] - data["hits"]).sum()
    mean, sd = beta_moments(1 + hits, 1 + misses)
    return {"phi": (float(mean), float(sd))}


def fully_pooled_draws(data, num_draws, rng):
    hits, misses = data["hits"].sum(), (data["at_bats"] - data["hits"]).sum()
    return {"phi": rng.beta(1 + hits, 1 + misses, num_draws)}


def not_pooled_moments(data):
    means, sds = beta_moments(1 + data["hits"], 1 + data["at_bats"] - data["hits"])
    return {f"phi[{i + 1}]": (float(m), float(s)) for i, (m, s) in enumerate(zip(means, sds))}


def not_pooled_draws(data, num_draws, rng):
    return {"phi": rng.beta(1 + data["hits"], 1 + data["at_bats"] - data["hits"], (num_draws, len(data["hits"])))}


def _coal_mixture(data):
    """Given the change year s (1-based), e and l are independent gammas; p(s | D) is exact.

    Returns p(s | D) and the gamma shapes and rates of e and l for every s.
    """
    D, r_e, r_l = data["D"], data["r_e"], data["r_l"]
    T = len(D)
    before = np.concatenate([[0.0], np.cumsum(D)[:-1]])  # sum of D[t] for t < s
    n_before = np.arange(T, dtype=float)  # years before s
    shape_e, rate_e = 1.0 + before, r_e + n_before
    shape_l, rate_l = 1.0 + D.sum() - before, r_l + T - n_before
    # log of the Gamma-Poisson marginal of each block (the 1/prod(D!) factor is common to all s)
    log_weight = (
        np.log(r_e)
        + special.gammaln(shape_e)
        - shape_e * np.log(rate_e)
        + np.log(r_l)
        + special.gammaln(shape_l)
        - shape_l * np.log(rate_l)
    )
    weights = np.exp(log_weight - special.logsumexp(log_weight))
    return weights, shape_e, rate_e, shape_l, rate_l


def coal_moments(data):
    weights, shape_e, rate_e, shape_l, rate_l = _coal_mixture(data)
    result = {}
    for name, shape, rate in (("e", shape_e, rate_e), ("l", shape_l, rate_l)):
        mean = np.sum(weights * shape / rate)
        second = np.sum(weights * shape * (shape + 1) / rate**2)
        result[name] = (float(mean), float(np.sqrt(second - mean**2)))
    return result


def coal_draws(data, num_draws, rng):
    weights, shape_e, rate_e, shape_l, rate_l = _coal_mixture(data)
    s = rng.choice(len(weights), size=num_draws, p=weights)
    return {"e": rng.gamma(shape_e[s], 1 / rate_e[s]), "l": rng.gamma(shape_l[s], 1 / rate_l[s])}


def _missing_posterior(data):
    """Flat priors on mu and sigma > 0: with n observed values, sigma^2 is scaled
    inverse-chi-square with n - 2 degrees of freedom and scale (n - 1) s^2 / (n - 2), and mu is
    Student-t with n - 2 degrees of freedom (BDA3 section 3.2 with one observation fewer)."""
    y = data["y"][data["mask"]]
    n = len(y)
    dof = n - 2
    tau2 = (n - 1) * y.var(ddof=1) / dof
    return y.mean(), n, dof, tau2


def missing_moments(data):
    ybar, n, dof, tau2 = _missing_posterior(data)
    var_sigma2 = dof * tau2 / (dof - 2)  # E[sigma^2]
    mean_sigma = np.sqrt(tau2 * dof / 2) * np.exp(special.gammaln((dof - 1) / 2) - special.gammaln(dof / 2))
    result = {
        "mu": (float(ybar), float(np.sqrt(var_sigma2 / n))),
        "sigma": (float(mean_sigma), float(np.sqrt(var_sigma2 - mean_sigma**2))),
    }
    for index in np.flatnonzero(~data["mask"]):
        result[f"y_missing[{index + 1}]"] = (float(ybar), float(np.sqrt(var_sigma2 * (1 + 1 / n))))
    return result


def missing_draws(data, num_draws, rng):
    ybar, n, dof, tau2 = _missing_posterior(data)
    sigma2 = dof * tau2 / rng.chisquare(dof, num_draws)
    mu = rng.normal(ybar, np.sqrt(sigma2 / n))
    return {"mu": mu, "sigma": np.sqrt(sigma2)}
