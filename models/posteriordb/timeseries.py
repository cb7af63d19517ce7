r"""Pyro ports of the three time-series posteriors of posteriordb: AR(K), ARMA(1,1), GARCH(1,1).

Each port takes posteriordb's data fields as keyword arguments (``y`` a float tensor of shape
``(T,)``; ``T`` and lag orders as ints) and names its latent sites as posteriordb names the
parameters. Given ``y``, the likelihood is computed for the whole sequence at once: the AR
means from lagged copies of ``y``; the first-order recursions of ARMA's errors and GARCH's
variances by a log-depth scan (:func:`first_order_recursion`). With ``y=None`` a series of
length ``T`` is simulated step by step from standardised or scaled innovations (site
``"innovation"`` in plate ``"time"``) and recorded as the deterministic site ``"y"``.

References:
    posteriordb: a set of posteriors for Bayesian inference and probabilistic programming.
    Magnusson, Torgander, Bürkner, Zhang, Carpenter, Vehtari, 2023. arXiv:2407.04967.
"""

from __future__ import annotations

from typing import Optional, Union

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from vilab.models.posteriordb.regression import flat, linear_predictor, posteriordb_loader

__all__ = ["first_order_recursion", "ar_k", "arma11", "garch11"]


def first_order_recursion(drive: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    r"""Solve :math:`x_1 = d_1`, :math:`x_t = d_t + r\, x_{t-1}` for all ``t`` at once.

    A log-depth scan (Hillis and Steele's doubling): after round :math:`k`,

    .. math::
        x^{(k)}_t = \sum_{0 \le j < 2^{k+1}} r^j d_{t-j}
                  = x^{(k-1)}_t + r^{2^k} x^{(k-1)}_{t-2^k},

    so :math:`\lceil \log_2 T \rceil` rounds of a shift, a multiply and an add give the
    recursion's values, differentiably and on ``(*batch, T)`` tensors only. (A triangular solve
    of :math:`(I - r S) x = d` does the same in one kernel, but its gradient with respect to the
    matrix is a dense ``T x T`` array per batch element: twice as slow in a GARCH(1, 1) NUTS
    leaf.)

    Args:
        drive: ``d``, shape ``(*batch, T)``.
        rate: ``r``, a tensor broadcastable to ``drive[..., :1]`` (e.g. ``()`` or ``(*batch, 1)``).

    Returns:
        ``x``, shape ``(*batch, T)`` (the broadcast of ``drive`` and ``rate``).
    """
    rate = torch.as_tensor(rate, dtype=drive.dtype)
    length = drive.shape[-1]
    solution, power, shift = drive, rate, 1
    while shift < length:
        # Zeros shifted in from the left: terms before x_1 do not exist.
        earlier = torch.nn.functional.pad(solution[..., : length - shift], (shift, 0))
        solution = solution + power * earlier
        shift *= 2
        if shift < length:
            power = power * power
    return solution.expand(torch.broadcast_shapes(solution.shape, rate.shape))


def _series_length(y: Optional[torch.Tensor], T: Optional[int]) -> int:
    if y is None:
        if T is None:
            raise ValueError("T: expected the series length when y is None; got None")
        return int(T)
    if y.dim() < 1:
        raise ValueError(f"y: expected a series of shape (T,); got shape {tuple(y.shape)}")
    if T is not None and int(T) != y.shape[-1]:
        raise ValueError(f"T: expected len(y) = {y.shape[-1]}; got {T}")
    return y.shape[-1]


def ar_k(K: int, y: Optional[torch.Tensor] = None, T: Optional[int] = None) -> torch.Tensor:
    r"""posteriordb ``arK-arK``: autoregression of order ``K``, conditioned on the first ``K`` points.

    .. math::
        \alpha \sim \mathcal{N}(0, 10), \quad \beta_k \sim \mathcal{N}(0, 10), \quad
        \sigma \sim \text{HalfCauchy}(2.5), \\
        y_t \sim \mathcal{N}\Big(\alpha + \sum_{k=1}^K \beta_k y_{t-k}, \sigma\Big),
        \quad t = K+1, \dots, T.

    Args:
        K: Lag order (posteriordb: 5).
        y: Observed series, shape ``(T,)``; ``None`` simulates one whose first ``K`` points
            are zero (they are conditioned on, not modelled).
        T: Series length; needed only when ``y`` is ``None``.

    Returns:
        The series, shape ``(T,)``. Sites: ``alpha`` ``()``, ``beta`` ``(K,)``, ``sigma``
        ``()``, ``y`` ``(T-K,)`` (``y[K+1:]``) in plate ``"time"``; with ``y=None``
        ``innovation`` ``(T-K,)`` (scale ``sigma``) instead, and ``y`` is deterministic.
    """
    length = _series_length(y, T)
    if not 0 < int(K) < length:
        raise ValueError(f"K: expected a lag order in [1, T-1] = [1, {length - 1}]; got {K}")
    K = int(K)
    alpha = pyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 10.0).expand([K]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
    with pyro.plate("time", length - K):
        if y is None:
            innovation = pyro.sample("innovation", dist.Normal(0.0, sigma))
            return _simulate_ar(alpha, beta, innovation, K)
        lags = [y[K - k : length - k] for k in range(1, K + 1)]
        loc = alpha + linear_predictor(beta, lags)
        pyro.sample("y", dist.Normal(loc, sigma), obs=y[K:])
    return y


def _simulate_ar(alpha, beta, innovation, K: int) -> torch.Tensor:
    steps = innovation.unbind(-1)
    series = [torch.zeros_like(steps[0]) for _ in range(K)]
    for step in steps:  # sequential by nature
        series.append(alpha + sum(beta[..., k] * series[-1 - k] for k in range(K)) + step)
    y = torch.stack(series, -1)
    pyro.deterministic("y", y[..., K:])
    return y


def arma11(y: Optional[torch.Tensor] = None, T: Optional[int] = None) -> torch.Tensor:
    r"""posteriordb ``arma-arma11``: ARMA(1,1) with the error before the first point set to 0.

    .. math::
        \mu \sim \mathcal{N}(0, 10), \ \phi \sim \mathcal{N}(0, 2), \
        \theta \sim \mathcal{N}(0, 2), \ \sigma \sim \text{HalfCauchy}(2.5), \\
        \nu_1 = \mu + \phi\mu, \quad \nu_t = \mu + \phi y_{t-1} + \theta \epsilon_{t-1}, \quad
        \epsilon_t = y_t - \nu_t, \quad \epsilon_t \sim \mathcal{N}(0, \sigma).

    ``phi`` and ``theta`` are unconstrained, as in posteriordb (draws of ``phi`` exceed 1).
    The map :math:`y \mapsto \epsilon` has unit Jacobian, so the observed site ``y`` uses
    :math:`y_t \sim \mathcal{N}(\nu_t, \sigma)`.

    Args:
        y: Observed series, shape ``(T,)``; ``None`` simulates one.
        T: Series length; needed only when ``y`` is ``None``.

    Returns:
        The series, shape ``(T,)``. Sites: ``mu``, ``phi``, ``theta``, ``sigma`` (all ``()``),
        ``y`` ``(T,)`` in plate ``"time"``; with ``y=None`` ``innovation`` (the errors
        :math:`\epsilon`, ``(T,)``) instead, and ``y`` is deterministic.
    """
    length = _series_length(y, T)
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    phi = pyro.sample("phi", dist.Normal(0.0, 2.0))
    theta = pyro.sample("theta", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
    with pyro.plate("time", length):
        if y is None:
            error = pyro.sample("innovation", dist.Normal(0.0, sigma))
            return _simulate_arma(mu, phi, theta, error)
        previous = torch.cat([torch.zeros_like(y[..., :1]), y[..., :-1]], -1)
        first = torch.zeros_like(y).index_fill(-1, torch.tensor([0]), 1.0)
        # err_t = (y_t - mu - phi * y_{t-1}) - theta * err_{t-1}, with y_0 := mu, err_0 := 0
        drive = y - mu - phi * (previous + first * mu)
        error = first_order_recursion(drive, -theta)
        pyro.sample("y", dist.Normal(y - error, sigma), obs=y)
    return y


def _simulate_arma(mu, phi, theta, error) -> torch.Tensor:
    errors = error.unbind(-1)
    series = [mu + phi * mu + errors[0]]
    for t in range(1, len(errors)):  # sequential by nature
        series.append(mu + phi * series[-1] + theta * errors[t - 1] + errors[t])
    y = torch.stack(series, -1)
    pyro.deterministic("y", y)
    return y


def garch11(
    sigma1: Union[float, torch.Tensor], y: Optional[torch.Tensor] = None, T: Optional[int] = None
) -> torch.Tensor:
    r"""posteriordb ``garch-garch11``: GARCH(1,1) volatility model with flat priors.

    .. math::
        \mu \sim \text{flat}(\mathbb{R}), \ \alpha_0 \sim \text{flat}(\mathbb{R}_+), \
        \alpha_1 \sim \text{flat}(0, 1), \ \beta_1 \sim \text{flat}(0, 1 - \alpha_1), \\
        \sigma_1 = \text{sigma1}, \quad
        \sigma_t^2 = \alpha_0 + \alpha_1 (y_{t-1} - \mu)^2 + \beta_1 \sigma_{t-1}^2, \quad
        y_t \sim \mathcal{N}(\mu, \sigma_t).

    ``beta1``'s bound depends on ``alpha1``; it is written as ``beta1 = (1 - alpha1) u`` with a
    helper site ``u = beta1_fraction ~ Uniform(0, 1)`` and the Jacobian factor
    :math:`\log(1 - \alpha_1)`, which keeps the joint density of ``(alpha1, beta1)`` flat
    (``beta1 ~ Uniform(0, 1 - alpha1)`` would add :math:`-\log(1-\alpha_1)`).
    The prior is improper, so only the posterior predictive (``y=None`` with latents from a
    guide or MCMC) is meaningful.

    Args:
        sigma1: Volatility of the first point (posteriordb: 0.5), a positive scalar.
        y: Observed series, shape ``(T,)``; ``None`` simulates one.
        T: Series length; needed only when ``y`` is ``None``.

    Returns:
        The series, shape ``(T,)``. Sites: ``mu``, ``alpha0``, ``alpha1``, ``beta1_fraction``
        (helper), ``beta1`` (deterministic), all ``()``; ``y`` ``(T,)`` in plate ``"time"``;
        with ``y=None`` a standard normal ``innovation`` ``(T,)`` instead, ``y`` deterministic.
    """
    length = _series_length(y, T)
    sigma1 = torch.as_tensor(sigma1, dtype=torch.get_default_dtype())
    if sigma1.dim() != 0 or not sigma1 > 0:
        raise ValueError(f"sigma1: expected a positive scalar; got {sigma1}")
    mu = pyro.sample("mu", flat(constraints.real))
    alpha0 = pyro.sample("alpha0", flat(constraints.positive))
    alpha1 = pyro.sample("alpha1", dist.Uniform(0.0, 1.0))
    fraction = pyro.sample("beta1_fraction", dist.Uniform(0.0, 1.0))
    beta1 = pyro.deterministic("beta1", (1.0 - alpha1) * fraction)
    pyro.factor("beta1_jacobian", torch.log1p(-alpha1))
    with pyro.plate("time", length):
        if y is None:
            innovation = pyro.sample("innovation", dist.Normal(0.0, 1.0))
            return _simulate_garch(mu, alpha0, alpha1, beta1, sigma1, innovation)
        shock = alpha0 + alpha1 * (y[..., :-1] - mu) ** 2
        start = (sigma1**2).expand(shock[..., :1].shape)
        variance = first_order_recursion(torch.cat([start, shock], -1), beta1)
        pyro.sample("y", dist.Normal(mu, variance.sqrt()), obs=y)
    return y


def _simulate_garch(mu, alpha0, alpha1, beta1, sigma1, innovation) -> torch.Tensor:
    shocks = innovation.unbind(-1)
    variance = sigma1**2
    series = [mu + sigma1 * shocks[0]]
    for shock in shocks[1:]:  # sequential by nature
        variance = alpha0 + alpha1 * (series[-1] - mu) ** 2 + beta1 * variance
        series.append(mu + variance.sqrt() * shock)
    y = torch.stack(series, -1)
    pyro.deterministic("y", y)
    return y


def _register() -> None:
    from vilab.models.registry import ModelSpec, register_model

    for folder, description in [
        ("arK-arK", "posteriordb: AR(5) time series"),
        ("arma-arma11", "posteriordb: ARMA(1,1) time series"),
        ("garch-garch11", "posteriordb: GARCH(1,1) volatility (flat priors, dependent bound)"),
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
