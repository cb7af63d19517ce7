r"""Conjugate models whose posterior and log evidence are known in closed form.

These are the yardsticks of the test suite: a guide's moments and ELBO are compared with the
exact posterior and :math:`\log p(x)`, never with the values that generated the data.
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch

from vilab.models.registry import ModelSpec, register_model

__all__ = [
    "normal_normal",
    "normal_normal_posterior",
    "normal_normal_log_evidence",
    "beta_bernoulli",
    "beta_bernoulli_posterior",
    "beta_bernoulli_log_evidence",
    "linear_regression",
    "linear_regression_posterior",
    "linear_regression_log_evidence",
    "default_normal_data",
    "default_bernoulli_data",
    "default_regression_data",
]


def _as_tensor(value, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.get_default_dtype())
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name}: expected finite values; got NaN or inf")
    return tensor


def normal_normal(
    num_obs: int,
    x: Optional[torch.Tensor] = None,
    *,
    prior_loc: float = 0.0,
    prior_scale: float = 1.0,
    obs_scale: float = 1.0,
) -> None:
    r"""Normal mean with known observation scale.

    .. math:: \mu \sim \mathcal N(m_0, s_0^2), \quad x_i \mid \mu \sim \mathcal N(\mu, \sigma^2),
        \ i = 1..N.

    Args:
        num_obs: ``N``.
        x: observations, shape ``(N,)``; ``None`` samples the prior predictive.
        prior_loc, prior_scale: :math:`m_0`, :math:`s_0`.
        obs_scale: :math:`\sigma`.

    The linear predictor is written ``(features * beta).sum(-1)`` so the model also runs with
    a batch of ``beta`` draws under an outer plate.

    Sites: ``loc`` ``()``; ``x`` ``(N,)`` in plate ``data``.
    """
    if x is not None and tuple(x.shape) != (num_obs,):
        raise ValueError(f"x: expected shape ({num_obs},); got {tuple(x.shape)}")
    loc = pyro.sample("loc", dist.Normal(torch.tensor(prior_loc), torch.tensor(prior_scale)))
    with pyro.plate("data", num_obs):
        pyro.sample("x", dist.Normal(loc, obs_scale), obs=x)


def normal_normal_posterior(x, *, prior_loc=0.0, prior_scale=1.0, obs_scale=1.0) -> dict:
    r""":math:`p(\mu \mid x) = \mathcal N(m_N, s_N^2)` with
    :math:`s_N^{-2} = s_0^{-2} + N\sigma^{-2}` and :math:`m_N = s_N^2 (m_0/s_0^2 + \sum x_i/\sigma^2)`."""
    x = _as_tensor(x, "x")
    precision = prior_scale**-2 + x.numel() / obs_scale**2
    loc = (prior_loc / prior_scale**2 + x.sum() / obs_scale**2) / precision
    return {"loc": dist.Normal(loc, precision**-0.5)}


def normal_normal_log_evidence(x, *, prior_loc=0.0, prior_scale=1.0, obs_scale=1.0) -> float:
    r""":math:`\log p(x)` with :math:`x \sim \mathcal N(m_0 \mathbf 1, \sigma^2 I + s_0^2 \mathbf 1 \mathbf 1^\top)`."""
    x = _as_tensor(x, "x")
    n = x.numel()
    cov = obs_scale**2 * torch.eye(n) + prior_scale**2 * torch.ones(n, n)
    return float(dist.MultivariateNormal(torch.full((n,), float(prior_loc)), cov).log_prob(x))


def beta_bernoulli(
    num_obs: int,
    x: Optional[torch.Tensor] = None,
    *,
    concentration1: float = 1.0,
    concentration0: float = 1.0,
) -> None:
    r"""Bernoulli probability with a Beta prior.

    .. math:: p \sim \mathrm{Beta}(a, b), \quad x_i \mid p \sim \mathrm{Bernoulli}(p).

    Sites: ``probs`` ``()`` on (0, 1); ``x`` ``(N,)`` in plate ``data``.
    """
    if x is not None and tuple(x.shape) != (num_obs,):
        raise ValueError(f"x: expected shape ({num_obs},); got {tuple(x.shape)}")
    probs = pyro.sample("probs", dist.Beta(torch.tensor(concentration1), torch.tensor(concentration0)))
    with pyro.plate("data", num_obs):
        pyro.sample("x", dist.Bernoulli(probs), obs=x)


def beta_bernoulli_posterior(x, *, concentration1=1.0, concentration0=1.0) -> dict:
    r""":math:`p(p \mid x) = \mathrm{Beta}(a + k, b + N - k)` with :math:`k = \sum x_i`."""
    x = _as_tensor(x, "x")
    k = x.sum()
    return {"probs": dist.Beta(concentration1 + k, concentration0 + x.numel() - k)}


def beta_bernoulli_log_evidence(x, *, concentration1=1.0, concentration0=1.0) -> float:
    r""":math:`\log p(x) = \log B(a + k, b + N - k) - \log B(a, b)`."""
    x = _as_tensor(x, "x")
    k, n = x.sum(), x.numel()
    a, b = torch.tensor(concentration1), torch.tensor(concentration0)

    def log_beta(p, q):
        return torch.lgamma(p) + torch.lgamma(q) - torch.lgamma(p + q)

    return float(log_beta(a + k, b + n - k) - log_beta(a, b))


def linear_regression(
    features: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    *,
    prior_scale: float = 1.0,
    obs_scale: float = 1.0,
) -> None:
    r"""Bayesian linear regression with known noise.

    .. math:: \beta \sim \mathcal N(0, s^2 I_D), \quad y_n \mid \beta \sim
        \mathcal N(x_n^\top \beta, \sigma^2).

    Args:
        features: design matrix ``X``, shape ``(N, D)``.
        y: responses, shape ``(N,)``; ``None`` samples the prior predictive.

    Sites: ``beta`` ``(D,)`` (one multivariate site, so its posterior correlations are kept);
    ``y`` ``(N,)`` in plate ``data``.
    """
    if features.dim() != 2:
        raise ValueError(f"features: expected shape (N, D); got {tuple(features.shape)}")
    num_obs, num_features = features.shape
    if y is not None and tuple(y.shape) != (num_obs,):
        raise ValueError(f"y: expected shape ({num_obs},); got {tuple(y.shape)}")
    beta = pyro.sample("beta", dist.Normal(torch.zeros(num_features), prior_scale).to_event(1))
    with pyro.plate("data", num_obs):
        pyro.sample("y", dist.Normal((features * beta).sum(-1), obs_scale), obs=y)


def linear_regression_posterior(features, y, *, prior_scale=1.0, obs_scale=1.0) -> dict:
    r""":math:`\Sigma_N = (I/s^2 + X^\top X/\sigma^2)^{-1}`, :math:`m_N = \Sigma_N X^\top y / \sigma^2`."""
    features, y = _as_tensor(features, "features"), _as_tensor(y, "y")
    precision = torch.eye(features.shape[1]) / prior_scale**2 + features.T @ features / obs_scale**2
    cov = torch.linalg.inv(precision)
    loc = cov @ features.T @ y / obs_scale**2
    return {"beta": dist.MultivariateNormal(loc, covariance_matrix=(cov + cov.T) / 2)}


def linear_regression_log_evidence(features, y, *, prior_scale=1.0, obs_scale=1.0) -> float:
    r""":math:`y \sim \mathcal N(0, \sigma^2 I + s^2 X X^\top)`."""
    features, y = _as_tensor(features, "features"), _as_tensor(y, "y")
    cov = obs_scale**2 * torch.eye(len(y)) + prior_scale**2 * features @ features.T
    return float(dist.MultivariateNormal(torch.zeros(len(y)), cov).log_prob(y))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def default_normal_data(num_obs: int = 20, seed: int = 0) -> torch.Tensor:
    """``num_obs`` draws from N(1.5, 1) (fixed seed)."""
    return 1.5 + torch.randn(num_obs, generator=_generator(seed)).to(torch.get_default_dtype())


def default_bernoulli_data(num_obs: int = 30, seed: int = 0) -> torch.Tensor:
    """``num_obs`` coin flips with probability 0.3 (fixed seed)."""
    return (torch.rand(num_obs, generator=_generator(seed)) < 0.3).to(torch.get_default_dtype())


def default_regression_data(num_obs: int = 50, num_features: int = 3, seed: int = 0):
    """Correlated features ``(N, D)`` and responses ``(N,)`` (fixed seed)."""
    g = _generator(seed)
    base = torch.randn(num_obs, num_features, generator=g)
    features = base + 0.8 * base[:, :1]
    beta = torch.linspace(-1.0, 1.0, num_features)
    y = features @ beta + torch.randn(num_obs, generator=g)
    dtype = torch.get_default_dtype()
    return features.to(dtype), y.to(dtype)


def _register() -> None:
    register_model(
        ModelSpec(
            "normal_normal",
            lambda: (normal_normal, (20, default_normal_data()), {}),
            "Normal mean, known variance (closed-form posterior)",
            exact_posterior=lambda: normal_normal_posterior(default_normal_data()),
            log_evidence=lambda: normal_normal_log_evidence(default_normal_data()),
            tags=("conjugate",),
        )
    )
    register_model(
        ModelSpec(
            "beta_bernoulli",
            lambda: (beta_bernoulli, (30, default_bernoulli_data()), {}),
            "Bernoulli probability, Beta prior (closed-form posterior)",
            exact_posterior=lambda: beta_bernoulli_posterior(default_bernoulli_data()),
            log_evidence=lambda: beta_bernoulli_log_evidence(default_bernoulli_data()),
            tags=("conjugate",),
        )
    )
    register_model(
        ModelSpec(
            "linear_regression",
            lambda: (linear_regression, default_regression_data(), {}),
            "Bayesian linear regression, known noise (closed-form posterior)",
            exact_posterior=lambda: linear_regression_posterior(*default_regression_data()),
            log_evidence=lambda: linear_regression_log_evidence(*default_regression_data()),
            tags=("conjugate",),
        )
    )


_register()
