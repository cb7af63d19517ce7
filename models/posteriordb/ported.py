r"""Pyro ports of twelve more posteriordb posteriors: ARM regressions, a brms regression, a
Poisson GP regression and the non-centred eight schools.

Each port follows its Stan program line by line: the same parameters (named as posteriordb
reports them, so 1-based flattening gives the reference names), the same priors (Stan's flat
priors as :func:`~vilab.models.posteriordb.regression.flat`, a ``cauchy`` on a ``<lower=0>``
parameter as a half-Cauchy), the transformed data computed inside the model from the raw data
fields, and transformed parameters as ``pyro.deterministic`` sites. Each takes the data fields
it uses as keyword arguments, so :func:`vilab.posteriordb.load_posteriordb` loads it from a
folder of posteriordb files; compact copies of the data and reference draws are in
``tests/data/posteriordb``.

References:
    posteriordb: a set of posteriors for Bayesian inference and probabilistic programming.
    Magnusson, Torgander, Bürkner, Zhang, Carpenter, Vehtari, 2023. arXiv:2407.04967.
    (Stan programs and data BSD 3-Clause, copyright the Stan Developers.)
    Gelman & Hill, "Data Analysis Using Regression and Multilevel/Hierarchical Models", 2006.
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from vilab.models.posteriordb.regression import flat, linear_predictor

__all__ = [
    "kidscore_momhsiq",
    "kidscore_interaction",
    "kidscore_interaction_z",
    "earn_height",
    "logearn_logheight_male",
    "logearn_interaction_z",
    "mesquite",
    "logmesquite_logvash",
    "kilpisjarvi",
    "diamonds",
    "gp_pois_regr",
    "eight_schools_noncentered",
]


def _regression(
    columns: list[torch.Tensor], y: Optional[torch.Tensor], name: str, sigma_prior: Optional[dist.Distribution] = None
) -> torch.Tensor:
    r"""``vector[K] beta`` (flat), ``real<lower=0> sigma`` (flat unless ``sigma_prior``),
    ``y ~ normal(sum_k beta[k] columns[k], sigma)`` in plate ``"data"``."""
    beta = pyro.sample("beta", flat(constraints.real, (len(columns),)))
    sigma = pyro.sample("sigma", sigma_prior if sigma_prior is not None else flat(constraints.positive))
    with pyro.plate("data", columns[0].shape[-1]):
        return pyro.sample(name, dist.Normal(linear_predictor(beta, columns), sigma), obs=y)


def _standardize(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Stan's ``(x - mean(x)) / (scale * sd(x))`` (``sd`` with the ``N - 1`` divisor)."""
    return (x - x.mean()) / (scale * x.std())


def kidscore_momhsiq(
    mom_hs: torch.Tensor, mom_iq: torch.Tensor, kid_score: Optional[torch.Tensor] = None
) -> torch.Tensor:
    r"""posteriordb ``kidiq-kidscore_momhsiq``: :math:`\beta` flat,
    :math:`\sigma \sim \text{HalfCauchy}(2.5)`,
    :math:`\text{kid\_score} \sim \mathcal N(\beta_1 + \beta_2\,\text{mom\_hs} + \beta_3\,\text{mom\_iq}, \sigma)`.

    Args: ``mom_hs``, ``mom_iq``, ``kid_score``: ``(N,)``. Sites: ``beta`` ``(3,)``, ``sigma``.
    """
    return _regression([torch.ones_like(mom_iq), mom_hs, mom_iq], kid_score, "kid_score", dist.HalfCauchy(2.5))


def kidscore_interaction(
    mom_hs: torch.Tensor, mom_iq: torch.Tensor, kid_score: Optional[torch.Tensor] = None
) -> torch.Tensor:
    r"""posteriordb ``kidiq-kidscore_interaction``: as :func:`kidscore_momhsiq` plus
    :math:`\beta_4\,\text{mom\_hs}\cdot\text{mom\_iq}` (uncentred, so the four coefficients are
    strongly correlated). Sites: ``beta`` ``(4,)``, ``sigma``."""
    columns = [torch.ones_like(mom_iq), mom_hs, mom_iq, mom_hs * mom_iq]
    return _regression(columns, kid_score, "kid_score", dist.HalfCauchy(2.5))


