"""Gaussian processes: Pyro's ``contrib.gp`` tutorial, NumPyro's GP example and the Stan User's
Guide's latent-variable GP classifier (an explicit Cholesky factor)."""

from __future__ import annotations

import pyro
import pyro.contrib.gp as gp
import pyro.distributions as dist
import torch

__all__ = ["make_gp_tutorial", "kernel", "gp_numpyro", "gp_latent_classifier"]


def make_gp_tutorial(X, y):
    """Pyro's GP tutorial: ``GPRegression`` with ``PyroSample`` priors on the RBF kernel's
    lengthscale and variance; the noise stays a ``PyroParam`` (``pyro.param``) at 1.0.

    Returns ``gpr.model``, the method the tutorial hands to inference.
    """
    kernel = gp.kernels.RBF(input_dim=1, variance=torch.tensor(5.0), lengthscale=torch.tensor(10.0))
    gpr = gp.models.GPRegression(X, y, kernel, noise=torch.tensor(1.0))
    # note that our priors have support on the positive reals
    gpr.kernel.lengthscale = pyro.nn.PyroSample(dist.LogNormal(0.0, 1.0))
    gpr.kernel.variance = pyro.nn.PyroSample(dist.LogNormal(0.0, 1.0))
    return gpr.model


# squared exponential kernel with diagonal noise term
def kernel(X, Z, var, length, noise, jitter=1.0e-6, include_noise=True):
    deltaXsq = torch.pow((X[:, None] - Z) / length, 2.0)
    k = var * torch.exp(-0.5 * deltaXsq)
    if include_noise:
        k += (noise + jitter) * torch.eye(X.shape[0])
    return k


def gp_numpyro(X, Y):
    """NumPyro's GP example: log-normal priors on the three kernel hyperparameters."""
    # set uninformative log-normal priors on our three kernel hyperparameters
    var = pyro.sample("kernel_var", dist.LogNormal(0.0, 10.0))
    noise = pyro.sample("kernel_noise", dist.LogNormal(0.0, 10.0))
    length = pyro.sample("kernel_length", dist.LogNormal(0.0, 10.0))

    # compute kernel
    k = kernel(X, X, var, length, noise)

    # sample Y according to the standard gaussian process formula
    pyro.sample(
        "Y",
        dist.MultivariateNormal(loc=torch.zeros(X.shape[0]), covariance_matrix=k),
        obs=Y,
    )


def gp_latent_classifier(x, z):
    """Stan User's Guide, "Gaussian processes: logistic Gaussian-process regression":
    ``f = cholesky_decompose(K) * eta``, ``z ~ bernoulli_logit(a + f)``."""
    N = x.shape[0]
    delta = 1e-9
    rho = pyro.sample("rho", dist.InverseGamma(5.0, 5.0))
    alpha = pyro.sample("alpha", dist.HalfNormal(1.0))
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    eta = pyro.sample("eta", dist.Normal(torch.zeros(N), 1.0).to_event(1))
    # gp_exp_quad_cov(x, alpha, rho) plus delta on the diagonal
    K = alpha**2 * torch.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / rho**2) + delta * torch.eye(N)
    L_K = torch.linalg.cholesky(K)
    f = L_K @ eta
    with pyro.plate("N", N):
        pyro.sample("z", dist.Bernoulli(logits=a + f), obs=z)
