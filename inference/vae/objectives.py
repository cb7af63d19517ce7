r"""Per-datapoint VAE objectives from Pyro traces, plus KL annealing and free bits.

For a model with a ``pyro.plate("data")`` over the batch, observed sites and latent sites
(e.g. ``"x"`` and ``"z"``), these helpers split the evidence lower bound per datapoint,

.. math::

    \mathrm{ELBO}(x) = \underbrace{\mathbb{E}_q[\log p(x \mid z)]}_{\text{reconstruction}}
    - \underbrace{\mathrm{KL}(q(z \mid x) \,\|\, p(z))}_{\text{rate}},

and give the importance-weighted bound with ``k`` samples,

.. math::

    \mathcal{L}_k(x) = \mathbb{E}\Big[\log \frac1k \sum_{i=1}^k
    \frac{p(x, z_i)}{q(z_i \mid x)}\Big], \quad z_i \sim q(z \mid x),

which tightens towards :math:`\log p(x)` as :math:`k` grows (Burda et al. 2016). KL annealing
(:class:`KLAnnealing`) and free bits (:func:`free_bits_kl`) act on the split terms, so models never
need a hand-written ``poutine.scale``. Losses are callables
``loss(model, guide, x, *, step) -> LossOutput``; any ``pyro.infer.ELBO`` can be wrapped with
:class:`PyroELBOLoss`.

References:
    Importance Weighted Autoencoders, Burda, Grosse & Salakhutdinov, 2016, arXiv:1509.00519.
    Generating Sentences from a Continuous Space (KL annealing), Bowman et al., 2016,
    arXiv:1511.06349.
    Improved Variational Inference with Inverse Autoregressive Flow (free bits), Kingma et al.,
    2016, arXiv:1606.04934.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch.distributions import Independent, Normal, kl_divergence

from vilab.types import ELBOTerms, Guide, LossOutput, Model

__all__ = [
    "ELBOTerms",
    "LossOutput",
    "KLAnnealing",
    "elbo_terms",
    "free_bits_kl",
    "log_importance_weights",
    "iwae_bound",
    "ELBOLoss",
    "IWAELoss",
    "PyroELBOLoss",
    "as_loss",
]


@dataclass(frozen=True)
class KLAnnealing:
    r"""KL weight :math:`\beta(t)` rising linearly from ``start`` to ``end`` over ``warmup_steps``.

    With ``num_cycles > 1`` the ramp repeats (cyclical annealing, Fu et al. 2019,
    arXiv:1903.10145): each cycle of ``warmup_steps`` steps ramps over its first half and holds
    ``end`` for the second half; after the last cycle :math:`\beta = ` ``end``.

    Args:
        warmup_steps: Optimiser steps of one ramp (cycle); 0 disables annealing.
        start: :math:`\beta(0)`.
        end: Final :math:`\beta`.
        num_cycles: Number of ramps.
    """

    warmup_steps: int = 0
    start: float = 0.0
    end: float = 1.0
    num_cycles: int = 1

    def __post_init__(self):
        if self.warmup_steps < 0 or self.num_cycles < 1:
            raise ValueError(
                f"KLAnnealing: expected warmup_steps >= 0 and num_cycles >= 1; got "
                f"{self.warmup_steps} and {self.num_cycles}"
            )

    def __call__(self, step: int) -> float:
        if self.warmup_steps == 0 or step >= self.warmup_steps * self.num_cycles:
            return self.end
        position = step % self.warmup_steps
        ramp = self.warmup_steps if self.num_cycles == 1 else self.warmup_steps / 2
        fraction = min(1.0, position / ramp)
        return self.start + (self.end - self.start) * fraction


def _per_datapoint(log_prob: torch.Tensor, batch_size: int) -> torch.Tensor:
    # Global sites (outside the data plate) have no batch dim: spread them evenly.
    if log_prob.dim() == 0 or log_prob.shape[-1] != batch_size:
        return log_prob.sum() / batch_size * torch.ones(batch_size, dtype=log_prob.dtype, device=log_prob.device)
    return log_prob.reshape(-1, batch_size).sum(0)


def _diagonal_normal(fn) -> Optional[Normal]:
    while isinstance(fn, Independent):
        if fn.reinterpreted_batch_ndims != 1:
            return None
        fn = fn.base_dist
    return fn if isinstance(fn, Normal) else None


def elbo_terms(model: Model, guide: Guide, x: torch.Tensor, *args, analytic_kl: bool = True, **kwargs) -> ELBOTerms:
    r"""Single-sample reconstruction and KL per datapoint.

    The KL of a latent site is analytic when ``analytic_kl`` and both ``q`` and ``p`` are
    diagonal Normals (then ``kl_per_dim`` is filled), else the one-sample estimate
    :math:`\log q(z) - \log p(z)`.

    Args:
        model: Pyro model ``model(x, *args, **kwargs)`` with observed sites and a data plate.
        guide: Pyro guide with the same signature.
        x: ``(batch, ...)`` data; its first dimension is the data plate.

    Returns:
        :class:`ELBOTerms` with ``(batch,)`` tensors.
    """
    batch = x.shape[0]
    guide_trace = poutine.trace(guide).get_trace(x, *args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, *args, **kwargs)
    reconstruction = x.new_zeros(batch)
    kl = x.new_zeros(batch)
    kl_per_dim, all_analytic = [], True
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if site["is_observed"]:
            reconstruction = reconstruction + _per_datapoint(site["fn"].log_prob(site["value"]), batch)
            continue
        q_fn, value = guide_trace.nodes[name]["fn"], site["value"]
        q_normal, p_normal = _diagonal_normal(q_fn), _diagonal_normal(site["fn"])
        if analytic_kl and q_normal is not None and p_normal is not None:
            per_dim = kl_divergence(q_normal, p_normal)
            kl_per_dim.append(per_dim)
            kl = kl + _per_datapoint(per_dim.sum(-1), batch)
        else:
            all_analytic = False
            kl = kl + _per_datapoint(q_fn.log_prob(value) - site["fn"].log_prob(value), batch)
    per_dim = torch.cat(kl_per_dim, -1) if kl_per_dim and all_analytic else None
    return ELBOTerms(reconstruction, kl, per_dim)


def free_bits_kl(terms: ELBOTerms, free_bits: float) -> torch.Tensor:
    r"""KL with free bits, summed over the batch: :math:`\sum_j \max(\lambda, \bar{\mathrm{KL}}_j)\,N`.

    :math:`\bar{\mathrm{KL}}_j` is the batch-mean KL of latent dimension :math:`j` when the
    per-dimension KL is known, otherwise of the whole latent vector (one group); ``free_bits``
    :math:`\lambda` is in nats per group. Below :math:`\lambda` the group's KL has no gradient,
    which keeps units from collapsing early in training.
    """
    if free_bits < 0:
        raise ValueError(f"free_bits: expected a non-negative number of nats; got {free_bits}")
    batch = terms.kl.shape[0]
    if free_bits == 0:
        return terms.kl.sum()
    groups = terms.kl_per_dim if terms.kl_per_dim is not None else terms.kl.unsqueeze(-1)
    return groups.mean(0).clamp_min(free_bits).sum() * batch


def _vectorized(fn: Callable, num_samples: int, dim: int) -> Callable:
    def wrapped(*args, **kwargs):
        with pyro.plate("importance_samples", num_samples, dim=dim):
            return fn(*args, **kwargs)

    return wrapped


def log_importance_weights(
    model: Model, guide: Guide, x: torch.Tensor, *args, num_samples: int, **kwargs
) -> torch.Tensor:
    r""":math:`\log p(x, z_i) - \log q(z_i \mid x)` for ``num_samples`` draws per datapoint.

    Vectorized with a ``pyro.plate`` at dim ``-2``, so the model's data plate must be at
    ``dim=-1`` (as in :class:`~vilab.models.vae.vae.VAEModel`).

    Returns:
        ``(num_samples, batch)`` log-weights (reparameterized, so gradients flow).
    """
    batch = x.shape[0]
    vec_guide = _vectorized(guide, num_samples, -2)
    vec_model = _vectorized(model, num_samples, -2)
    guide_trace = poutine.trace(vec_guide).get_trace(x, *args, **kwargs)
    model_trace = poutine.trace(poutine.replay(vec_model, trace=guide_trace)).get_trace(x, *args, **kwargs)
    log_w = x.new_zeros(num_samples, batch)
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            log_w = log_w + site["fn"].log_prob(site["value"]).expand(num_samples, batch)
            if not site["is_observed"]:
                guide_site = guide_trace.nodes[name]
                log_w = log_w - guide_site["fn"].log_prob(guide_site["value"]).expand(num_samples, batch)
    return log_w


def iwae_bound(model: Model, guide: Guide, x: torch.Tensor, *args, num_samples: int, **kwargs) -> torch.Tensor:
    r"""The importance-weighted bound :math:`\mathcal{L}_k(x)` per datapoint, ``(batch,)``."""
    log_w = log_importance_weights(model, guide, x, *args, num_samples=num_samples, **kwargs)
    return torch.logsumexp(log_w, 0) - math.log(num_samples)


class ELBOLoss:
    r"""Negative ELBO per datapoint with optional KL annealing and free bits.

    .. math:: \text{loss} = -\frac1N \sum_n \big[\text{rec}_n\big] + \beta(t)\,
        \frac1N \mathrm{KL}_{\text{free bits}}

    Args:
        analytic_kl: Closed-form KL where ``q`` and ``p`` are diagonal Normals.
        beta: A constant KL weight or a schedule ``step -> beta`` (e.g. :class:`KLAnnealing`).
        free_bits: :math:`\lambda` of :func:`free_bits_kl` (0 disables).
    """

    def __init__(
        self, *, analytic_kl: bool = True, beta: Union[float, Callable[[int], float]] = 1.0, free_bits: float = 0.0
    ):
        self.analytic_kl, self.beta, self.free_bits = analytic_kl, beta, free_bits

    def __call__(self, model: Model, guide: Guide, x: torch.Tensor, *, step: int = 0) -> LossOutput:
        terms = elbo_terms(model, guide, x, analytic_kl=self.analytic_kl)
        beta = self.beta(step) if callable(self.beta) else float(self.beta)
        batch = x.shape[0]
        loss = (-terms.reconstruction.sum() + beta * free_bits_kl(terms, self.free_bits)) / batch
        metrics = {
            "elbo": terms.elbo.mean().detach(),
            "kl": terms.kl.mean().detach(),
            "reconstruction": terms.reconstruction.mean().detach(),
            "beta": torch.tensor(beta),
        }
        return LossOutput(loss, metrics)


class IWAELoss:
    """Negative importance-weighted bound per datapoint with ``num_samples`` samples (IWAE)."""

    def __init__(self, num_samples: int = 5):
        if num_samples < 1:
            raise ValueError(f"num_samples: expected a positive integer; got {num_samples}")
        self.num_samples = num_samples

    def __call__(self, model: Model, guide: Guide, x: torch.Tensor, *, step: int = 0) -> LossOutput:
        bound = iwae_bound(model, guide, x, num_samples=self.num_samples)
        return LossOutput(-bound.mean(), {"iwae": bound.mean().detach()})


class PyroELBOLoss:
    """Adapter: any ``pyro.infer.ELBO`` (``Trace_ELBO``, ``TraceMeanField_ELBO``...) as a loss."""

    def __init__(self, elbo: pyro.infer.ELBO):
        self.elbo = elbo

    def __call__(self, model: Model, guide: Guide, x: torch.Tensor, *, step: int = 0) -> LossOutput:
        loss = self.elbo.differentiable_loss(model, guide, x) / x.shape[0]
        return LossOutput(loss, {"elbo": -loss.detach()})


def as_loss(loss) -> Callable[..., LossOutput]:
    """Accept a loss callable, a ``pyro.infer.ELBO`` or a name (``"elbo"``, ``"trace"``, ``"iwae"``)."""
    if isinstance(loss, pyro.infer.ELBO):
        return PyroELBOLoss(loss)
    if loss == "elbo":
        return ELBOLoss()
    if loss == "trace":
        return PyroELBOLoss(pyro.infer.Trace_ELBO())
    if loss == "iwae":
        return IWAELoss()
    if callable(loss):
        return loss
    raise ValueError(f"loss: expected a callable, a pyro.infer.ELBO or one of 'elbo', 'trace', 'iwae'; got {loss!r}")
