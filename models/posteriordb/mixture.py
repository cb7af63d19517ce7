r"""Pyro ports of posteriordb's two discrete-latent posteriors, with the discrete states summed out.

``low_dim_gauss_mix`` is a two-component normal mixture with an ordered vector of means;
``hmm_example`` a two-state Gaussian hidden Markov model with positive ordered means. Both keep
posteriordb's parameter names (``mu``, ``sigma``, ``theta``; ``theta1``, ``theta2``, ``mu``).
Ordered means need a prior whose support is the ordered cone: :class:`RestrictedDistribution`
restricts a proper base prior to a constraint, as Stan's ``ordered[2] mu; mu ~ normal(...)``
does.

References:
    posteriordb: a set of posteriors for Bayesian inference and probabilistic programming.
    Magnusson, Torgander, Bürkner, Zhang, Carpenter, Vehtari, 2023. arXiv:2407.04967.
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.distributions import constraints

from vilab.models.posteriordb.regression import posteriordb_loader

__all__ = ["RestrictedDistribution", "low_dim_gauss_mix", "hmm_example"]


class RestrictedDistribution(TorchDistribution):
    r"""``base`` restricted to ``support``, unnormalised: :math:`p(x) \propto p_\text{base}(x)\,
    [x \in \text{support}]`.

    ``log_prob`` is the base's (the missing :math:`-\log P_\text{base}(\text{support})` is a
    constant, as in Stan's target); ``sample`` draws by rejection from ``base``.

    Args:
        base: A distribution whose support contains ``support``.
        support: The constraint to restrict to, e.g. ``constraints.ordered_vector``.
        max_tries: Rejection rounds before giving up with a ``RuntimeError``.
    """

    arg_constraints: dict = {}

    def __init__(self, base: TorchDistribution, support: constraints.Constraint, max_tries: int = 100):
        self.base_dist = base
        self._support = support
        self.max_tries = max_tries
        super().__init__(base.batch_shape, base.event_shape)

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:
        return self._support

    def expand(self, batch_shape, _instance=None) -> "RestrictedDistribution":
        return RestrictedDistribution(self.base_dist.expand(batch_shape), self._support, self.max_tries)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.base_dist.log_prob(value)

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        value = self.base_dist.sample(sample_shape)
        for _ in range(self.max_tries):
            accepted = self._support.check(value)
            if accepted.all():
                return value
            accepted = accepted.reshape(accepted.shape + (1,) * len(self.event_shape))
            value = torch.where(accepted, value, self.base_dist.sample(sample_shape))
        raise RuntimeError(f"RestrictedDistribution: no draw in {self._support} after {self.max_tries} tries")


def _num_points(y: Optional[torch.Tensor], N: Optional[int]) -> int:
    if y is None:
        if N is None:
            raise ValueError("N: expected the number of points when y is None; got None")
        return int(N)
    if y.dim() != 1:
        raise ValueError(f"y: expected shape (N,); got {tuple(y.shape)}")
    if N is not None and int(N) != y.shape[0]:
        raise ValueError(f"N: expected len(y) = {y.shape[0]}; got {N}")
    return y.shape[0]


def low_dim_gauss_mix(y: Optional[torch.Tensor] = None, N: Optional[int] = None) -> torch.Tensor:
    r"""posteriordb ``low_dim_gauss_mix-low_dim_gauss_mix``: two-component 1-D normal mixture.

    .. math::
        \mu \sim \mathcal{N}(0, 2)^{\otimes 2} \text{ restricted to } \mu_1 < \mu_2, \quad
        \sigma_j \sim \text{HalfNormal}(2), \quad \theta \sim \text{Beta}(5, 5), \\
        p(y_n) = \theta\, \mathcal{N}(y_n; \mu_1, \sigma_1) + (1 - \theta)\, \mathcal{N}(y_n; \mu_2, \sigma_2).

    Args:
        y: Observations, shape ``(N,)``; ``None`` draws them (prior predictive defined).
        N: Number of points; needed only when ``y`` is ``None``.

    Returns:
        ``y``, shape ``(N,)``. Sites: ``mu`` ``(2,)``, ``sigma`` ``(2,)``, ``theta`` ``()``,
        ``y`` ``(N,)`` in plate ``"data"``.
    """
    num_points = _num_points(y, N)
    mu_prior = dist.Normal(0.0, 2.0).expand([2]).to_event(1)
    mu = pyro.sample("mu", RestrictedDistribution(mu_prior, constraints.ordered_vector))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    theta = pyro.sample("theta", dist.Beta(5.0, 5.0))
    weights = dist.Categorical(probs=torch.stack([theta, 1.0 - theta], -1))
    with pyro.plate("data", num_points):
        mixture = dist.MixtureSameFamily(weights, dist.Normal(mu, sigma))
        return pyro.sample("y", mixture, obs=y)


def hmm_example(y: Optional[torch.Tensor] = None, N: Optional[int] = None, K: int = 2) -> torch.Tensor:
    r"""posteriordb ``hmm_example-hmm_example``: two-state Gaussian HMM, states summed out.

    .. math::
        \theta_1, \theta_2 \sim \text{Dirichlet}(1, 1) \text{ (flat on the simplex)}, \quad
        \mu \sim \mathcal{N}(3, 1) \otimes \mathcal{N}(10, 1) \text{ restricted to }
        0 < \mu_1 < \mu_2, \\
        z_1 \sim \text{Uniform}\{1, 2\}, \quad z_t \mid z_{t-1} \sim \text{Categorical}(\theta_{z_{t-1}}),
        \quad y_t \sim \mathcal{N}(\mu_{z_t}, 1).

    ``dist.DiscreteHMM``'s initial distribution is for the state *before* the first transition,
    so the first transition slice is uniform (zero logits) to make :math:`z_1` uniform.

    Args:
        y: Observations, shape ``(N,)``; ``None`` draws them (prior predictive defined).
        N: Number of points; needed only when ``y`` is ``None``.
        K: Number of states; posteriordb's parameter names fix it to 2.

    Returns:
        ``y``, shape ``(N,)``. Sites: ``theta1`` ``(2,)``, ``theta2`` ``(2,)`` (rows of the
        transition matrix, old state -> new state), ``mu`` ``(2,)``, ``y`` (event ``(N,)``).
    """
    if int(K) != 2:
        raise ValueError(f"K: expected 2 (theta1, theta2 are the transition rows); got {K}")
    num_points = _num_points(y, N)
    theta1 = pyro.sample("theta1", dist.Dirichlet(torch.ones(2)))
    theta2 = pyro.sample("theta2", dist.Dirichlet(torch.ones(2)))
    mu_prior = dist.Normal(torch.tensor([3.0, 10.0]), 1.0).to_event(1)
    mu = pyro.sample("mu", RestrictedDistribution(mu_prior, constraints.positive_ordered_vector))
    transition = torch.stack([theta1, theta2], -2).log()
    steps = transition.unsqueeze(-3).expand(transition.shape[:-2] + (num_points - 1, 2, 2))
    logits = torch.cat([torch.zeros_like(transition).unsqueeze(-3), steps], -3)
    hmm = dist.DiscreteHMM(torch.zeros(2), logits, dist.Normal(mu.unsqueeze(-2), 1.0), duration=num_points)
    return pyro.sample("y", hmm, obs=y)


def _register() -> None:
    from vilab.models.registry import ModelSpec, register_model

    for folder, description in [
        ("low_dim_gauss_mix-low_dim_gauss_mix", "posteriordb: two-component normal mixture, ordered means"),
        ("hmm_example-hmm_example", "posteriordb: two-state Gaussian HMM, states summed out"),
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
