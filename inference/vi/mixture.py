r"""An equal-weight mixture of Gaussians on the model's unconstrained space, as a Pyro guide.

Multi-path Pathfinder ends with one Gaussian per path. Its guide is their mixture

.. math:: q(z) = \frac1P \sum_{i=1}^P \mathcal N(z; \mu_i, L_i L_i^\top),

a proper density, so the ratio :math:`p(x, z)/q(z)` of a mixture draw is an importance weight
(the balance heuristic of multiple importance sampling): PSIS of these weights gives the
method's :math:`\hat k`, and resampling the draws by their smoothed weights gives multi-path
Pathfinder's draws (:func:`~vilab.inference.vi.pathfinder.resample_draws`).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoContinuous

__all__ = ["GaussianMixtureGuide"]


class GaussianMixtureGuide(AutoContinuous):
    r"""A fixed equal-weight mixture of :math:`P` full-covariance Gaussians over the flat
    unconstrained latent vector (the layout of ``AutoMultivariateNormal``).

    Args:
        model: the Pyro model; ``args, kwargs`` its data (traced once for the layout).
        locs: :math:`\mu_i`, shape ``(P, D)``.
        scale_trils: :math:`L_i`, lower triangular with positive diagonals, ``(P, D, D)``.

    ``median()`` and ``quantiles()`` are those of the moment-matched Gaussian (the mixture's
    mean and marginal sds), pushed through each site's constraint.
    """

    def __init__(self, model, args: tuple, kwargs: dict, locs: torch.Tensor, scale_trils: torch.Tensor) -> None:
        super().__init__(model)
        with pyro.poutine.block():
            self._setup_prototype(*args, **kwargs)
        dtype = torch.get_default_dtype()
        locs, scale_trils = (
            torch.as_tensor(locs, dtype=dtype).detach(),
            torch.as_tensor(scale_trils, dtype=dtype).detach(),
        )
        expected = (locs.shape[0], self.latent_dim)
        if locs.dim() != 2 or tuple(locs.shape) != expected or tuple(scale_trils.shape) != (*expected, self.latent_dim):
            raise ValueError(
                f"locs/scale_trils: expected shapes (P, {self.latent_dim}) and (P, {self.latent_dim}, "
                f"{self.latent_dim}); got {tuple(locs.shape)} and {tuple(scale_trils.shape)}"
            )
        if not bool((scale_trils.diagonal(dim1=-2, dim2=-1) > 0).all()):
            raise ValueError("scale_trils: expected positive diagonals")
        self.register_buffer("locs", locs)
        self.register_buffer("scale_trils", scale_trils)

    def get_posterior(self, *args, **kwargs):
        components = dist.MultivariateNormal(self.locs, scale_tril=self.scale_trils)
        logits = torch.full(self.locs.shape[:1], -math.log(self.locs.shape[0]), dtype=self.locs.dtype)
        return dist.MixtureSameFamily(dist.Categorical(logits=logits), components)

    def _loc_scale(self, *args, **kwargs):
        mean = self.locs.mean(0)
        # Law of total variance: within-component variance plus the spread of the means.
        within = (self.scale_trils**2).sum(-1).mean(0)
        between = ((self.locs - mean) ** 2).mean(0)
        return mean, (within + between).sqrt()
