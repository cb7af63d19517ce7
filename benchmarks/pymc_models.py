"""PyMC ports of benchmark posteriors, for nutpie (bench-only code: PyMC and nutpie come from the
``bench`` extra).

Each builder takes the Pyro port's keyword arguments (posteriordb data fields as NumPy arrays or
numbers) and returns a ``pm.Model`` of the same posterior with the same variable names, written
as the Stan program is: flat priors are ``pm.Flat`` / ``pm.HalfFlat``.
"""

from __future__ import annotations

import numpy as np
import pymc as pm

__all__ = ["PYMC_MODELS"]


def eight_schools_noncentered(sigma, y):
    """posteriordb ``eight_schools-eight_schools_noncentered``."""
    with pm.Model() as model:
        mu = pm.Normal("mu", 0.0, 5.0)
        tau = pm.HalfCauchy("tau", 5.0)
        theta_trans = pm.Normal("theta_trans", 0.0, 1.0, shape=len(sigma))
        theta = pm.Deterministic("theta", theta_trans * tau + mu)
        pm.Normal("y", theta, np.asarray(sigma), observed=np.asarray(y))
    return model


def kidscore_momiq(mom_iq, kid_score):
    """posteriordb ``kidiq-kidscore_momiq``: flat coefficients, half-Cauchy(2.5) noise scale."""
    with pm.Model() as model:
        beta = pm.Flat("beta", shape=2)
        sigma = pm.HalfCauchy("sigma", 2.5)
        pm.Normal("kid_score", beta[0] + beta[1] * np.asarray(mom_iq), sigma, observed=np.asarray(kid_score))
    return model


def kidscore_momhsiq(mom_hs, mom_iq, kid_score):
    """posteriordb ``kidiq-kidscore_momhsiq``."""
    with pm.Model() as model:
        beta = pm.Flat("beta", shape=3)
        sigma = pm.HalfCauchy("sigma", 2.5)
        loc = beta[0] + beta[1] * np.asarray(mom_hs) + beta[2] * np.asarray(mom_iq)
        pm.Normal("kid_score", loc, sigma, observed=np.asarray(kid_score))
    return model


def kilpisjarvi(x, pmualpha, psalpha, pmubeta, psbeta, y):
    """posteriordb ``kilpisjarvi_mod-kilpisjarvi``: unscaled years, so alpha and beta are almost
    perfectly correlated."""
    with pm.Model() as model:
        alpha = pm.Normal("alpha", pmualpha, psalpha)
        beta = pm.Normal("beta", pmubeta, psbeta)
        sigma = pm.HalfFlat("sigma")
        pm.Normal("y", alpha + beta * np.asarray(x), sigma, observed=np.asarray(y))
    return model


PYMC_MODELS = {
    "posteriordb/eight_schools-eight_schools_noncentered": eight_schools_noncentered,
    "posteriordb/kidiq-kidscore_momiq": kidscore_momiq,
    "posteriordb/kidiq-kidscore_momhsiq": kidscore_momhsiq,
    "posteriordb/kilpisjarvi_mod-kilpisjarvi": kilpisjarvi,
}
"""Benchmark problem name -> builder of its ``pm.Model`` from the Pyro port's keyword arguments."""
