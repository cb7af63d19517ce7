r"""Pyro ports of the four linear-regression posteriors of posteriordb.

Each port takes the posteriordb data fields it uses as keyword arguments (float tensors of
shape ``(N,)``, or ``(N, D)`` for a design matrix; the observed field defaults to ``None``),
and its latent sites carry posteriordb's parameter names, so that flattening them 1-based
(``"beta"`` of shape ``(2,)`` -> ``"beta[1]"``, ``"beta[2]"``) gives the reference names.

Stan's flat priors (no prior statement) become :func:`flat`: a sampleable stand-in with zero
log density and the parameter's support, so NUTS sees Stan's target plus the same kind of
unconstraining Jacobian. Draws from such a stand-in are arbitrary (standard normal, or
half-normal for positive parameters); the prior predictive of a model with a flat prior is
therefore not meaningful, while its posterior predictive (latents from a guide or from MCMC)
is.

References:
    posteriordb: a set of posteriors for Bayesian inference and probabilistic programming.
    Magnusson, Torgander, Bürkner, Zhang, Carpenter, Vehtari, 2023. arXiv:2407.04967.
"""

from __future__ import annotations

import importlib
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

__all__ = ["flat", "linear_predictor", "posteriordb_loader", "kidscore_momiq", "logmesquite", "nes", "blr"]

# The module that reads posteriordb folders (it maps each folder to its port defined here).
POSTERIORDB_LOADER = "vilab.posteriordb"


def flat(support: constraints.Constraint = constraints.real, shape: Sequence[int] = ()) -> dist.Distribution:
    r"""A stand-in for Stan's improper flat prior: zero log density on ``support``.

    The returned distribution can be sampled (so Pyro's initialisation and autoguides work) but
    its ``log_prob`` is identically zero, as in ``dist.ImproperUniform``.

    Args:
        support: ``constraints.real`` or ``constraints.positive``.
        shape: Event shape of the parameter, e.g. ``(7,)`` for ``vector[7] beta``.

    Raises:
        ValueError: for any other support (ordered vectors, simplexes, ... need their own).
    """
    if support is constraints.real:
        base = dist.Normal(0.0, 1.0)
    elif support is constraints.positive:
        base = dist.HalfNormal(1.0)
    else:
        raise ValueError(f"support: expected constraints.real or constraints.positive; got {support}")
    shape = tuple(shape)
    if shape:
        base = base.expand(shape).to_event(len(shape))
    return base.mask(False)


