"""Regression models as Pyro's tutorials, NumPyro's examples and Stan's User's Guide write them.

Each function is the source's model with ``numpyro``/``jnp`` read as ``pyro``/``torch`` where the
source is NumPyro, and Stan's sampling statements written as Pyro sites where it is Stan.
Flat (unwritten) Stan priors are ``dist.ImproperUniform``, the literal translation.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroSample
from torch import nn

__all__ = [
    "coin_fairness",
    "coin_fairness_subsampled",
    "scale",
    "conditioned_scale",
    "make_docstring_logistic",
    "BayesianRegression",
    "rugged_model",
    "kline_poisson",
    "kline_gamma_poisson",
    "robust_regression",
    "ordered_logistic",
    "horseshoe_normal",
    "poll_dirichlet_multinomial",
]


def coin_fairness(data):
    """Pyro, "SVI Part I": a Beta(10, 10) prior on a coin's fairness, one site per flip."""
    # define the hyperparameters that control the Beta prior
    alpha0 = torch.tensor(10.0)
    beta0 = torch.tensor(10.0)
    # sample f from the Beta prior
    f = pyro.sample("latent_fairness", dist.Beta(alpha0, beta0))
    # loop over the observed data
    for i in range(len(data)):
        # observe datapoint i using the Bernoulli likelihood
        pyro.sample("obs_{}".format(i), dist.Bernoulli(f), obs=data[i])


def coin_fairness_subsampled(data):
    """Pyro, "SVI Part II": the same model with a subsampled plate (5 of 10 flips per step)."""
    alpha0 = torch.tensor(10.0)
    beta0 = torch.tensor(10.0)
    f = pyro.sample("latent_fairness", dist.Beta(alpha0, beta0))
    with pyro.plate("observe_data", size=10, subsample_size=5) as ind:
        pyro.sample("obs", dist.Bernoulli(f), obs=data.index_select(0, ind))


def scale(guess):
    """Pyro, "Introduction to Pyro" (inference part): a noisy scale."""
    weight = pyro.sample("weight", dist.Normal(guess, 1.0))
    return pyro.sample("measurement", dist.Normal(weight, 0.75))


conditioned_scale = pyro.condition(scale, data={"measurement": torch.tensor(9.5)})


def make_docstring_logistic(labels):
    """Pyro's ``MCMC``/``NUTS`` docstring: logistic regression on three coefficients.

    The docstring's model reads ``labels`` and ``dim`` from the enclosing scope; this factory
    gives it that scope.
    """
    dim = 3

    def model(data):
        coefs_mean = torch.zeros(dim)
        coefs = pyro.sample("beta", dist.Normal(coefs_mean, torch.ones(3)))
        y = pyro.sample("y", dist.Bernoulli(logits=(coefs * data).sum(-1)), obs=labels)
        return y

    return model


class BayesianRegression(PyroModule):
    """Pyro, "Bayesian Regression - Introduction (Part 1)": ``PyroModule[nn.Linear]`` with
    ``PyroSample`` priors on its weight and bias."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear = PyroModule[nn.Linear](in_features, out_features)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([out_features, in_features]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([out_features]).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            obs = pyro.sample("obs", dist.Normal(mean, sigma), obs=y)  # noqa: F841 -- as the tutorial writes it
        return mean


def rugged_model(is_cont_africa, ruggedness, log_gdp=None):
    """Pyro, "Bayesian Regression - Inference Algorithms (Part 2)"."""
    a = pyro.sample("a", dist.Normal(0.0, 10.0))
    b_a = pyro.sample("bA", dist.Normal(0.0, 1.0))
    b_r = pyro.sample("bR", dist.Normal(0.0, 1.0))
    b_ar = pyro.sample("bAR", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
    mean = a + b_a * is_cont_africa + b_r * ruggedness + b_ar * is_cont_africa * ruggedness
    with pyro.plate("data", len(ruggedness)):
        return pyro.sample("obs", dist.Normal(mean, sigma), obs=log_gdp)


def kline_poisson(cid, P, T):
    """Statistical Rethinking m11.10 in NumPyro: Poisson tools, ``a[cid] + b[cid] * P``."""
    a = pyro.sample("a", dist.Normal(3, 0.5).expand([2]))
    b = pyro.sample("b", dist.Normal(0, 0.2).expand([2]))
    lambda_ = torch.exp(a[cid] + b[cid] * P)
    pyro.sample("T", dist.Poisson(lambda_), obs=T)


def kline_gamma_poisson(T, P, cid):
    """Statistical Rethinking m12.2 in NumPyro: gamma-Poisson (negative binomial) tools."""
    a = pyro.sample("a", dist.Normal(1, 1).expand([2]))
    b = pyro.sample("b", dist.Exponential(1).expand([2]))
    g = pyro.sample("g", dist.Exponential(1))
    phi = pyro.sample("phi", dist.Exponential(1))
    lambda_ = torch.exp(a[cid]) * torch.pow(P, b[cid]) / g
    pyro.sample("T", dist.GammaPoisson(lambda_ / phi, 1 / phi), obs=T)


def robust_regression(x, y, nu):
    """Stan User's Guide, "Robust noise models": ``y ~ student_t(nu, alpha + beta * x, sigma)``,
    ``nu`` data, no priors written (flat)."""
    alpha = pyro.sample("alpha", dist.ImproperUniform(constraints.real, (), ()))
    beta = pyro.sample("beta", dist.ImproperUniform(constraints.real, (), ()))
    sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    with pyro.plate("N", len(x)):
        pyro.sample("y", dist.StudentT(nu, alpha + beta * x, sigma), obs=y)


def ordered_logistic(x, y, K):
    """Stan User's Guide, "Ordered logistic and probit regression": flat ``beta`` and an
    ordered vector of cutpoints ``c``."""
    D = x.shape[1]
    beta = pyro.sample("beta", dist.ImproperUniform(constraints.real_vector, (), (D,)))
    c = pyro.sample("c", dist.ImproperUniform(constraints.ordered_vector, (), (K - 1,)))
    with pyro.plate("N", len(y)):
        pyro.sample("y", dist.OrderedLogistic(x @ beta, c), obs=y)


def horseshoe_normal(X, Y):
    """NumPyro's horseshoe regression (``model_normal_likelihood``), with a
    ``deterministic`` site for the scaled coefficients."""
    D_X = X.shape[1]
    # sample from horseshoe prior
    lambdas = pyro.sample("lambdas", dist.HalfCauchy(torch.ones(D_X)))
    tau = pyro.sample("tau", dist.HalfCauchy(torch.ones(1)))
    unscaled_betas = pyro.sample("unscaled_betas", dist.Normal(0.0, torch.ones(D_X)))
    scaled_betas = pyro.deterministic("betas", tau * lambdas * unscaled_betas)
    # compute mean function using linear coefficients
    mean_function = torch.matmul(X, scaled_betas)
    prec_obs = pyro.sample("prec_obs", dist.Gamma(3.0, 1.0))
    sigma_obs = 1.0 / torch.sqrt(prec_obs)
    # observe data
    pyro.sample("Y", dist.Normal(mean_function, sigma_obs), obs=Y)


def poll_dirichlet_multinomial(counts):
    """BDA3 section 3.4: a multinomial poll with a uniform Dirichlet prior on the shares."""
    theta = pyro.sample("theta", dist.Dirichlet(torch.ones(3)))
    pyro.sample("counts", dist.Multinomial(int(counts.sum()), theta), obs=counts)