def kidscore_interaction_z(
    mom_hs: torch.Tensor, mom_iq: torch.Tensor, kid_score: Optional[torch.Tensor] = None
) -> torch.Tensor:
    r"""posteriordb ``kidiq_with_mom_work-kidscore_interaction_z``: predictors standardised by
    two sds, :math:`z_{hs} = (\text{mom\_hs} - \bar{\cdot}) / (2\,\text{sd})`, likewise
    :math:`z_{iq}`; :math:`\beta` and :math:`\sigma` flat;
    :math:`\text{kid\_score} \sim \mathcal N(\beta_1 + \beta_2 z_{hs} + \beta_3 z_{iq}
    + \beta_4 z_{hs} z_{iq}, \sigma)`."""
    z_hs, z_iq = _standardize(mom_hs, 2.0), _standardize(mom_iq, 2.0)
    return _regression([torch.ones_like(z_hs), z_hs, z_iq, z_hs * z_iq], kid_score, "kid_score")


def earn_height(height: torch.Tensor, earn: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""posteriordb ``earnings-earn_height``: earnings in dollars on height in inches, unscaled
    (:math:`\sigma \approx 2\cdot10^4`), :math:`\beta`, :math:`\sigma` flat;
    :math:`\text{earn} \sim \mathcal N(\beta_1 + \beta_2\,\text{height}, \sigma)`."""
    return _regression([torch.ones_like(height), height], earn, "earn")


def logearn_logheight_male(
    height: torch.Tensor, male: torch.Tensor, earn: Optional[torch.Tensor] = None
) -> torch.Tensor:
    r"""posteriordb ``earnings-logearn_logheight_male``: flat priors;
    :math:`\log \text{earn} \sim \mathcal N(\beta_1 + \beta_2 \log \text{height} + \beta_3\,\text{male}, \sigma)`.
    The observed site is ``log_earn``."""
    log_earn = None if earn is None else torch.log(earn)
    return _regression([torch.ones_like(height), torch.log(height), male], log_earn, "log_earn")


def logearn_interaction_z(
    height: torch.Tensor, male: torch.Tensor, earn: Optional[torch.Tensor] = None
) -> torch.Tensor:
    r"""posteriordb ``earnings-logearn_interaction_z``:
    :math:`z = (\text{height} - \bar{\cdot}) / \text{sd}`; flat priors;
    :math:`\log \text{earn} \sim \mathcal N(\beta_1 + \beta_2 z + \beta_3\,\text{male}
    + \beta_4 z\,\text{male}, \sigma)`."""
    z_height = _standardize(height)
    log_earn = None if earn is None else torch.log(earn)
    return _regression([torch.ones_like(z_height), z_height, male, z_height * male], log_earn, "log_earn")


def mesquite(
    diam1: torch.Tensor,
    diam2: torch.Tensor,
    canopy_height: torch.Tensor,
    total_height: torch.Tensor,
    density: torch.Tensor,
    group: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""posteriordb ``mesquite-mesquite``: untransformed linear regression of bush weight on
    seven columns (intercept, two diameters, canopy and total height, density, group); flat
    priors. Sites: ``beta`` ``(7,)``, ``sigma``."""
    columns = [torch.ones_like(group), diam1, diam2, canopy_height, total_height, density, group]
    return _regression(columns, weight, "weight")


def logmesquite_logvash(
    diam1: torch.Tensor,
    diam2: torch.Tensor,
    canopy_height: torch.Tensor,
    total_height: torch.Tensor,
    group: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""posteriordb ``mesquite-logmesquite_logvash``: log weight on log canopy volume
    :math:`\log(d_1 d_2 c)`, area :math:`\log(d_1 d_2)`, shape :math:`\log(d_1/d_2)`, log total
    height and group; flat priors. Sites: ``beta`` ``(6,)``, ``sigma``."""
    columns = [
        torch.ones_like(group),
        torch.log(diam1 * diam2 * canopy_height),
        torch.log(diam1 * diam2),
        torch.log(diam1 / diam2),
        torch.log(total_height),
        group,
    ]
    return _regression(columns, None if weight is None else torch.log(weight), "log_weight")


def kilpisjarvi(
    x: torch.Tensor, pmualpha: float, psalpha: float, pmubeta: float, psbeta: float, y: Optional[torch.Tensor] = None
) -> torch.Tensor:
    r"""posteriordb ``kilpisjarvi_mod-kilpisjarvi``: summer temperature on the year, unscaled
    (years near 2000, so :math:`\alpha` and :math:`\beta` are almost perfectly correlated).

    .. math:: \alpha \sim \mathcal N(\mu_\alpha, s_\alpha), \ \beta \sim \mathcal N(\mu_\beta, s_\beta),
        \ \sigma \text{ flat on } \mathbb R_+, \ y_n \sim \mathcal N(\alpha + \beta x_n, \sigma).
    """
    alpha = pyro.sample("alpha", dist.Normal(float(pmualpha), float(psalpha)))
    beta = pyro.sample("beta", dist.Normal(float(pmubeta), float(psbeta)))
    sigma = pyro.sample("sigma", flat(constraints.positive))
    with pyro.plate("data", x.shape[-1]):
        return pyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)


def diamonds(X: torch.Tensor, prior_only: int = 0, Y: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""posteriordb ``diamonds-diamonds`` (generated by brms): log price on 24 centred predictors.

    .. math:: b_k \sim \mathcal N(0, 1), \ \text{Intercept} \sim t_3(8, 10), \
        \sigma \sim t_3^+(0, 10), \ Y_n \sim \mathcal N(\text{Intercept} + (X^c b)_n, \sigma),

    with :math:`X^c` the columns 2..K of ``X`` minus their means (``normal_id_glm``); no
    likelihood when ``prior_only``. Sites: ``b`` ``(K-1,)``, ``Intercept``, ``sigma``.
    """
    if X.dim() != 2:
        raise ValueError(f"X: expected a matrix of shape (N, K); got shape {tuple(X.shape)}")
    centred = X[:, 1:] - X[:, 1:].mean(0)
    b = pyro.sample("b", dist.Normal(0.0, 1.0).expand([centred.shape[1]]).to_event(1))
    intercept = pyro.sample("Intercept", dist.StudentT(3.0, 8.0, 10.0))
    # student_t(3, 0, 10) truncated to sigma > 0: the folded density differs by a constant.
    sigma = pyro.sample("sigma", dist.FoldedDistribution(dist.StudentT(3.0, 0.0, 10.0)))
    if prior_only:
        return None
    with pyro.plate("data", X.shape[0]):
        loc = intercept + linear_predictor(b, list(centred.unbind(-1)))
        return pyro.sample("Y", dist.Normal(loc, sigma), obs=Y)


def gp_pois_regr(x: torch.Tensor, k: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""posteriordb ``gp_pois_regr-gp_pois_regr``: Poisson regression on a latent GP,
    non-centred.

    .. math:: \rho \sim \text{Gamma}(25, 4), \ \alpha \sim \mathcal N^+(0, 2), \
        \tilde f \sim \mathcal N(0, I_N), \ f = L \tilde f, \ L L^\top = K_{\alpha,\rho}(x, x)
        + 10^{-10} I, \ k_n \sim \text{Poisson}(e^{f_n}),

    with the squared-exponential kernel :math:`K_{ij} = \alpha^2 e^{-(x_i - x_j)^2 / (2\rho^2)}`.
    Written for one draw, as Stan's code is (the Cholesky of a matrix built from scalars), so a
    batch of draws is evaluated one at a time. Sites: ``rho``, ``alpha``, ``f_tilde`` ``(N,)``,
    deterministic ``f`` ``(N,)``.
    """
    rho = pyro.sample("rho", dist.Gamma(25.0, 4.0))
    alpha = pyro.sample("alpha", dist.HalfNormal(2.0))
    f_tilde = pyro.sample("f_tilde", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    distance = x.unsqueeze(-1) - x.unsqueeze(-2)
    cov = alpha**2 * torch.exp(-0.5 * distance**2 / rho**2) + 1e-10 * torch.eye(x.shape[-1])
    f = pyro.deterministic("f", torch.linalg.cholesky(cov) @ f_tilde)
    return pyro.sample("k", dist.Poisson(f.exp()).to_event(1), obs=k)


def eight_schools_noncentered(sigma: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""posteriordb ``eight_schools-eight_schools_noncentered``.

    .. math:: \tilde\theta_j \sim \mathcal N(0, 1), \ \mu \sim \mathcal N(0, 5), \
        \tau \sim \text{HalfCauchy}(5), \ \theta_j = \mu + \tau \tilde\theta_j, \
        y_j \sim \mathcal N(\theta_j, \sigma_j).

    Sites: ``theta_trans`` ``(J,)`` in plate ``"school"``, ``mu``, ``tau``, deterministic
    ``theta`` ``(J,)``.
    """
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", sigma.shape[-1]):
        theta_trans = pyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", theta_trans * tau + mu)
        return pyro.sample("y", dist.Normal(theta, sigma), obs=y)