def linear_predictor(beta: torch.Tensor, columns: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""Return :math:`\sum_k \beta_k x_k` for coefficient ``beta`` (``(*batch, K)``) and ``K``
    covariate columns of shape ``(N,)``; the result has shape ``(*batch[:-1], N)``-broadcast.

    Written as a sum over columns (not ``X @ beta``) so that extra batch dimensions on
    ``beta``, e.g. from vectorised particles or draws, broadcast against the data plate.
    """
    coefficients = beta.unbind(-1)
    assert len(coefficients) == len(columns), "one coefficient per column"
    return sum(b * x for b, x in zip(coefficients, columns))


def kidscore_momiq(mom_iq: torch.Tensor, kid_score: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""posteriordb ``kidiq-kidscore_momiq``: child's test score on mother's IQ.

    .. math::
        \beta \sim \text{flat}(\mathbb{R}^2), \quad \sigma \sim \text{HalfCauchy}(2.5), \quad
        \text{kid\_score}_n \sim \mathcal{N}(\beta_1 + \beta_2\, \text{mom\_iq}_n, \sigma).

    ``mom_iq`` is not centred, so :math:`\text{corr}(\beta_1, \beta_2) \approx -0.99`.

    Args:
        mom_iq: Mother's IQ, shape ``(N,)``.
        kid_score: Observed scores, shape ``(N,)``; ``None`` draws them.

    Returns:
        ``kid_score`` (observed or drawn), shape ``(N,)``. Sites: ``beta`` ``(2,)``,
        ``sigma`` ``()``, ``kid_score`` ``(N,)`` in plate ``"data"``.
    """
    beta = pyro.sample("beta", flat(constraints.real, (2,)))
    sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
    with pyro.plate("data", mom_iq.shape[-1]):
        loc = linear_predictor(beta, [torch.ones_like(mom_iq), mom_iq])
        return pyro.sample("kid_score", dist.Normal(loc, sigma), obs=kid_score)


def logmesquite(
    diam1: torch.Tensor,
    diam2: torch.Tensor,
    canopy_height: torch.Tensor,
    total_height: torch.Tensor,
    density: torch.Tensor,
    group: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""posteriordb ``mesquite-logmesquite``: log-log regression of mesquite bush weight.

    .. math::
        \beta \sim \text{flat}(\mathbb{R}^7), \quad \sigma \sim \text{flat}(\mathbb{R}_+), \\
        \log w_n \sim \mathcal{N}(\beta_1 + \beta_2 \log d_{1n} + \beta_3 \log d_{2n}
        + \beta_4 \log c_n + \beta_5 \log h_n + \beta_6 \log \rho_n + \beta_7 g_n, \sigma).

    Args:
        diam1, diam2, canopy_height, total_height, density: Positive covariates, each ``(N,)``.
        group: 0/1 group indicator, ``(N,)``.
        weight: Observed weights (positive), ``(N,)``; ``None`` draws ``log_weight``.

    Returns:
        ``log_weight``, shape ``(N,)``. Sites: ``beta`` ``(7,)``, ``sigma`` ``()``,
        ``log_weight`` ``(N,)`` in plate ``"data"``.
    """
    beta = pyro.sample("beta", flat(constraints.real, (7,)))
    sigma = pyro.sample("sigma", flat(constraints.positive))
    logs = [torch.log(x) for x in (diam1, diam2, canopy_height, total_height, density)]
    columns = [torch.ones_like(group), *logs, group]
    with pyro.plate("data", group.shape[-1]):
        log_weight = None if weight is None else torch.log(weight)
        loc = linear_predictor(beta, columns)
        return pyro.sample("log_weight", dist.Normal(loc, sigma), obs=log_weight)


def nes(
    real_ideo: torch.Tensor,
    race_adj: torch.Tensor,
    age_discrete: torch.Tensor,
    educ1: torch.Tensor,
    gender: torch.Tensor,
    income: torch.Tensor,
    partyid7: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""posteriordb ``nes2000-nes``: party identification in the 2000 US election survey.

    .. math::
        \beta \sim \text{flat}(\mathbb{R}^9), \quad \sigma \sim \text{flat}(\mathbb{R}_+), \\
        \text{partyid7}_n \sim \mathcal{N}(\beta_1 + \beta_2 \text{ideo}_n + \beta_3 \text{race}_n
        + \sum_{a=2}^{4} \beta_{a+2} [\text{age}_n = a] + \beta_7 \text{educ}_n
        + \beta_8 \text{gender}_n + \beta_9 \text{income}_n, \sigma).

    Args:
        real_ideo, race_adj, educ1, gender, income: Covariates, each ``(N,)``.
        age_discrete: Age class in ``{1, 2, 3, 4}``, ``(N,)``; classes 2-4 get indicators.
        partyid7: Observed 7-point party identification, ``(N,)``; ``None`` draws it.

    Returns:
        ``partyid7``, shape ``(N,)``. Sites: ``beta`` ``(9,)``, ``sigma`` ``()``,
        ``partyid7`` ``(N,)`` in plate ``"data"``.
    """
    beta = pyro.sample("beta", flat(constraints.real, (9,)))
    sigma = pyro.sample("sigma", flat(constraints.positive))
    ages = [(age_discrete == a).to(real_ideo.dtype) for a in (2, 3, 4)]
    columns = [torch.ones_like(real_ideo), real_ideo, race_adj, *ages, educ1, gender, income]
    with pyro.plate("data", real_ideo.shape[-1]):
        loc = linear_predictor(beta, columns)
        return pyro.sample("partyid7", dist.Normal(loc, sigma), obs=partyid7)


def blr(X: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""posteriordb ``sblrc-blr``: Bayesian linear regression without intercept.

    .. math::
        \beta_d \sim \mathcal{N}(0, 10), \quad \sigma \sim \text{HalfNormal}(10), \quad
        y_n \sim \mathcal{N}(x_n^\top \beta, \sigma).

    The predictors are strongly correlated and the posterior very tight
    (:math:`\text{sd}(\beta_d) \approx 10^{-3}`).

    Args:
        X: Design matrix, shape ``(N, D)``.
        y: Observed responses, shape ``(N,)``; ``None`` draws them (prior predictive defined).

    Returns:
        ``y``, shape ``(N,)``. Sites: ``beta`` ``(D,)``, ``sigma`` ``()``, ``y`` ``(N,)`` in
        plate ``"data"``.
    """
    if X.dim() != 2:
        raise ValueError(f"X: expected a matrix of shape (N, D); got shape {tuple(X.shape)}")
    beta = pyro.sample("beta", dist.Normal(0.0, 10.0).expand([X.shape[-1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(10.0))
    with pyro.plate("data", X.shape[0]):
        loc = linear_predictor(beta, list(X.unbind(-1)))
        return pyro.sample("y", dist.Normal(loc, sigma), obs=y)


def posteriordb_loader(folder: str):
    """A registry loader for posteriordb posterior ``folder``; reads files only when called."""

    def load():
        # The loader module imports the ports, so it is found by name when a model is loaded
        # (as VI methods are, vilab.inference.vi.METHODS): no import cycle, no file read at import.
        loader = importlib.import_module(POSTERIORDB_LOADER)
        problem = loader.load_posteriordb(loader.default_posteriordb_path(), folder)
        return problem.model, problem.args, problem.kwargs

    return load


def _register() -> None:
    from vilab.models.registry import ModelSpec, register_model

    for folder, description in [
        ("kidiq-kidscore_momiq", "posteriordb: kid score on mother's IQ (flat beta, corr -0.99)"),
        ("mesquite-logmesquite", "posteriordb: log-log regression of mesquite weight (flat priors)"),
        ("nes2000-nes", "posteriordb: party identification regression, NES 2000 (flat priors)"),
        ("sblrc-blr", "posteriordb: linear regression on correlated predictors (very tight)"),
    ]:
        register_model(
            ModelSpec(
                name=f"posteriordb/{folder}",
                loader=posteriordb_loader(folder),
                description=description,
                tags=("posteriordb",),
            )
        )


_register()
