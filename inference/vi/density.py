r"""The model's log density on the unconstrained space, for methods that call it directly.

Pathfinder and batch-and-match need :math:`\log p(x, T^{-1}(z)) + \log|\det J_{T^{-1}}(z)|`
and its gradient at a ``(B, D)`` batch of flat unconstrained points, in the layout of
:class:`~vilab.inference.engine.potential.BatchedPotential`. Where the model passes the batching
checks (under an outer plate or ``torch.func.vmap``) the batch is one model run; where it does
not (Python control flow on latent values), the points are evaluated one at a time by
:class:`~vilab.inference.vi.potential.LoopedPotential`, the same fallback DADVI uses, so the
answer is the same and only slower. Every evaluation is counted, so the methods
can report how many log-density gradients they used.
"""

from __future__ import annotations

import torch

from vilab.inference.engine.potential import VectorizationError
from vilab.inference.vi.potential import LoopedPotential, unconstrained_potential

__all__ = ["LogDensity"]


class LogDensity:
    r"""Batched unconstrained log density and score of a Pyro model, with evaluation counts.

    Args:
        model: the Pyro model; ``args, kwargs`` its data.
        seed: seed of the prior trace that fixes the latent layout and of the batching checks.

    Attributes:
        potential: the :class:`BatchedPotential` (its ``sites``, ``dim``, ``constrain``).
        batched: whether a batch is one model run (``False``: one point at a time).
        gradient_evaluations: points at which the score was evaluated so far.
        density_evaluations: points at which only the density was evaluated so far.

    Raises:
        ValueError: the model has a discrete latent site or no continuous latent site.
    """

    def __init__(self, model, args: tuple, kwargs: dict, *, seed: int = 0) -> None:
        try:
            self.potential = unconstrained_potential(model, args, kwargs, batch_size=2, seed=seed)
        except VectorizationError as error:  # a discrete latent, or no continuous one
            raise ValueError(f"model: {error}; these methods fit continuous latents only") from error
        self.batched = not isinstance(self.potential, LoopedPotential)
        self.dim = self.potential.dim
        self.gradient_evaluations = 0
        self.density_evaluations = 0

    def value_and_score(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`\log p(z)` ``(B,)`` and :math:`\nabla_z \log p(z)` ``(B, D)`` at ``z`` ``(B, D)``."""
        self.gradient_evaluations += z.shape[0]
        potential, grad = self.potential.eager_value_and_grad(z)
        return -potential, -grad

    @torch.no_grad()
    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(z)` ``(B,)`` at ``z`` ``(B, D)``, without gradients."""
        self.density_evaluations += z.shape[0]
        return self.potential.log_density(z)

    def initial_points(self, num_points: int, generator: torch.Generator, max_tries: int = 100) -> torch.Tensor:
        """``(num_points, D)`` starts uniform on (-2, 2) in unconstrained space (as Stan's),
        each redrawn until its log density and score are finite."""
        dtype = torch.get_default_dtype()
        z = 4.0 * torch.rand(num_points, self.dim, generator=generator, dtype=dtype) - 2.0
        for _ in range(max_tries):
            value, score = self.value_and_score(z)
            bad = ~(torch.isfinite(value) & torch.isfinite(score).all(-1))
            if not bool(bad.any()):
                return z
            z = torch.where(bad.unsqueeze(-1), 4.0 * torch.rand(z.shape, generator=generator, dtype=dtype) - 2.0, z)
        raise ValueError(f"model: no finite log density found in {max_tries} uniform(-2, 2) initialisations")
