"""Vectorized multi-chain NUTS: closed-form posteriors, diagnostics, and refusal of models that do
not broadcast over chains. Tolerances are z * (Monte Carlo standard error) with z = 4.5 for a
failure budget of about 1e-5 per comparison."""

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from vilab.inference.nuts.adaptation import DualAveraging, Welford, adaptation_windows
from vilab.inference.engine.api import engine_off
from vilab.inference.engine.step import checkpoint_masks
from vilab.inference.nuts.sampler import VectorizedNutsResult, sample_vectorized_nuts
from vilab.inference.engine.potential import BatchedPotential, VectorizationError

Z = 4.5
STAT_KEYS = {"diverging", "energy", "tree_depth", "n_steps", "step_size", "acceptance_rate", "lp"}


def normal_normal(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
    pyro.deterministic("loc_squared", loc**2)
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)


def gamma_poisson(counts):
    rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
    with pyro.plate("data", counts.shape[0]):
        pyro.sample("obs", dist.Poisson(rate), obs=counts)


def correlated_gaussian(covariance):
    pyro.sample("x", dist.MultivariateNormal(torch.tensor([1.0, -1.0]), covariance))


def _ess(draws: torch.Tensor) -> np.ndarray:
    return np.asarray(az.ess(draws.numpy()))


def _assert_moments(draws: torch.Tensor, mean: float, sd: float) -> None:
    """Mean within Z * sd / sqrt(ESS); sd within Z * sd / sqrt(2 ESS) (normal approximation)."""
    ess = float(_ess(draws))
    assert ess > 100
    assert abs(draws.mean().item() - mean) < Z * sd / ess**0.5
    assert abs(draws.std().item() - sd) < Z * sd / (2 * ess) ** 0.5


@pytest.fixture(scope="module")
def normal_run():
    torch.set_default_dtype(torch.float64)
    data = torch.tensor([0.3, 1.9, 1.1, 0.4, 2.2, 1.0, 0.7, 1.6])
    result = sample_vectorized_nuts(
        normal_normal, (data,), {}, num_samples=400, num_warmup=300, num_chains=4, seed=1, progress=False
    )
    return data, result


def test_normal_normal_matches_closed_form_posterior(normal_run):
    data, result = normal_run
    precision = 1 / 2.0**2 + data.shape[0]
    _assert_moments(result.samples["loc"], data.sum().item() / precision, precision**-0.5)


def test_deterministic_sites_are_returned_per_draw(normal_run):
    _, result = normal_run
    assert torch.allclose(result.samples["loc_squared"], result.samples["loc"] ** 2)


def test_sample_stats_have_every_key_with_chain_draw_shape(normal_run):
    _, result = normal_run
    assert isinstance(result, VectorizedNutsResult)
    assert set(result.sample_stats) == STAT_KEYS
    for value in result.sample_stats.values():
        assert value.shape == (4, 400)
    assert result.sample_stats["diverging"].dtype == torch.bool
    assert (result.sample_stats["n_steps"] <= 2 ** result.sample_stats["tree_depth"]).all()
    assert 0.6 < result.sample_stats["acceptance_rate"].mean().item() < 0.97


def test_sample_stats_reach_arviz_and_bfmi_is_computed(normal_run):
    _, result = normal_run
    idata = az.from_dict(
        posterior={k: v.numpy() for k, v in result.samples.items()},
        sample_stats={k: v.numpy() for k, v in result.sample_stats.items()},
    )
    bfmi = az.bfmi(idata)
    assert bfmi.shape == (4,) and np.all(bfmi > 0.3)


def test_constrained_site_matches_gamma_poisson_posterior():
    counts = torch.tensor([3.0, 5.0, 2.0, 4.0, 6.0])
    result = sample_vectorized_nuts(
        gamma_poisson, (counts,), {}, num_samples=400, num_warmup=300, num_chains=4, seed=2, progress=False
    )
    shape, rate = 2.0 + counts.sum().item(), 1.0 + counts.shape[0]
    assert (result.samples["rate"] > 0).all()
    _assert_moments(result.samples["rate"], shape / rate, shape**0.5 / rate)


