"""Subsampled plates evaluated on the full data, obs_mask sites made proper, ImproperUniform
sites placed rather than sampled: through fit_svi and run_nuts."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from scipy.stats import norm

from vilab.inference import fit_svi, run_nuts
from vilab.inference.common.tracing import trace_model

Z = norm.ppf(1 - 0.001 / 2)
NUM_OBS = 1000
Y = 1.0 + torch.randn(NUM_OBS, generator=torch.Generator().manual_seed(0))


def subsampled_mean(y):
    """Pyro's SVI-part-II style: a data plate with ``subsample_size`` and ``y[ind]``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(y), subsample_size=100) as ind:
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y[ind])


def _exact_posterior():
    precision = 1 / 100 + NUM_OBS
    return Y.sum().item() / precision, precision**-0.5


def test_full_plates_runs_a_subsampled_plate_over_every_index():
    from vilab.inference.common.model_handlers import full_plates

    trace = trace_model(full_plates(subsampled_mean), (Y,), {})
    assert trace.nodes["obs"]["value"].shape == (NUM_OBS,) and trace.nodes["obs"]["scale"] == 1.0
    # Outside the handler the plate subsamples again (the wrapped library helper is restored).
    assert trace_model(subsampled_mean, (Y,), {}).nodes["obs"]["value"].shape == (100,)


def test_subsampled_fit_is_evaluated_on_the_full_data():
    result = fit_svi(subsampled_mean, "meanfield", Y, num_steps=30, progress=False)
    draws = result.draws(50, seed=0)
    mu = draws.samples["mu"]
    assert draws.log_likelihood["obs"].shape == (50, NUM_OBS)
    assert torch.allclose(draws.log_likelihood["obs"], dist.Normal(mu.unsqueeze(-1), 1.0).log_prob(Y))
    loc, scale = (pyro.param(f"AutoNormal.{kind}.mu").detach() for kind in ("locs", "scales"))
    log_joint = dist.Normal(0.0, 10.0).log_prob(mu) + dist.Normal(mu.unsqueeze(-1), 1.0).log_prob(Y).sum(-1)
    assert torch.allclose(draws.log_weights, log_joint - dist.Normal(loc, scale).log_prob(mu))
    idata = result.inference_data(draws=draws)
    assert idata.observed_data["obs"].shape == (NUM_OBS,)
    assert np.allclose(idata.observed_data["obs"].values, Y.numpy())


def test_run_nuts_samples_the_full_data_posterior_of_a_subsampled_model():
    result = run_nuts(subsampled_mean, Y, num_samples=500, num_warmup=300, num_chains=2, progress=False)
    mean, sd = _exact_posterior()
    draws = result.samples["mu"].reshape(-1)
    ess = float(result.summary(var_names=["mu"])["ess_bulk"].iloc[0])
    assert abs(draws.mean().item() - mean) < Z * sd / math.sqrt(ess)
    assert abs(draws.std().item() - sd) < Z * sd / math.sqrt(2 * ess)
    assert result.inference_data.log_likelihood["obs"].shape[-1] == NUM_OBS


def test_proper_unobserved_gives_the_unused_elements_a_density():
    from vilab.inference.common.model_handlers import proper_unobserved

    mask = torch.tensor([True, False, True])

    def model(y, mask):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 3):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=y, obs_mask=mask)

    y = torch.tensor([0.5, 0.0, -0.5])
    plain = trace_model(model, (y, mask), {})
    proper = trace_model(
        proper_unobserved(model), (y, mask), {}, condition={"obs_unobserved": plain.nodes["obs_unobserved"]["value"]}
    )
    assert torch.equal(plain.nodes["obs_unobserved"]["mask"], ~mask)
    assert proper.nodes["obs_unobserved"]["mask"] is None
    assert torch.equal(proper.nodes["obs"]["value"], plain.nodes["obs"]["value"])


def improper_chain(data):
    """Pyro's ImproperUniform example: a factor graph over ``xyz`` written as observations."""
    xyz = pyro.sample("xyz", dist.ImproperUniform(constraints.real, (), (3,)))
    x, y, z = xyz.unbind(-1)
    pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)
    pyro.sample("y", dist.Normal(x, 1.0), obs=y)
    pyro.sample("z", dist.Normal(y, 1.0), obs=z)
    pyro.sample("obs", dist.Normal(z, 1.0), obs=data)


