r"""The model's log density on its unconstrained space, for a batch of points.

VI methods that work on the flat unconstrained vector :math:`z \in \mathbb R^D` (DADVI,
Pathfinder, batch-and-match) need :math:`\log p(x, T^{-1}(z)) + \log|\det J_{T^{-1}}(z)|` for a
``(B, D)`` batch, differentiable (twice, for Newton-type methods). A model that broadcasts over
an outer plate gets :class:`~vilab.inference.engine.potential.BatchedPotential` (one model run per
batch, checked against one-point runs); any other model with continuous latents gets
:class:`LoopedPotential`, which runs the model once per point and gives the same numbers.
"""

from __future__ import annotations

import warnings
from typing import Callable

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask

from vilab.inference.common.tracing import max_plate_nesting
from vilab.inference.engine.potential import (
    BatchedPotential,
    VectorizationError,
    _deterministic_shapes,
    _latent_sites,
    _sample_sites,
    _trace,
)

__all__ = ["LoopedPotential", "unconstrained_potential"]


class LoopedPotential(BatchedPotential):
    r"""A :class:`BatchedPotential` that evaluates a ``(B, D)`` batch one point at a time.

    Same flat layout (``sites``, ``dim``), ``constrain`` and ``unconstrain``; ``log_density``
    runs the unbatched model :math:`B` times, so it is exact for any model with continuous
    latents and :math:`B` times slower than a batched run.

    Raises:
        VectorizationError: the model has a discrete latent site or no continuous one.
    """

    def __init__(
        self, model: Callable, model_args: tuple = (), model_kwargs: dict | None = None, *, seed: int = 0
    ) -> None:  # noqa: D107 -- no batched check, unlike the parent
        self.model, self.model_args, self.model_kwargs = model, tuple(model_args), dict(model_kwargs or {})
        self.dtype = torch.get_default_dtype()
        with torch.random.fork_rng(), pyro.validation_enabled(False):
            torch.manual_seed(seed)
            trace = _trace(model, self.model_args, self.model_kwargs)
        self.max_plate_nesting = max_plate_nesting(trace, count_batch_dims=True)
        self.sites = _latent_sites(trace)
        self.deterministic_shapes = _deterministic_shapes(trace)
        self.dim = sum(site.size for site in self.sites)
        if self.dim == 0:
            raise VectorizationError("the model has no continuous latent sites")
        self.compiled, self.graph_module, self.mode = False, None, "loop"
        self._value_and_grad = self.eager_value_and_grad

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        r"""Log joint density in unconstrained space, shape ``(B,)``, differentiable in ``z``."""
        return torch.stack([self._one(z[b : b + 1]) for b in range(z.shape[0])])

    def deterministic(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Values of the ``pyro.deterministic`` sites, each ``(B, *site_shape)``, one model run
        per point."""
        if not self.deterministic_shapes:
            return {}
        values, _ = self.constrain(z)
        out = {name: [] for name in self.deterministic_shapes}
        with torch.no_grad(), pyro.validation_enabled(False):
            for b in range(z.shape[0]):
                data = {name: value[b] for name, value in values.items()}
                trace = _trace(poutine.condition(self.model, data=data), self.model_args, self.model_kwargs)
                for name in out:
                    out[name].append(trace.nodes[name]["value"].reshape(self.deterministic_shapes[name]))
        return {name: torch.stack(value) for name, value in out.items()}

    def _one(self, z: torch.Tensor) -> torch.Tensor:
        values, log_det = self.constrain(z)
        values = {name: value[0] for name, value in values.items()}
        with pyro.validation_enabled(False):
            trace = _trace(poutine.condition(self.model, data=values), self.model_args, self.model_kwargs)
        total = log_det[0]
        for _, site in _sample_sites(trace):
            if not site["infer"].get("_deterministic", False):
                log_prob = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
                total = total + torch.as_tensor(log_prob, dtype=self.dtype).sum()
        return total


def unconstrained_potential(
    model: Callable, args: tuple, kwargs: dict, *, batch_size: int, seed: int = 0
) -> BatchedPotential:
    """A batched potential when the model broadcasts over a batch of ``batch_size`` points,
    else (with a ``RuntimeWarning`` naming the reason) a :class:`LoopedPotential`; both give
    the same log density."""
    try:
        return BatchedPotential(model, args, kwargs, num_chains=batch_size, compile=False, seed=seed)
    except VectorizationError as error:
        looped = LoopedPotential(model, args, kwargs, seed=seed)  # re-raises for discrete latents
        warnings.warn(
            f"the model does not broadcast over a batch of points ({error}); its log density is "
            "evaluated one point at a time (same values, slower)",
            RuntimeWarning,
            stacklevel=3,
        )
        return looped