def test_dense_mass_matrix_recovers_correlated_gaussian():
    covariance = torch.tensor([[1.0, 0.95], [0.95, 1.0]])
    result = sample_vectorized_nuts(
        correlated_gaussian,
        (covariance,),
        {},
        num_samples=400,
        num_warmup=300,
        num_chains=4,
        dense_mass=True,
        seed=3,
        progress=False,
    )
    draws = result.samples["x"]
    assert result.inverse_mass_matrix.shape == (4, 2, 2)
    # The dense leaf's batched matmul over checkpoints needs its contiguous copy kept when the
    # graph is simplified; without it the leaf silently ran eagerly, 5-8x slower. (With the
    # engine off nothing is traced: the moments below are what this run vouches for.)
    assert result.compiled != engine_off()
    for i, mean in enumerate((1.0, -1.0)):
        _assert_moments(draws[..., i], mean, 1.0)
    correlation = np.corrcoef(draws.reshape(-1, 2).T.numpy())[0, 1]
    assert abs(correlation - 0.95) < 0.02


def test_matrix_algebra_without_plates_runs_under_vmap_and_matches_unbatched():
    design = torch.tensor([[1.0, 0.5], [1.0, -0.3], [1.0, 2.0]])

    def regression(y):  # written for one chain: design @ beta does not broadcast over chains
        beta = pyro.sample("beta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(design @ beta, 1.0).to_event(1), obs=y)

    potential = BatchedPotential(regression, (torch.ones(3),), {}, num_chains=4)
    assert potential.mode == "vmap" and potential.compiled
    _assert_matches_single_chain(potential, torch.randn(4, 2))


def test_a_model_that_reads_its_data_with_numpy_runs_under_vmap():
    group = torch.tensor([0, 1, 1, 2, 0])

    def varying_intercepts(y):  # NumPyro's ucbadmit example counts its groups with np.unique
        num_groups = len(np.unique(group))
        z = pyro.sample("z", dist.Normal(torch.zeros((num_groups, 2)), 1.0))
        loc = torch.matmul(torch.eye(2), z.T).T  # z.T reverses a chain plate's dims too
        pyro.sample("y", dist.Normal(loc[group, 0], 1.0).to_event(1), obs=y)

    potential = BatchedPotential(varying_intercepts, (torch.ones(5),), {}, num_chains=3)
    assert potential.mode == "vmap"
    _assert_matches_single_chain(potential, torch.randn(3, 6))


def _assert_matches_single_chain(potential, z):
    value, grad = potential(z)
    for chain in range(z.shape[0]):
        expected, expected_grad = potential.single_chain_value_and_grad(z[chain])
        assert torch.allclose(value[chain], expected) and torch.allclose(grad[chain], expected_grad)


def test_cholesky_of_a_kernel_from_scalar_hyperparameters_runs_under_vmap():
    x = torch.linspace(-2.0, 2.0, 6)

    def gp(y):  # as GP tutorials write it: a kernel matrix from scalar draws, then a Cholesky
        length = pyro.sample("length", dist.LogNormal(0.0, 1.0))
        noise = pyro.sample("noise", dist.HalfNormal(1.0))
        kernel = torch.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / length**2) + noise**2 * torch.eye(6)
        pyro.sample("y", dist.MultivariateNormal(torch.zeros(6), scale_tril=torch.linalg.cholesky(kernel)), obs=y)

    potential = BatchedPotential(gp, (torch.sin(x),), {}, num_chains=3)
    assert potential.mode == "vmap"
    _assert_matches_single_chain(potential, torch.randn(3, 2))


def test_python_control_flow_on_latents_is_refused():
    def branching(y):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        scale = 1.0 if loc > 0 else 2.0
        pyro.sample("y", dist.Normal(loc, scale), obs=y)

    with pytest.raises(VectorizationError, match="batch of chains"):
        BatchedPotential(branching, (torch.tensor(0.5),), {}, num_chains=4)