# x ~ N(0, 1), y | x ~ N(x, 1), z | y ~ N(y, 1), data | z ~ N(z, 1), data = 1: a Gaussian chain.
IMPROPER_MEAN = torch.tensor([0.25, 0.5, 0.75])
IMPROPER_SD = torch.tensor([0.75, 1.0, 0.75]).sqrt()


@pytest.mark.parametrize("backend", ["vectorized", pytest.param("pyro", marks=pytest.mark.slow)])
def test_run_nuts_samples_an_improper_uniform_site(backend):
    result = run_nuts(
        improper_chain,
        torch.tensor(1.0),
        num_samples=500,
        num_warmup=300,
        num_chains=2,
        backend=backend,
        progress=False,
    )
    draws = result.samples["xyz"].reshape(-1, 3)
    ess = torch.as_tensor(result.summary(var_names=["xyz"])["ess_bulk"].values)
    assert ((draws.mean(0) - IMPROPER_MEAN).abs() < Z * IMPROPER_SD / ess.sqrt()).all()


def test_fit_svi_fits_an_improper_uniform_site():
    # A full-rank Gaussian guide is exact for a Gaussian posterior: its mean reaches the
    # posterior's up to optimisation and Monte Carlo error.
    result = fit_svi(improper_chain, "fullrank", torch.tensor(1.0), num_steps=1500, lr=0.05, progress=False)
    draws = result.sample(4000, seed=0)["xyz"]
    assert ((draws.mean(0) - IMPROPER_MEAN).abs() < 0.1 + Z * IMPROPER_SD / math.sqrt(4000)).all()


def test_unplated_batch_dims_become_event_dims_with_the_same_joint_density():
    from vilab.inference.common.model_handlers import unplated_as_event, unplated_event_dims

    def model(y):
        a = pyro.sample("a", dist.Normal(3.0, 0.5).expand([2]))
        with pyro.plate("groups", 2):
            b = pyro.sample("b", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(a + b, 1.0), obs=y)

    y = torch.tensor([2.5, 3.5])
    trace = trace_model(model, (y,), {})
    assert unplated_event_dims(trace) == {"a": 1}
    assert unplated_event_dims(trace, observed=True) == {"y": 1}
    draw = {name: trace.nodes[name]["value"] for name in ("a", "b")}
    everything = {**unplated_event_dims(trace), **unplated_event_dims(trace, observed=True)}
    handled = trace_model(unplated_as_event(model, everything), (y,), {}, condition=draw)
    assert handled.nodes["a"]["fn"].event_shape == (2,) and handled.nodes["b"]["fn"].batch_shape == (2,)
    assert torch.allclose(handled.log_prob_sum(), trace.log_prob_sum())


def test_run_nuts_samples_a_latent_batched_outside_any_plate_on_the_fast_path():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0).expand([3]))
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = torch.tensor([1.0, 2.0, 0.5])  # mu_i | y_i ~ N(y_i / 2, 1/2)
    result = run_nuts(model, y, num_samples=500, num_warmup=300, num_chains=2, progress=False)
    assert result.config["backend"] == "vectorized"
    draws = result.samples["mu"].reshape(-1, 3)
    ess = torch.as_tensor(result.summary(var_names=["mu"])["ess_bulk"].to_numpy())
    sd = math.sqrt(0.5)
    assert ((draws.mean(0) - y / 2).abs() < Z * sd / ess.sqrt()).all()
    assert ((draws.std(0) - sd).abs() < Z * sd / (2 * ess).sqrt()).all()


def coin_fairness_subsampled(data):
    """Pyro's "SVI Part II": 5 of 10 flips per step, ``data.index_select(0, ind)``."""
    f = pyro.sample("latent_fairness", dist.Beta(10.0, 10.0))
    with pyro.plate("observe_data", size=10, subsample_size=5) as ind:
        pyro.sample("obs", dist.Bernoulli(f), obs=data.index_select(0, ind))


def test_subsampled_draws_are_evaluated_in_batches_not_one_by_one(monkeypatch):
    import vilab.inference.common.tracing as tracing
    import vilab.inference.svi.guide_draws as guide_draws

    def refuse(*args, **kwargs):
        raise AssertionError("draws evaluated one at a time")

    result = fit_svi(
        coin_fairness_subsampled, "meanfield", torch.tensor([1.0] * 6 + [0.0] * 4), num_steps=50, progress=False
    )
    monkeypatch.setattr(tracing, "_loop", refuse)
    monkeypatch.setattr(guide_draws, "_looped", refuse)
    draws = result.draws(300, seed=0)
    assert draws.log_likelihood["obs"].shape == (300, 10)
