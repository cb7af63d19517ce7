"""The nine posteriordb ports against independent numpy/scipy implementations of Stan's targets.

Densities are compared up to an additive constant: differences between reference draws of the
port's log joint (constrained space) and of its NUTS potential (unconstrained space, with the
Jacobians written out by hand here) must equal those of the numpy target.
"""

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.infer.mcmc.util import initialize_model
from pyro.poutine.util import site_is_subsample
from scipy import stats
from scipy.special import logsumexp

from vilab.samples import flatten_samples
from vilab.models.posteriordb.mixture import RestrictedDistribution
from vilab.models.registry import get_model
from vilab.posteriordb import (
    POSTERIORDB_PORTS,
    default_posteriordb_path,
    list_posteriordb,
    load_posteriordb,
    model_kwargs,
    unflatten_samples,
)

# The nine posteriors in ../shared/posteriordb; the ports of tests/data/posteriordb are tested in
# test_posteriordb_ported.py.
NAMES = [
    "arK-arK",
    "arma-arma11",
    "garch-garch11",
    "hmm_example-hmm_example",
    "kidiq-kidscore_momiq",
    "low_dim_gauss_mix-low_dim_gauss_mix",
    "mesquite-logmesquite",
    "nes2000-nes",
    "sblrc-blr",
]
DRAWS = [(0, 0), (3, 500), (9, 999)]  # (chain, draw) of the reference draws to compare at


def _normal(x, loc, scale):
    return stats.norm.logpdf(x, loc, scale).sum()


def _regression(design, response, beta, sigma):
    return _normal(response, design @ beta, sigma)


def kidiq_target(p, d):
    design = np.column_stack([np.ones_like(d["mom_iq"]), d["mom_iq"]])
    return stats.halfcauchy.logpdf(p["sigma"], scale=2.5) + _regression(design, d["kid_score"], p["beta"], p["sigma"])


def mesquite_target(p, d):
    logs = [np.log(d[k]) for k in ("diam1", "diam2", "canopy_height", "total_height", "density")]
    design = np.column_stack([np.ones_like(d["group"]), *logs, d["group"]])
    return _regression(design, np.log(d["weight"]), p["beta"], p["sigma"])


def nes_target(p, d):
    age = d["age_discrete"]
    design = np.column_stack(
        [
            np.ones_like(age),
            d["real_ideo"],
            d["race_adj"],
            age == 2,
            age == 3,
            age == 4,
            d["educ1"],
            d["gender"],
            d["income"],
        ]
    ).astype(float)
    return _regression(design, d["partyid7"], p["beta"], p["sigma"])


def blr_target(p, d):
    prior = _normal(p["beta"], 0, 10) + stats.halfnorm.logpdf(p["sigma"], scale=10)
    return prior + _regression(d["X"], d["y"], p["beta"], p["sigma"])


def ark_target(p, d):
    y, K = d["y"], d["K"]
    loc = [p["alpha"] + sum(p["beta"][k] * y[t - k - 1] for k in range(K)) for t in range(K, len(y))]
    prior = _normal(p["alpha"], 0, 10) + _normal(p["beta"], 0, 10) + stats.halfcauchy.logpdf(p["sigma"], scale=2.5)
    return prior + _normal(y[K:], np.array(loc), p["sigma"])


def arma_target(p, d):
    y, err = d["y"], []
    for t in range(len(y)):
        nu = p["mu"] + p["phi"] * p["mu"] if t == 0 else p["mu"] + p["phi"] * y[t - 1] + p["theta"] * err[-1]
        err.append(y[t] - nu)
    prior = _normal(p["mu"], 0, 10) + _normal(p["phi"], 0, 2) + _normal(p["theta"], 0, 2)
    return prior + stats.halfcauchy.logpdf(p["sigma"], scale=2.5) + _normal(np.array(err), 0, p["sigma"])


def garch_target(p, d):
    y, sigma = d["y"], [d["sigma1"]]
    for t in range(1, len(y)):
        sigma.append(np.sqrt(p["alpha0"] + p["alpha1"] * (y[t - 1] - p["mu"]) ** 2 + p["beta1"] * sigma[-1] ** 2))
    return _normal(y, p["mu"], np.array(sigma))  # all priors flat


