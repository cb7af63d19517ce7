"""Simulation-based calibration of the vectorized NUTS (Talts et al. 2018, arXiv:1804.06788).

Each model holds ``NUM_SIMULATIONS`` independent replicates in a plate, so one NUTS run samples all
replicates' posteriors at once (the joint posterior factorises). For each replicate the rank of the
prior draw among ``NUM_RANK_DRAWS`` thinned posterior draws is uniform on ``0..NUM_RANK_DRAWS``
when the sampler is right. Ranks are pooled into ``NUM_BINS`` bins and tested with a chi-square
test at level 1e-3 per model and kernel (the virtual machine, what ``compiler="auto"`` starts
on, and Inductor's fused kernel, what it switches to): failure budget 4e-3 for the module.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats

from vilab.inference.nuts.sampler import sample_vectorized_nuts

pytestmark = pytest.mark.slow

NUM_SIMULATIONS, NUM_OBSERVATIONS, NUM_RANK_DRAWS, NUM_BINS = 200, 5, 99, 10
LEVEL = 1e-3


def normal_replicates(data):
    with pyro.plate("simulations", NUM_SIMULATIONS, dim=-2):
        loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
        with pyro.plate("observations", NUM_OBSERVATIONS, dim=-1):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)


def gamma_poisson_replicates(data):
    with pyro.plate("simulations", NUM_SIMULATIONS, dim=-2):
        rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
        with pyro.plate("observations", NUM_OBSERVATIONS, dim=-1):
            pyro.sample("obs", dist.Poisson(rate), obs=data)


def _simulate(model, site, seed):
    torch.manual_seed(seed)
    trace = pyro.poutine.trace(model).get_trace(None)
    return trace.nodes[site]["value"].detach(), trace.nodes["obs"]["value"].detach()


@pytest.mark.engine_path  # it vouches for each kernel by name
@pytest.mark.parametrize("kernel", ["vm", "inductor"])
@pytest.mark.parametrize("model, site", [(normal_replicates, "loc"), (gamma_poisson_replicates, "rate")])
def test_sbc_rank_statistics_are_uniform(model, site, kernel):
    truth, data = _simulate(model, site, seed=11)
    result = sample_vectorized_nuts(
        model, (data,), {}, num_samples=500, num_warmup=500, num_chains=4, seed=12, progress=False, compiler=kernel
    )
    assert result.backend == kernel, result.fuse_decision
    draws = result.samples[site].reshape(-1, NUM_SIMULATIONS)  # (chain * draw, simulation)
    # Thin to nearly independent draws, as SBC's uniformity holds for independent posterior draws.
    step = draws.shape[0] // NUM_RANK_DRAWS
    thinned = draws[::step][:NUM_RANK_DRAWS]
    ranks = (thinned < truth.reshape(1, -1)).sum(0)
    counts = torch.bincount(ranks * NUM_BINS // (NUM_RANK_DRAWS + 1), minlength=NUM_BINS)
    assert counts.sum().item() == NUM_SIMULATIONS
    p_value = stats.chisquare(counts.numpy()).pvalue
    assert p_value > LEVEL, f"ranks not uniform: counts {counts.tolist()}, p = {p_value:.2e}"
