"""The twelve ported posteriordb posteriors (compact copies in ``tests/data/posteriordb``)
against independent numpy/scipy implementations of their Stan targets.

Log densities are compared up to an additive constant (Stan drops constants; a half-Cauchy or a
truncated t differs from the untruncated density by one) at three reference draws: differences
between draws of the port's log joint must equal those of the numpy target.
"""

import os

import numpy as np
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from scipy import stats

from vilab.samples import flatten_samples
from vilab.posteriordb import list_posteriordb, load_posteriordb, unflatten_samples

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "data", "posteriordb")
DRAWS = [(0, 0), (4, 50), (9, 99)]  # (chain, draw) of the thinned reference draws


def _normal(x, loc, scale):
    return stats.norm.logpdf(x, loc, scale).sum()


def _ols(columns, response, p):
    return _normal(response, np.column_stack(columns) @ p["beta"], p["sigma"])


def _z(x, scale=1.0):
    return (x - x.mean()) / (scale * x.std(ddof=1))


def _kidiq(columns):
    def target(p, d):
        return stats.halfcauchy.logpdf(p["sigma"], scale=2.5) + _ols(columns(d), d["kid_score"], p)

    return target


def interaction_z(p, d):
    hs, iq = _z(d["mom_hs"], 2.0), _z(d["mom_iq"], 2.0)
    return _ols([np.ones_like(hs), hs, iq, hs * iq], d["kid_score"], p)


def logearn_interaction_z(p, d):
    z = _z(d["height"])
    return _ols([np.ones_like(z), z, d["male"], z * d["male"]], np.log(d["earn"]), p)


def logvash(p, d):
    d1, d2 = d["diam1"], d["diam2"]
    columns = [
        np.ones_like(d1),
        np.log(d1 * d2 * d["canopy_height"]),
        np.log(d1 * d2),
        np.log(d1 / d2),
        np.log(d["total_height"]),
        d["group"],
    ]
    return _ols(columns, np.log(d["weight"]), p)


def kilpisjarvi(p, d):
    prior = _normal(p["alpha"], d["pmualpha"], d["psalpha"]) + _normal(p["beta"], d["pmubeta"], d["psbeta"])
    return prior + _normal(d["y"], p["alpha"] + p["beta"] * d["x"], p["sigma"])


def diamonds(p, d):
    centred = d["X"][:, 1:] - d["X"][:, 1:].mean(0)
    prior = _normal(p["b"], 0, 1) + stats.t.logpdf(p["Intercept"], 3, 8, 10) + stats.t.logpdf(p["sigma"], 3, 0, 10)
    return prior + _normal(d["Y"], p["Intercept"] + centred @ p["b"], p["sigma"])


def gp_pois_regr(p, d):
    x = d["x"]
    cov = p["alpha"] ** 2 * np.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / p["rho"] ** 2) + 1e-10 * np.eye(len(x))
    f = np.linalg.cholesky(cov) @ p["f_tilde"]
    prior = stats.gamma.logpdf(p["rho"], 25, scale=1 / 4) + stats.halfnorm.logpdf(p["alpha"], scale=2)
    return prior + _normal(p["f_tilde"], 0, 1) + stats.poisson.logpmf(d["k"], np.exp(f)).sum()


def eight_schools(p, d):
    prior = _normal(p["theta_trans"], 0, 1) + _normal(p["mu"], 0, 5) + stats.halfcauchy.logpdf(p["tau"], scale=5)
    return prior + _normal(d["y"], p["mu"] + p["tau"] * p["theta_trans"], d["sigma"])


TARGETS = {
    "kidiq-kidscore_momhsiq": _kidiq(lambda d: [np.ones_like(d["mom_iq"]), d["mom_hs"], d["mom_iq"]]),
    "kidiq-kidscore_interaction": _kidiq(
        lambda d: [np.ones_like(d["mom_iq"]), d["mom_hs"], d["mom_iq"], d["mom_hs"] * d["mom_iq"]]
    ),
    "kidiq_with_mom_work-kidscore_interaction_z": interaction_z,
    "earnings-earn_height": lambda p, d: _ols([np.ones_like(d["height"]), d["height"]], d["earn"], p),
    "earnings-logearn_logheight_male": lambda p, d: _ols(
        [np.ones_like(d["height"]), np.log(d["height"]), d["male"]], np.log(d["earn"]), p
    ),
    "earnings-logearn_interaction_z": logearn_interaction_z,
    "mesquite-mesquite": lambda p, d: _ols(
        [np.ones_like(d["group"])]
        + [d[k] for k in ("diam1", "diam2", "canopy_height", "total_height", "density", "group")],
        d["weight"],
        p,
    ),
    "mesquite-logmesquite_logvash": logvash,
    "kilpisjarvi_mod-kilpisjarvi": kilpisjarvi,
    "diamonds-diamonds": diamonds,
    "gp_pois_regr-gp_pois_regr": gp_pois_regr,
    "eight_schools-eight_schools_noncentered": eight_schools,
}
NAMES = sorted(TARGETS)
_LOADED: dict = {}


@pytest.fixture
def problems():
    if not _LOADED:
        _LOADED.update({name: load_posteriordb(DATA, name) for name in NAMES})
    return _LOADED


def _latents(problem, chain, draw):
    """The port's latent sites at a reference draw (helper sites recovered from what Stan reports)."""
    sites = unflatten_samples({k: v[chain, draw] for k, v in problem.reference_draws.items()}, 0)
    if problem.name.startswith("gp_pois_regr"):
        x = problem.kwargs["x"]
        cov = sites["alpha"] ** 2 * torch.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / sites["rho"] ** 2)
        cholesky = torch.linalg.cholesky(cov + 1e-10 * torch.eye(len(x)))
        sites["f_tilde"] = torch.linalg.solve_triangular(cholesky, sites.pop("f")[:, None], upper=False)[:, 0]
    if problem.name.startswith("eight_schools"):
        sites["theta_trans"] = (sites.pop("theta") - sites["mu"]) / sites["tau"]
    return sites


def test_the_ported_folder_lists_every_port():
    assert list_posteriordb(DATA) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_log_joint_matches_numpy_target_up_to_a_constant(problems, name):
    problem = problems[name]
    data = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in problem.kwargs.items()}
    ours, theirs = [], []
    for chain, draw in DRAWS:
        sites = _latents(problem, chain, draw)
        trace = poutine.trace(poutine.condition(problem.model, sites)).get_trace(**problem.kwargs)
        ours.append(float(trace.log_prob_sum()))
        theirs.append(TARGETS[name]({k: v.numpy() for k, v in sites.items()}, data))
    np.testing.assert_allclose(np.diff(ours), np.diff(theirs), rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_sites_flatten_to_the_reference_names(problems, name):
    problem = problems[name]
    trace = poutine.trace(problem.model).get_trace(**problem.kwargs)
    reported = {
        k: s["value"]
        for k, s in trace.nodes.items()
        if s["type"] == "sample"
        and not site_is_subsample(s)
        and (not s["is_observed"] or s["infer"].get("_deterministic", False))
    }
    flat = flatten_samples(reported, num_batch_dims=0)
    assert set(problem.reference_draws) <= set(flat)
    assert {k.split("[")[0] for k in set(flat) - set(problem.reference_draws)} <= {"f_tilde", "theta_trans"}
    summary = problem.reference_summary["parameters"]
    for key, values in problem.reference_draws.items():
        assert values.shape == (10, 100)
        # The thinned draws agree with the full reference's mean within their Monte Carlo error.
        assert abs(values.mean() - summary[key]["mean"]) < 5 * summary[key]["sd"] / np.sqrt(1000)