def gauss_mix_target(p, d):
    mu, sigma, theta = p["mu"], p["sigma"], p["theta"]
    prior = _normal(mu, 0, 2) + stats.halfnorm.logpdf(sigma, scale=2).sum() + stats.beta.logpdf(theta, 5, 5)
    first = np.log(theta) + stats.norm.logpdf(d["y"], mu[0], sigma[0])
    second = np.log1p(-theta) + stats.norm.logpdf(d["y"], mu[1], sigma[1])
    return prior + np.logaddexp(first, second).sum()


def hmm_target(p, d):
    theta = np.log(np.stack([p["theta1"], p["theta2"]]))  # [old, new]
    emission = stats.norm.logpdf(d["y"][:, None], p["mu"][None, :], 1.0)
    gamma = emission[0]
    for t in range(1, len(d["y"])):  # Stan's forward algorithm
        gamma = logsumexp(gamma[:, None] + theta, axis=0) + emission[t]
    return stats.norm.logpdf(p["mu"][0], 3, 1) + stats.norm.logpdf(p["mu"][1], 10, 1) + logsumexp(gamma)


TARGETS = {
    "arK-arK": ark_target,
    "arma-arma11": arma_target,
    "garch-garch11": garch_target,
    "hmm_example-hmm_example": hmm_target,
    "kidiq-kidscore_momiq": kidiq_target,
    "low_dim_gauss_mix-low_dim_gauss_mix": gauss_mix_target,
    "mesquite-logmesquite": mesquite_target,
    "nes2000-nes": nes_target,
    "sblrc-blr": blr_target,
}


def _log_jacobian(name, site, x):
    """log |d constrained / d unconstrained| of Pyro's bijection for the site's support."""
    if site in ("sigma", "alpha0"):
        return np.log(x).sum()
    if site in ("alpha1", "beta1_fraction") or (site, name) == ("theta", "low_dim_gauss_mix-low_dim_gauss_mix"):
        return np.log(x) + np.log1p(-x)
    if site in ("theta1", "theta2"):  # stick-breaking with K = 2: x1 = sigmoid(z)
        return np.log(x).sum()
    return 0.0


def _mu_log_jacobian(name, mu):
    if name == "low_dim_gauss_mix-low_dim_gauss_mix":  # (z1, z1 + exp z2)
        return np.log(mu[1] - mu[0])
    if name == "hmm_example-hmm_example":  # exp of (z1, z1 + exp z2)
        return np.log(np.log(mu[1]) - np.log(mu[0])) + np.log(mu).sum()
    return 0.0


def _latents(problem, chain, draw):
    sites = unflatten_samples({k: v[chain, draw] for k, v in problem.reference_draws.items()}, 0)
    if problem.name == "garch-garch11":  # helper site of the dependent bound
        sites["beta1_fraction"] = sites["beta1"] / (1 - sites["alpha1"])
        del sites["beta1"]
    return sites


def _numpy_data(problem):
    data = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in problem.kwargs.items()}
    return data


def _numpy_params(sites, problem):
    params = {k: v.numpy() for k, v in sites.items()}
    if "beta1_fraction" in params:
        params["beta1"] = params["beta1_fraction"] * (1 - params["alpha1"])
    return params


_LOADED: dict = {}


@pytest.fixture
def problems(posteriordb_path):
    """All nine problems, read once per session (the autouse fixture has set float64)."""
    if not _LOADED:
        _LOADED.update({name: load_posteriordb(posteriordb_path, name) for name in NAMES})
    return _LOADED