def test_model_mixing_chains_under_the_plate_is_run_per_chain_not_silently_wrong():
    def summed(y):
        loc = pyro.sample("loc", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(loc.sum(), 1.0), obs=y)  # under a chain plate: sums over chains too

    potential = BatchedPotential(summed, (torch.tensor(0.5),), {}, num_chains=4)
    assert potential.mode == "vmap"
    _assert_matches_single_chain(potential, torch.randn(4, 3))


def test_deterministic_sites_of_a_vmapped_model_are_per_chain():
    def model(y):
        loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        total = pyro.deterministic("total", loc.sum())
        pyro.sample("y", dist.Normal(total, 1.0), obs=y)

    potential = BatchedPotential(model, (torch.tensor(0.5),), {}, num_chains=3)
    z = torch.randn(3, 2)
    assert potential.mode == "vmap"
    assert torch.allclose(potential.deterministic(z)["total"], z.sum(-1))


def test_matrix_algebra_that_broadcasts_is_accepted_and_matches_unbatched():
    design = torch.tensor([[1.0, 0.5], [1.0, -0.3], [1.0, 2.0]])

    def regression(y):
        beta = pyro.sample("beta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("y", dist.Normal((beta.unsqueeze(-2) @ design.T).squeeze(-2), 1.0).to_event(1), obs=y)

    potential = BatchedPotential(regression, (torch.ones(3),), {}, num_chains=3)
    z = torch.randn(3, 2)
    value, grad = potential(z)
    for chain in range(3):
        expected, expected_grad = potential.single_chain_value_and_grad(z[chain])
        assert torch.allclose(value[chain], expected) and torch.allclose(grad[chain], expected_grad)


def test_discrete_latent_site_is_refused():
    def discrete():
        pyro.sample("k", dist.Bernoulli(0.5))

    with pytest.raises(VectorizationError, match="discrete"):
        BatchedPotential(discrete, (), {})


@pytest.mark.parametrize(
    "argument, value, message",
    [
        ("num_samples", 0, "num_samples"),
        ("num_chains", 0, "num_chains"),
        ("target_accept", 1.5, "target_accept"),
        ("max_tree_depth", 0, "max_tree_depth"),
    ],
)
def test_invalid_arguments_name_the_argument(argument, value, message):
    options = dict(num_samples=10, num_warmup=10, num_chains=2)
    options[argument] = value
    with pytest.raises(ValueError, match=message):
        sample_vectorized_nuts(normal_normal, (torch.zeros(2),), {}, progress=False, **options)


def test_adaptation_windows_follow_stan_for_1000_iterations():
    assert adaptation_windows(1000) == [(0, 74), (75, 99), (100, 149), (150, 249), (250, 449), (450, 949), (950, 999)]


def test_checkpoint_masks_close_the_balanced_subtrees_at_each_leaf():
    write, check = checkpoint_masks(6, 10)  # 0b110: opens a subtree, closes none
    assert write[2].item() and not check.any()
    write, check = checkpoint_masks(7, 10)  # 0b111: closes subtrees of size 2, 4 and 8
    assert not write.any() and check.squeeze(-1).nonzero().flatten().tolist() == [0, 1, 2]


def test_welford_matches_sample_covariance():
    draws = torch.randn(50, 3, 2) @ torch.tensor([[1.0, 0.5], [0.0, 2.0]])
    welford = Welford(3, 2, dense=True, dtype=draws.dtype)
    for row in draws:
        welford.update(row)
    for chain in range(3):
        assert torch.allclose(welford.m2[chain] / 49, torch.cov(draws[:, chain].T))


def test_dual_averaging_reaches_the_target_acceptance():
    # Acceptance falls with the step size as exp(-step): the target 0.8 is at step = -log(0.8).
    averaging = DualAveraging(torch.tensor([1.0]), target_accept=0.8)
    step = torch.tensor([1.0])
    for _ in range(2000):
        step = averaging.update(torch.exp(-step))
    assert torch.allclose(averaging.final_step_size(), torch.tensor([-np.log(0.8)]), rtol=0.05)
