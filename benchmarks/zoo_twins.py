"""NumPyro twins of the zoo's models (bench-only: NumPyro and JAX come from the ``bench`` extra).

For NumPyro-sourced models the twin is the source's own code; for Pyro- and Stan-sourced ones it
is the same posterior written in NumPyro, with the same site names, so that its long NUTS run is
a reference independent of vilab's samplers. ``TWINS`` maps a zoo name to ``data dict -> (model,
kwargs)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.infer.reparam import LocScaleReparam, TransformReparam

__all__ = ["TWINS", "SPEED_TWINS"]


def _flat(support, event_shape=()):
    return dist.ImproperUniform(support, (), event_shape)


def logistic_docstring(data, labels):
    coefs = numpyro.sample("beta", dist.Normal(jnp.zeros(3), jnp.ones(3)))
    numpyro.sample("y", dist.Bernoulli(logits=(coefs * data).sum(-1)), obs=labels)


def rugged_pyromodule(x, y):
    weight = numpyro.sample("linear.weight", dist.Normal(0.0, 1.0).expand([1, 3]).to_event(2))
    bias = numpyro.sample("linear.bias", dist.Normal(0.0, 10.0).expand([1]).to_event(1))
    sigma = numpyro.sample("sigma", dist.Uniform(0.0, 10.0))
    mean = (x @ weight.T + bias).squeeze(-1)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("obs", dist.Normal(mean, sigma), obs=y)


def rugged_function(is_cont_africa, ruggedness, log_gdp):
    a = numpyro.sample("a", dist.Normal(0.0, 10.0))
    b_a = numpyro.sample("bA", dist.Normal(0.0, 1.0))
    b_r = numpyro.sample("bR", dist.Normal(0.0, 1.0))
    b_ar = numpyro.sample("bAR", dist.Normal(0.0, 1.0))
    sigma = numpyro.sample("sigma", dist.Uniform(0.0, 10.0))
    mean = a + b_a * is_cont_africa + b_r * ruggedness + b_ar * is_cont_africa * ruggedness
    with numpyro.plate("data", len(ruggedness)):
        numpyro.sample("obs", dist.Normal(mean, sigma), obs=log_gdp)


def kline_poisson(cid, P, T):
    a = numpyro.sample("a", dist.Normal(3, 0.5).expand([2]))
    b = numpyro.sample("b", dist.Normal(0, 0.2).expand([2]))
    numpyro.sample("T", dist.Poisson(jnp.exp(a[cid] + b[cid] * P)), obs=T)


def kline_gamma_poisson(T, P, cid):
    a = numpyro.sample("a", dist.Normal(1, 1).expand([2]))
    b = numpyro.sample("b", dist.Exponential(1).expand([2]))
    g = numpyro.sample("g", dist.Exponential(1))
    phi = numpyro.sample("phi", dist.Exponential(1))
    lambda_ = jnp.exp(a[cid]) * jnp.power(P, b[cid]) / g
    numpyro.sample("T", dist.GammaPoisson(lambda_ / phi, 1 / phi), obs=T)


def robust_regression(x, y, nu):
    alpha = numpyro.sample("alpha", _flat(constraints.real))
    beta = numpyro.sample("beta", _flat(constraints.real))
    sigma = numpyro.sample("sigma", _flat(constraints.positive))
    with numpyro.plate("N", len(x)):
        numpyro.sample("y", dist.StudentT(nu, alpha + beta * x, sigma), obs=y)


def ordered_logistic(x, y, K):
    beta = numpyro.sample("beta", _flat(constraints.real_vector, (x.shape[1],)))
    c = numpyro.sample("c", _flat(constraints.ordered_vector, (K - 1,)))
    with numpyro.plate("N", len(y)):
        numpyro.sample("y", dist.OrderedLogistic(x @ beta, c), obs=y)


def horseshoe(X, Y):
    D_X = X.shape[1]
    lambdas = numpyro.sample("lambdas", dist.HalfCauchy(jnp.ones(D_X)))
    tau = numpyro.sample("tau", dist.HalfCauchy(jnp.ones(1)))
    unscaled_betas = numpyro.sample("unscaled_betas", dist.Normal(0.0, jnp.ones(D_X)))
    scaled_betas = numpyro.deterministic("betas", tau * lambdas * unscaled_betas)
    mean_function = jnp.dot(X, scaled_betas)
    prec_obs = numpyro.sample("prec_obs", dist.Gamma(3.0, 1.0))
    sigma_obs = 1.0 / jnp.sqrt(prec_obs)
    numpyro.sample("Y", dist.Normal(mean_function, sigma_obs), obs=Y)


def eight_schools_noncentered(J, sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    tau = numpyro.sample("tau", dist.HalfCauchy(5))
    with numpyro.plate("J", J):
        with numpyro.handlers.reparam(config={"theta": TransformReparam()}):
            theta = numpyro.sample(
                "theta", dist.TransformedDistribution(dist.Normal(0.0, 1.0), dist.transforms.AffineTransform(mu, tau))
            )
        numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def eight_schools_centered(J, sigma, y=None):
    """NumPyro's eight schools example as its docs write it (centred): the same model as the Pyro
    port, for a speed comparison (the reference is drawn with the non-centred twin)."""
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    tau = numpyro.sample("tau", dist.HalfCauchy(5))
    with numpyro.plate("J", J):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def partially_pooled(at_bats, hits=None):
    m = numpyro.sample("m", dist.Uniform(0, 1))
    kappa = numpyro.sample("kappa", dist.Pareto(1, 1.5))
    with numpyro.plate("num_players", at_bats.shape[0]):
        phi = numpyro.sample("phi", dist.Beta(m * kappa, (1 - m) * kappa))
        numpyro.sample("obs", dist.Binomial(at_bats, probs=phi), obs=hits)


def partially_pooled_with_logit(at_bats, hits=None):
    # Non-centred (same posterior): the centred form leaves NumPyro's NUTS with divergences.
    loc = numpyro.sample("loc", dist.Normal(-1, 1))
    scale = numpyro.sample("scale", dist.HalfCauchy(1))
    with numpyro.plate("num_players", at_bats.shape[0]):
        with numpyro.handlers.reparam(config={"alpha": LocScaleReparam(0)}):
            alpha = numpyro.sample("alpha", dist.Normal(loc, scale))
        numpyro.sample("obs", dist.Binomial(at_bats, logits=alpha), obs=hits)


def glmm(dept, male, applications, admit=None):
    v_mu = numpyro.sample("v_mu", dist.Normal(0, jnp.array([4.0, 1.0])))
    sigma = numpyro.sample("sigma", dist.HalfNormal(jnp.ones(2)))
    L_Rho = numpyro.sample("L_Rho", dist.LKJCholesky(2, concentration=2))
    scale_tril = sigma[..., jnp.newaxis] * L_Rho
    num_dept = len(np.unique(dept))
    z = numpyro.sample("z", dist.Normal(jnp.zeros((num_dept, 2)), 1))
    v = jnp.dot(scale_tril, z.T).T
    logits = v_mu[0] + v[dept, 0] + (v_mu[1] + v[dept, 1]) * male
    numpyro.sample("admit", dist.Binomial(applications, logits=logits), obs=admit)


def cafe_varying_slopes(cafe, afternoon, wait):
    a = numpyro.sample("a", dist.Normal(5, 2))
    b = numpyro.sample("b", dist.Normal(-1, 0.5))
    sigma_cafe = numpyro.sample("sigma_cafe", dist.Exponential(1).expand([2]))
    sigma = numpyro.sample("sigma", dist.Exponential(1))
    Rho = numpyro.sample("Rho", dist.LKJ(2, 2))
    cov = jnp.outer(sigma_cafe, sigma_cafe) * Rho
    a_cafe_b_cafe = numpyro.sample("a_cafe,b_cafe", dist.MultivariateNormal(jnp.stack([a, b]), cov).expand([20]))
    a_cafe, b_cafe = a_cafe_b_cafe[:, 0], a_cafe_b_cafe[:, 1]
    numpyro.sample("wait", dist.Normal(a_cafe[cafe] + b_cafe[cafe] * afternoon, sigma), obs=wait)


def osic(patient_code, Weeks, FVC_obs=None):
    μ_α = numpyro.sample("μ_α", dist.Normal(0.0, 500.0))
    σ_α = numpyro.sample("σ_α", dist.HalfNormal(100.0))
    μ_β = numpyro.sample("μ_β", dist.Normal(0.0, 3.0))
    σ_β = numpyro.sample("σ_β", dist.HalfNormal(3.0))
    n_patients = len(np.unique(patient_code))
    with numpyro.plate("plate_i", n_patients):
        α = numpyro.sample("α", dist.Normal(μ_α, σ_α))
        β = numpyro.sample("β", dist.Normal(μ_β, σ_β))
    σ = numpyro.sample("σ", dist.HalfNormal(100.0))
    FVC_est = α[patient_code] + β[patient_code] * Weeks
    with numpyro.plate("data", len(patient_code)):
        numpyro.sample("obs", dist.Normal(FVC_est, σ), obs=FVC_obs)


def lkj(y):
    d = y.shape[1]
    theta = numpyro.sample("theta", dist.HalfCauchy(jnp.ones(d)))
    L_omega = numpyro.sample("L_omega", dist.LKJCholesky(d, 1.0))
    L_Omega = jnp.diag(jnp.sqrt(theta)) @ L_omega
    with numpyro.plate("observations", y.shape[0]):
        numpyro.sample("obs", dist.MultivariateNormal(jnp.zeros(d), scale_tril=L_Omega), obs=y)


def _rbf(X, variance, lengthscale):
    return variance * jnp.exp(-0.5 * ((X[:, None] - X[None, :]) / lengthscale) ** 2)


def gp_tutorial(X, y):
    # pyro.contrib.gp's GPRegression: RBF + (noise + jitter) I with the noise parameter at 1.0
    lengthscale = numpyro.sample("kernel.lengthscale", dist.LogNormal(0.0, 1.0))
    variance = numpyro.sample("kernel.variance", dist.LogNormal(0.0, 1.0))
    K = _rbf(X, variance, lengthscale) + (1.0 + 1e-6) * jnp.eye(X.shape[0])
    numpyro.sample("y", dist.MultivariateNormal(jnp.zeros(X.shape[0]), scale_tril=jnp.linalg.cholesky(K)), obs=y)


def gp_numpyro(X, Y):
    var = numpyro.sample("kernel_var", dist.LogNormal(0.0, 10.0))
    noise = numpyro.sample("kernel_noise", dist.LogNormal(0.0, 10.0))
    length = numpyro.sample("kernel_length", dist.LogNormal(0.0, 10.0))
    deltaXsq = jnp.power((X[:, None] - X) / length, 2.0)
    k = var * jnp.exp(-0.5 * deltaXsq) + (noise + 1.0e-6) * jnp.eye(X.shape[0])
    numpyro.sample("Y", dist.MultivariateNormal(loc=jnp.zeros(X.shape[0]), covariance_matrix=k), obs=Y)


def gp_latent_classifier(x, z):
    N = x.shape[0]
    rho = numpyro.sample("rho", dist.InverseGamma(5.0, 5.0))
    alpha = numpyro.sample("alpha", dist.HalfNormal(1.0))
    a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    eta = numpyro.sample("eta", dist.Normal(jnp.zeros(N), 1.0).to_event(1))
    K = alpha**2 * jnp.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / rho**2) + 1e-9 * jnp.eye(N)
    f = jnp.linalg.cholesky(K) @ eta
    with numpyro.plate("N", N):
        numpyro.sample("z", dist.Bernoulli(logits=a + f), obs=z)


def gmm(data):
    weights = numpyro.sample("weights", dist.Dirichlet(0.5 * jnp.ones(2)))
    scale = numpyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with numpyro.plate("components", 2):
        locs = numpyro.sample("locs", dist.Normal(0.0, 10.0))
    with numpyro.plate("data", len(data)):
        assignment = numpyro.sample("assignment", dist.Categorical(weights), infer={"enumerate": "parallel"})
        numpyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def hmm_model_1(sequences, lengths, hidden_dim=2):
    num_sequences, max_length, data_dim = sequences.shape
    probs_x = numpyro.sample("probs_x", dist.Dirichlet(0.9 * jnp.eye(hidden_dim) + 0.1).to_event(1))
    probs_y = numpyro.sample("probs_y", dist.Beta(0.1, 0.9).expand([hidden_dim, data_dim]).to_event(2))
    # the sequences' forward algorithm, as enumeration computes it (Pyro's model_1 loops in Python)
    log_lik = 0.0
    for i in range(num_sequences):
        sequence = sequences[i, : int(lengths[i])]
        emission = (sequence[:, None, :] * jnp.log(probs_y) + (1 - sequence[:, None, :]) * jnp.log1p(-probs_y)).sum(-1)
        alpha = jnp.log(probs_x[0]) + emission[0]
        for t in range(1, sequence.shape[0]):
            alpha = jax.nn.logsumexp(alpha[:, None] + jnp.log(probs_x), axis=0) + emission[t]
        log_lik = log_lik + jax.nn.logsumexp(alpha)
    numpyro.factor("sequences", log_lik)


def ar2_for_loop(y):
    alpha_1 = numpyro.sample("alpha_1", dist.Normal(0, 1))
    alpha_2 = numpyro.sample("alpha_2", dist.Normal(0, 1))
    const = numpyro.sample("const", dist.Normal(0, 1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1))
    y_prev, y_prev_prev = y[1], y[0]
    for i in range(2, len(y)):
        m_t = const + alpha_1 * y_prev + alpha_2 * y_prev_prev
        y_t = numpyro.sample("y_{}".format(i), dist.Normal(m_t, sigma), obs=y[i])
        y_prev_prev, y_prev = y_prev, y_t


def stochastic_volatility(returns):
    step_size = numpyro.sample("sigma", dist.Exponential(50.0))
    s = numpyro.sample("s", dist.GaussianRandomWalk(scale=step_size, num_steps=jnp.shape(returns)[0]))
    nu = numpyro.sample("nu", dist.Exponential(0.1))
    numpyro.sample("r", dist.StudentT(df=nu, loc=0.0, scale=jnp.exp(s)), obs=returns)


def bnn(X, Y, D_H, D_Y=1):
    N, D_X = X.shape
    w1 = numpyro.sample("w1", dist.Normal(jnp.zeros((D_X, D_H)), jnp.ones((D_X, D_H))))
    z1 = jnp.tanh(jnp.matmul(X, w1))
    w2 = numpyro.sample("w2", dist.Normal(jnp.zeros((D_H, D_H)), jnp.ones((D_H, D_H))))
    z2 = jnp.tanh(jnp.matmul(z1, w2))
    w3 = numpyro.sample("w3", dist.Normal(jnp.zeros((D_H, D_Y)), jnp.ones((D_H, D_Y))))
    z3 = jnp.matmul(z2, w3)
    prec_obs = numpyro.sample("prec_obs", dist.Gamma(3.0, 1.0))
    with numpyro.plate("data", N):
        numpyro.sample("Y", dist.Normal(z3, 1.0 / jnp.sqrt(prec_obs)).to_event(1), obs=Y)


def dz_dt(z, t, theta):
    u = z[0]
    v = z[1]
    alpha, beta, gamma, delta = theta[..., 0], theta[..., 1], theta[..., 2], theta[..., 3]
    du_dt = (alpha - beta * v) * u
    dv_dt = (-gamma + delta * u) * v
    return jnp.stack([du_dt, dv_dt])


def lotka_volterra(N, y=None):
    from jax.experimental.ode import odeint

    z_init = numpyro.sample("z_init", dist.LogNormal(jnp.log(10), 1).expand([2]))
    ts = jnp.arange(float(N))
    theta = numpyro.sample(
        "theta",
        dist.TruncatedNormal(low=0.0, loc=jnp.array([1.0, 0.05, 1.0, 0.05]), scale=jnp.array([0.5, 0.05, 0.5, 0.05])),
    )
    z = odeint(dz_dt, z_init, ts, theta, rtol=1e-6, atol=1e-5, mxstep=1000)
    sigma = numpyro.sample("sigma", dist.LogNormal(-1, 1).expand([2]))
    numpyro.sample("y", dist.LogNormal(jnp.log(z), sigma), obs=y)


TWINS = {
    "logistic_docstring": lambda x: (logistic_docstring, dict(data=x["data"], labels=x["labels"])),
    "rugged_pyromodule": lambda x: (
        rugged_pyromodule,
        dict(
            x=np.stack([x["is_cont_africa"], x["ruggedness"], x["is_cont_africa"] * x["ruggedness"]], -1),
            y=x["log_gdp"],
        ),
    ),
    "rugged_function": lambda x: (rugged_function, x),
    "kline_poisson": lambda x: (kline_poisson, dict(cid=x["cid"], P=x["P_std"], T=x["T"])),
    "kline_gamma_poisson": lambda x: (kline_gamma_poisson, dict(T=x["T"], P=x["P"], cid=x["cid"])),
    "robust_regression": lambda x: (robust_regression, x),
    "ordered_logistic": lambda x: (ordered_logistic, x),
    "horseshoe": lambda x: (horseshoe, x),
    "eight_schools_centered": lambda x: (eight_schools_noncentered, x),
    "eight_schools_noncentered": lambda x: (eight_schools_noncentered, x),
    "baseball_partially_pooled": lambda x: (partially_pooled, x),
    "baseball_partially_pooled_logit": lambda x: (partially_pooled_with_logit, x),
    "ucbadmit_glmm": lambda x: (glmm, x),
    "cafe_varying_slopes": lambda x: (cafe_varying_slopes, x),
    "osic_varying_slopes": lambda x: (osic, x),
    "lkj_covariance": lambda x: (lkj, x),
    "gp_tutorial": lambda x: (gp_tutorial, x),
    "gp_numpyro": lambda x: (gp_numpyro, x),
    "gp_latent_classifier": lambda x: (gp_latent_classifier, x),
    "gmm_enumerated": lambda x: (gmm, x),
    # the lengths stay Python ints: they set the loops' ranges
    "hmm_model_1": lambda x: (
        functools.partial(hmm_model_1, lengths=[int(v) for v in x["lengths"]]),
        dict(sequences=x["sequences"]),
    ),
    "ar2_for_loop": lambda x: (ar2_for_loop, x),
    "stochastic_volatility": lambda x: (stochastic_volatility, x),
    "bnn": lambda x: (bnn, dict(X=x["X"], Y=x["Y"], D_H=5)),
    "lotka_volterra": lambda x: (lotka_volterra, dict(N=len(x["y"]), y=x["y"])),
}

SPEED_TWINS = {**TWINS, "eight_schools_centered": lambda x: (eight_schools_centered, x)}
"""The twins a speed comparison uses (``benchmarks/nuts_peers.py``): the same parameterisation as
the Pyro model. ``TWINS`` draws the references, with the easier non-centred eight schools."""
