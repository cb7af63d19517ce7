"""Time series: NumPyro's AR2 example (the unrolled loop), its stochastic-volatility example,
and the Stan User's Guide's missing-data model written with Pyro's ``obs_mask``."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch.distributions.transforms import Transform

__all__ = ["ar2_for_loop", "CumsumTransform", "stochastic_volatility", "missing_normal", "bnn_model"]


def ar2_for_loop(y):
    """NumPyro's AR2 example, ``ar2_for_loop``: one observed site per time step."""
    alpha_1 = pyro.sample("alpha_1", dist.Normal(0, 1))
    alpha_2 = pyro.sample("alpha_2", dist.Normal(0, 1))
    const = pyro.sample("const", dist.Normal(0, 1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1))

    y_prev = y[1]
    y_prev_prev = y[0]

    for i in range(2, len(y)):
        m_t = const + alpha_1 * y_prev + alpha_2 * y_prev_prev
        y_t = pyro.sample("y_{}".format(i), dist.Normal(m_t, sigma), obs=y[i])
        y_prev_prev = y_prev
        y_prev = y_t


class CumsumTransform(Transform):
    """Cumulative sum over the last dimension (Pyro has no ``GaussianRandomWalk``; a user
    porting NumPyro's writes its random walk as cumulated normal steps)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def _call(self, x):
        return x.cumsum(-1)

    def _inverse(self, y):
        return torch.cat([y[..., :1], y[..., 1:] - y[..., :-1]], dim=-1)

    def log_abs_det_jacobian(self, x, y):
        return torch.zeros(x.shape[:-1], dtype=x.dtype)


def stochastic_volatility(returns):
    """NumPyro's stochastic-volatility example: a log-volatility random walk ``s`` with
    Student-t returns."""
    step_size = pyro.sample("sigma", dist.Exponential(50.0))
    s = pyro.sample(
        "s",
        dist.TransformedDistribution(
            dist.Normal(0.0, step_size).expand([returns.shape[0]]).to_event(1), [CumsumTransform()]
        ),
    )
    nu = pyro.sample("nu", dist.Exponential(0.1))
    return pyro.sample("r", dist.StudentT(df=nu, loc=0.0, scale=torch.exp(s)), obs=returns)


def missing_normal(y, mask):
    """Stan User's Guide, "Missing data": ``y_obs`` and ``y_mis`` both ``~ normal(mu, sigma)``
    with flat priors; in Pyro the missing values are imputed through ``obs_mask``."""
    mu = pyro.sample("mu", dist.ImproperUniform(constraints.real, (), ()))
    sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    with pyro.plate("N", len(y)):
        pyro.sample("y", dist.Normal(mu, sigma), obs=y, obs_mask=mask)


def nonlin(x):
    return torch.tanh(x)


def bnn_model(X, Y, D_H, D_Y=1):
    """NumPyro's BNN example: two tanh hidden layers with unit normal weights."""
    N, D_X = X.shape

    # sample first layer (we put unit normal priors on all weights)
    w1 = pyro.sample("w1", dist.Normal(torch.zeros((D_X, D_H)), torch.ones((D_X, D_H))))
    assert w1.shape == (D_X, D_H)
    z1 = nonlin(torch.matmul(X, w1))  # <= first layer of activations
    assert z1.shape == (N, D_H)

    # sample second layer
    w2 = pyro.sample("w2", dist.Normal(torch.zeros((D_H, D_H)), torch.ones((D_H, D_H))))
    assert w2.shape == (D_H, D_H)
    z2 = nonlin(torch.matmul(z1, w2))  # <= second layer of activations
    assert z2.shape == (N, D_H)

    # sample final layer of weights and neural network output
    w3 = pyro.sample("w3", dist.Normal(torch.zeros((D_H, D_Y)), torch.ones((D_H, D_Y))))
    assert w3.shape == (D_H, D_Y)
    z3 = torch.matmul(z2, w3)  # <= output of the neural network
    assert z3.shape == (N, D_Y)

    if Y is not None:
        assert z3.shape == Y.shape

    # we put a prior on the observation noise
    prec_obs = pyro.sample("prec_obs", dist.Gamma(3.0, 1.0))
    sigma_obs = 1.0 / torch.sqrt(prec_obs)

    # observe data
    with pyro.plate("data", N):
        # note we use to_event(1) because each observation has shape (1,)
        pyro.sample("Y", dist.Normal(z3, sigma_obs).to_event(1), obs=Y)
