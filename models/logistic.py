r"""Bayesian logistic regression on scikit-learn's breast-cancer data (standardised)."""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch

from vilab.models.registry import ModelSpec, register_model

__all__ = ["logistic_regression", "breast_cancer_data"]


def logistic_regression(features: torch.Tensor, y: Optional[torch.Tensor] = None, *, prior_scale: float = 1.0) -> None:
    r""".. math:: \alpha \sim \mathcal N(0, 5^2),\ \beta \sim \mathcal N(0, s^2 I_D),\
        y_n \sim \mathrm{Bernoulli}(\mathrm{logit}^{-1}(\alpha + x_n^\top \beta)).

    Args:
        features: ``(N, D)`` standardised design matrix.
        y: ``(N,)`` labels in {0, 1}; ``None`` for the prior predictive.

    The linear predictor is written ``(features * beta).sum(-1)`` so the model also runs with
    a batch of ``beta`` draws under an outer plate.

    Sites: ``alpha`` ``()``, ``beta`` ``(D,)``, ``y`` ``(N,)`` in plate ``data``.
    """
    if features.dim() != 2:
        raise ValueError(f"features: expected shape (N, D); got {tuple(features.shape)}")
    num_obs, num_features = features.shape
    if y is not None and tuple(y.shape) != (num_obs,):
        raise ValueError(f"y: expected shape ({num_obs},); got {tuple(y.shape)}")
    alpha = pyro.sample("alpha", dist.Normal(features.new_tensor(0.0), 5.0))
    beta = pyro.sample("beta", dist.Normal(features.new_zeros(num_features), prior_scale).to_event(1))
    with pyro.plate("data", num_obs):
        pyro.sample("y", dist.Bernoulli(logits=alpha + (features * beta).sum(-1)), obs=y)


def breast_cancer_data() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's breast-cancer set: ``(569, 30)`` standardised features and 0/1 labels."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    dtype = torch.get_default_dtype()
    features = torch.as_tensor(data.data, dtype=dtype)
    features = (features - features.mean(0)) / features.std(0)
    return features, torch.as_tensor(data.target, dtype=dtype)


register_model(
    ModelSpec(
        "logistic_regression",
        lambda: (logistic_regression, breast_cancer_data(), {}),
        "Bayesian logistic regression, breast cancer (569 x 30)",
        tags=("regression",),
    )
)
