"""evaluate_draws: the batched evaluation is checked against single traces and falls back."""
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from vilab.inference.tracing import evaluate_draws


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
