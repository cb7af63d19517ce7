"""``run_nuts``'s vectorized and Pyro backends agree with each other and with a closed-form posterior.

Model: ``loc ~ N(0, 2^2)``, ``obs_i ~ N(loc, 1)``, so ``loc | obs ~ N(sum(obs) / (1/4 + n), 1 / (1/4 + n))``.
Tolerances are z times the Monte Carlo standard error from ArviZ's bulk ESS: a mean is within
``z * sd / sqrt(ESS)`` of the exact one, the two backends' means within
``z * sd * sqrt(1/ESS_1 + 1/ESS_2)`` of each other, an sd within ``z * sd / sqrt(2 ESS)``. Six
comparisons with z = 4 (two-sided 6e-5 each) keep the module's false-failure rate below 1e-3.
"""

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from vilab.inference.engine.processes.chains import cannot_fork
from vilab.inference import run_nuts

Z = 4.0
DATA = torch.tensor([0.3, 1.9, 1.1, 0.4, 2.2, 1.0, 0.7, 1.6])
PRECISION = 1 / 2.0**2 + DATA.shape[0]
EXACT_MEAN, EXACT_SD = DATA.sum().item() / PRECISION, PRECISION**-0.5


def normal_normal(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)


@pytest.fixture(scope="module")
def runs():
    options = dict(num_samples=200, num_warmup=200, num_chains=2, seed=0, progress=False)
    vectorized = run_nuts(normal_normal, DATA.double(), backend="vectorized", **options)
    reference = run_nuts(normal_normal, DATA.double(), backend="pyro", chain_method="sequential", **options)
    return {"vectorized": vectorized, "pyro": reference}


def _moments(result) -> tuple[float, float, float]:
    draws = np.asarray(result.samples["loc"])
    return float(draws.mean()), float(draws.std(ddof=1)), float(az.ess(draws, method="bulk"))


@pytest.mark.parametrize("backend", ["vectorized", "pyro"])
def test_backend_matches_closed_form_posterior(runs, backend):
    result = runs[backend]
    assert result.config["backend"] == backend
    mean, sd, ess = _moments(result)
    assert ess > 50  # mixing at all; the tolerances below scale with the ESS itself
    assert abs(mean - EXACT_MEAN) < Z * EXACT_SD / ess**0.5
    assert abs(sd - EXACT_SD) < Z * EXACT_SD / (2 * ess) ** 0.5


def test_vectorized_and_pyro_backends_agree_with_each_other(runs):
    mean_v, sd_v, ess_v = _moments(runs["vectorized"])
    mean_p, sd_p, ess_p = _moments(runs["pyro"])
    assert abs(mean_v - mean_p) < Z * EXACT_SD * (1 / ess_v + 1 / ess_p) ** 0.5
    assert abs(sd_v - sd_p) < Z * EXACT_SD * (1 / (2 * ess_v) + 1 / (2 * ess_p)) ** 0.5


def test_both_backends_report_the_same_sample_stats_to_arviz(runs):
    stats = {name: set(result.sample_stats) for name, result in runs.items()}
    assert stats["vectorized"] == stats["pyro"]
    for result in runs.values():
        assert result.inference_data.sample_stats["diverging"].shape == (2, 200)
        assert np.all(az.bfmi(result.inference_data) > 0.3)


@pytest.mark.skipif(bool(cannot_fork()), reason=f"needs forked workers: {cannot_fork()}")
def test_chain_method_splits_the_vectorized_chains_or_keeps_them_in_this_process(monkeypatch):
    from vilab.inference.engine.processes import workers as fast_workers

    monkeypatch.setattr(fast_workers, "cores", lambda: 2)
    options = dict(num_samples=20, num_warmup=20, num_chains=2, seed=0, progress=False, backend="vectorized")
    parallel = run_nuts(normal_normal, DATA.double(), chain_method="parallel", **options)
    sequential = run_nuts(normal_normal, DATA.double(), chain_method="sequential", **options)
    assert parallel.config["workers"] == 2
    assert "chains split over 2 processes (1 + 1)" in parallel.config["fuse_decision"]
    assert sequential.config["workers"] == 1 and "split" not in sequential.config["fuse_decision"]
    assert parallel.inference_data.posterior["loc"].shape == sequential.inference_data.posterior["loc"].shape == (2, 20)
