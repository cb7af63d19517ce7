r"""Start NUTS from multi-path Pathfinder, as Stan can: initial points and metric.

The chains start at draws of multi-path Pathfinder's importance-resampled output (distinct
draws, one per chain), and warmup's metric starts from its covariance instead of the
identity: the covariance of the paths' Gaussian mixture,
:math:`\bar\Sigma = \frac1P \sum_i \Sigma_i + \frac1P \sum_i (\mu_i - \bar\mu)(\mu_i - \bar\mu)^\top`
(its diagonal for a diagonal metric). Warmup then adapts as usual from there.

References:
    Pathfinder: Parallel quasi-Newton variational inference, Zhang, Carpenter, Gelman and
    Vehtari, 2022, arXiv:2108.03782 (Section 5: Pathfinder draws as MCMC initialisation).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from vilab.inference.common.diagnostics import psis

__all__ = ["PathfinderInit", "pathfinder_init"]


class PathfinderInit(NamedTuple):
    """``init_values`` (site -> ``(num_chains, *shape)``), ``inverse_mass`` (``(D,)`` or
    ``(D, D)``) and ``info`` (Pathfinder's gradient evaluations, k-hat, paths converged)."""

    init_values: dict
    inverse_mass: torch.Tensor
    info: dict


@torch.no_grad()
def pathfinder_init(
    model,
    args: tuple,
    kwargs: dict,
    *,
    num_chains: int,
    dense_mass: bool,
    seed: int = 0,
    options: Optional[dict] = None,
) -> PathfinderInit:
    """Initial values and metric for ``num_chains`` NUTS chains from multi-path Pathfinder."""
    from vilab.inference.vi.pathfinder import fit_multipathfinder

    result = fit_multipathfinder(model, *args, seed=seed, **(options or {}), **kwargs)
    guide = result.guide
    posterior = guide.get_posterior()
    num_proposals = max(1000, 20 * num_chains)
    generator = np.random.default_rng(seed)
    z = posterior.sample((num_proposals,))
    from vilab.inference.vi.density import LogDensity

    density = LogDensity(model, args, kwargs, seed=seed)
    smoothed = psis((density.log_density(z) - posterior.log_prob(z)).numpy()).log_weights
    probabilities = np.exp(smoothed - np.logaddexp.reduce(smoothed))
    # Distinct draws, so no two chains start at the same point.
    index = generator.choice(num_proposals, size=num_chains, replace=False, p=probabilities)
    values, _ = density.potential.constrain(z[torch.as_tensor(index)])
    mean = guide.locs.mean(0)
    covariance = (guide.scale_trils @ guide.scale_trils.transpose(-1, -2)).mean(0) + (
        (guide.locs - mean).T @ (guide.locs - mean)
    ) / guide.locs.shape[0]
    inverse_mass = covariance if dense_mass else covariance.diagonal().clone()
    info = {
        "gradient_evaluations": result.config["gradient_evaluations"],
        "k_hat": result.config["k_hat"],
        "paths_converged": result.config["paths_converged"],
    }
    return PathfinderInit({name: value.detach() for name, value in values.items()}, inverse_mass, info)
