"""evaluate_draws: the batched evaluation is checked against single traces and falls back."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from vilab.inference.common import tracing
from vilab.inference.common.tracing import evaluate_draws


def _plated_model(y):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0), 1.0))
    with pyro.plate("data", len(y)):
        pyro.deterministic("shifted", mu + torch.arange(len(y)))
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_vectorised_evaluation_matches_single_traces():
    y = torch.tensor([0.1, -0.4, 1.2])
    draws = {"mu": torch.tensor([0.0, 1.0, -2.0])}
    batched = evaluate_draws(_plated_model, (y,), {}, draws)
    looped = evaluate_draws(_plated_model, (y,), {}, draws, vectorize=False)
    assert torch.allclose(batched["log_joint"], looped["log_joint"])
    assert batched["values"]["shifted"].shape == (3, 3)
    assert torch.allclose(batched["values"]["shifted"][2], torch.tensor([-2.0, -1.0, 0.0]))
    assert batched["log_likelihood"]["y"].shape == (3, 3)
    expected = dist.Normal(draws["mu"][:, None], 1.0).log_prob(y)
    assert torch.allclose(batched["log_likelihood"]["y"], expected)


def test_a_model_that_mixes_draws_under_a_plate_is_vmapped_without_a_warning_and_stays_right():
    def model():  # sums over a latent vector without an event dim: batching would mix draws
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.factor("coupling", -0.5 * z.sum() ** 2)

    draws = {"z": torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = evaluate_draws(model, (), {}, draws)
    expected = dist.Normal(torch.zeros(2), 1.0).log_prob(draws["z"]).sum(-1) - 0.5 * draws["z"].sum(-1) ** 2
    assert torch.allclose(result["log_joint"], expected)


def test_python_control_flow_on_a_draw_falls_back_to_one_by_one_with_a_warning_and_stays_right():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("branch", -z if z > 0 else z)  # neither a draw plate nor vmap can batch this

    draws = {"z": torch.tensor([-1.0, 0.5, 2.0])}
    with pytest.warns(RuntimeWarning, match="not vectorisable over draws"):
        result = evaluate_draws(model, (), {}, draws)
    expected = dist.Normal(0.0, 1.0).log_prob(draws["z"]) - draws["z"].abs()
    assert torch.allclose(result["log_joint"], expected)


def test_no_draws_is_a_clear_error():
    with pytest.raises(ValueError, match="draws: expected at least one latent site"):
        evaluate_draws(_plated_model, (torch.zeros(2),), {}, {})


def _hierarchical_logistic(x, group, y=None):
    """Hierarchical logistic regression with per-group coefficients ``beta[..., g, :]`` and an
    intercept written ``alpha.unsqueeze(-1)``: right for one draw, but under an outer plate of
    ``S`` draws ``alpha`` is ``(S, 1)``, the unsqueeze makes it ``(S, 1, 1)``, and the logits
    broadcast to ``(S, S, N)``, quadratic in the number of draws."""
    num_groups, num_features = int(group.max()) + 1, x.shape[-1]
    alpha = pyro.sample("alpha", dist.Normal(0.0, 1.0))
    mu = pyro.sample("mu", dist.Normal(torch.zeros(num_features), 1.0).to_event(1))
    with pyro.plate("groups", num_groups):
        beta = pyro.sample("beta", dist.Normal(mu, 1.0).to_event(1))
    logits = alpha.unsqueeze(-1) + (beta[..., group, :] * x).sum(-1)
    with pyro.plate("data", len(group)):
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def _logistic_draws(num_draws, num_groups=4, num_features=3):
    generator = torch.Generator().manual_seed(0)
    return {
        "alpha": torch.randn(num_draws, generator=generator),
        "mu": torch.randn(num_draws, num_features, generator=generator),
        "beta": torch.randn(num_draws, num_groups, num_features, generator=generator),
    }


def _logistic_data(num_obs=30, num_groups=4, num_features=3):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(num_obs, num_features, generator=generator)
    group = torch.arange(num_obs) % num_groups
    return x, group, (torch.rand(num_obs, generator=generator) < 0.5).double()


def _recording(monkeypatch):
    sizes = []
    original = tracing._vectorized

    def spy(model, args, kwargs, draws, num_draws, template):
        sizes.append(num_draws)
        return original(model, args, kwargs, draws, num_draws, template)

    monkeypatch.setattr(tracing, "_vectorized", spy)
    return sizes


def test_a_model_that_broadcasts_wrongly_is_caught_by_the_two_draw_probe_then_vmapped(monkeypatch):
    sizes = _recording(monkeypatch)
    x, group, y = _logistic_data()
    draws = _logistic_draws(200)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # vmap runs it: no fallback to one by one
        result = evaluate_draws(_hierarchical_logistic, (x, group, y), {}, draws)
    # One plate probe of two draws, never a (200, 200, ...) tensor; then vmap, draw by draw shapes.
    assert sizes == [2]
    looped = evaluate_draws(_hierarchical_logistic, (x, group, y), {}, draws, vectorize=False)
    assert torch.allclose(result["log_joint"], looped["log_joint"])


def test_draws_are_evaluated_in_chunks_within_the_element_bound(monkeypatch):
    sizes = _recording(monkeypatch)
    y = torch.randn(50)
    draws = {"mu": torch.randn(301)}
    result = evaluate_draws(_plated_model, (y,), {}, draws, max_elements=1000)
    # Largest site tensor of one draw: 50 numbers, so 1000 // 50 = 20 draws a chunk.
    assert sizes[0] == 2 and max(sizes) == 20 and sum(sizes) == 301
    assert all(size * 50 <= 1000 for size in sizes)
    whole = evaluate_draws(_plated_model, (y,), {}, draws, max_elements=10**9)
    assert torch.allclose(result["log_joint"], whole["log_joint"])
    assert torch.allclose(result["log_likelihood"]["y"], whole["log_likelihood"]["y"])
    assert torch.allclose(result["values"]["shifted"], whole["values"]["shifted"])