@pytest.mark.parametrize("name", NAMES)
def test_log_joint_matches_numpy_target_up_to_a_constant(problems, name):
    problem = problems[name]
    ours, theirs = [], []
    for chain, draw in DRAWS:
        sites = _latents(problem, chain, draw)
        trace = poutine.trace(poutine.condition(problem.model, sites)).get_trace(**problem.kwargs)
        ours.append(float(trace.log_prob_sum()))
        params = _numpy_params(sites, problem)
        target = TARGETS[name](params, _numpy_data(problem))
        if name == "garch-garch11":  # density of (alpha1, u) = density of (alpha1, beta1) * (1 - alpha1)
            target += np.log1p(-params["alpha1"])
        theirs.append(target)
    np.testing.assert_allclose(np.diff(ours), np.diff(theirs), rtol=1e-9, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_nuts_potential_matches_numpy_target_plus_jacobian(problems, name):
    problem = problems[name]
    _, potential_fn, transforms, _ = initialize_model(problem.model, model_kwargs=problem.kwargs)
    ours, theirs = [], []
    for chain, draw in DRAWS:
        sites = _latents(problem, chain, draw)
        unconstrained = {k: transforms[k](v) if k in transforms else v for k, v in sites.items()}
        ours.append(-float(potential_fn(unconstrained)))
        params = _numpy_params(sites, problem)
        target = TARGETS[name](params, _numpy_data(problem))
        jacobian = sum(_log_jacobian(name, k, v.numpy()) for k, v in sites.items() if k != "mu")
        jacobian += _mu_log_jacobian(name, params.get("mu"))
        if name == "garch-garch11":
            target += np.log1p(-params["alpha1"])
        theirs.append(target + jacobian)
    np.testing.assert_allclose(np.diff(ours), np.diff(theirs), rtol=1e-9, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_sites_flatten_to_the_reference_names(problems, name):
    problem = problems[name]
    trace = poutine.trace(problem.model).get_trace(**problem.kwargs)
    reported = {
        k: s["value"]
        for k, s in trace.nodes.items()
        if k == "beta1" or (s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s))
    }
    flat = flatten_samples(reported, num_batch_dims=0)
    assert set(problem.reference_draws) <= set(flat)
    helpers = set(flat) - set(problem.reference_draws)
    assert helpers <= {"beta1_fraction"}
    for values in problem.reference_draws.values():
        assert values.shape == (10, 1000)


@pytest.mark.parametrize(
    "name,length_field,expected",
    [
        ("arK-arK", "T", 8 - 5),
        ("arma-arma11", "T", 8),
        ("sblrc-blr", None, 100),
        ("low_dim_gauss_mix-low_dim_gauss_mix", "N", 8),
        ("hmm_example-hmm_example", "N", 8),
    ],
)
def test_prior_predictive_draws_observations_of_the_data_shape(problems, name, length_field, expected):
    problem = problems[name]
    kwargs = dict(problem.kwargs, y=None)
    if length_field is not None:
        kwargs[length_field] = 8  # short series: AR priors with sd 10 explode over 200 steps
    draws = Predictive(problem.model, num_samples=5)(**kwargs)
    assert draws["y"].shape == (5, expected)
    assert torch.isfinite(draws["y"]).all()


@pytest.mark.parametrize(
    "name,observed",
    [
        ("kidiq-kidscore_momiq", "kid_score"),
        ("mesquite-logmesquite", "log_weight"),
        ("nes2000-nes", "partyid7"),
        ("garch-garch11", "y"),
    ],
)
def test_posterior_predictive_of_flat_prior_ports(problems, name, observed):
    problem = problems[name]
    field = {"log_weight": "weight"}.get(observed, observed)
    sites = {k: v[:, :3].reshape(-1, *v.shape[2:]) for k, v in _batched_latents(problem).items()}
    kwargs = dict(problem.kwargs, **{field: None})
    draws = Predictive(problem.model, posterior_samples=sites, parallel=False)(**kwargs)
    assert draws[observed].shape == (30, problem.kwargs[field].shape[0])
    assert torch.isfinite(draws[observed]).all()


def _batched_latents(problem):
    sites = unflatten_samples(problem.reference_draws, 2)
    if problem.name == "garch-garch11":
        sites["beta1_fraction"] = sites.pop("beta1") / (1 - sites["alpha1"])
    return sites


def test_restricted_normal_draws_are_ordered_with_the_mean_of_the_smaller_of_two():
    draws = RestrictedDistribution(
        pyro.distributions.Normal(0.0, 2.0).expand([2]).to_event(1), pyro.distributions.constraints.ordered_vector
    ).sample((4000,))
    assert (draws[:, 0] < draws[:, 1]).all()
    # E min(X1, X2) = -s / sqrt(pi) for X ~ N(0, s^2) iid; sd of the min = s sqrt(1 - 1/pi); z = 4.
    standard_error = 2.0 * np.sqrt(1 - 1 / np.pi) / np.sqrt(4000)
    assert abs(draws[:, 0].mean().item() + 2.0 / np.sqrt(np.pi)) < 4 * standard_error


def test_registry_loads_ports_lazily(posteriordb_path, monkeypatch):
    monkeypatch.setenv("VILAB_POSTERIORDB", posteriordb_path)
    model, args, kwargs = get_model("posteriordb/kidiq-kidscore_momiq").load()
    assert model is POSTERIORDB_PORTS["kidiq-kidscore_momiq"] and args == ()
    assert set(kwargs) == {"mom_iq", "kid_score"} and kwargs["mom_iq"].shape == (434,)


def test_list_and_default_path(posteriordb_path, monkeypatch):
    assert list_posteriordb(posteriordb_path) == NAMES
    monkeypatch.setenv("VILAB_POSTERIORDB", posteriordb_path)
    assert str(default_posteriordb_path()) == posteriordb_path
    monkeypatch.setenv("VILAB_POSTERIORDB", "/nonexistent/posteriordb")
    with pytest.raises(FileNotFoundError, match="VILAB_POSTERIORDB"):
        default_posteriordb_path()


def test_errors_name_the_problem(posteriordb_path, tmp_path):
    with pytest.raises(ValueError, match="kidiq-kidscore_momiq"):
        load_posteriordb(posteriordb_path, "eight_schools")
    with pytest.raises(FileNotFoundError, match="path"):
        load_posteriordb(tmp_path / "missing", "sblrc-blr")
    with pytest.raises(ValueError, match=r"expected fields \['X'\]"):
        model_kwargs(POSTERIORDB_PORTS["sblrc-blr"], {"y": [1.0], "N": 1})
    with pytest.raises(ValueError, match="K: expected 2"):
        POSTERIORDB_PORTS["hmm_example-hmm_example"](N=5, K=3)
    with pytest.raises(ValueError, match="T: expected len"):
        POSTERIORDB_PORTS["arma-arma11"](y=torch.zeros(5), T=6)


def _recursion_by_loop(drive, rate):
    values = [drive[..., 0] + 0 * rate[..., 0]]
    for t in range(1, drive.shape[-1]):
        values.append(drive[..., t] + rate[..., 0] * values[-1])
    return torch.stack(values, -1)


@pytest.mark.parametrize("length", [1, 2, 7, 8, 9, 200])
def test_first_order_recursion_matches_the_loop_with_gradients(length):
    from vilab.models.posteriordb.timeseries import first_order_recursion

    generator = torch.Generator().manual_seed(length)
    drive = torch.randn(3, length, dtype=torch.float64, generator=generator).requires_grad_()
    # One contracting, one sign-alternating and one expanding rate, as warm-up visits all three.
    rate = torch.tensor([[0.3], [-0.9], [1.02]], dtype=torch.float64, requires_grad=True)
    got, expected = first_order_recursion(drive, rate), _recursion_by_loop(drive, rate)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(3, length, dtype=torch.float64, generator=generator)
    got_grads = torch.autograd.grad((got * weights).sum(), (drive, rate), materialize_grads=True)
    expected_grads = torch.autograd.grad((expected * weights).sum(), (drive, rate))
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_first_order_recursion_broadcasts_a_scalar_rate_and_a_batched_one():
    from vilab.models.posteriordb.timeseries import first_order_recursion

    drive = torch.randn(5, dtype=torch.float64)
    rates = torch.tensor([[0.5], [-0.5]], dtype=torch.float64)
    assert first_order_recursion(drive, rates).shape == (2, 5)
    torch.testing.assert_close(
        first_order_recursion(drive, torch.tensor(0.5, dtype=torch.float64)),
        _recursion_by_loop(drive, torch.tensor([0.5], dtype=torch.float64)),
    )
