r"""Amortized vs iterative inference: local refinement of an encoder's :math:`q(z \mid x)` and
the gap decomposition of Cremer et al.

For a trained VAE with encoder guide :math:`q_\phi(z \mid x)` and a test point :math:`x`,

.. math::

    \log p(x) - \mathrm{ELBO}(q_\phi)
    = \underbrace{\log p(x) - \mathrm{ELBO}(q^*_x)}_{\text{approximation gap}}
    + \underbrace{\mathrm{ELBO}(q^*_x) - \mathrm{ELBO}(q_\phi)}_{\text{amortization gap}},

where :math:`q^*_x` is the best member of the variational family *for this one point*, found
by optimising per-datapoint variational parameters :math:`\lambda_x` (fully iterative
inference). Semi-amortized inference (Kim et al. 2018) starts :math:`\lambda_x` at the
encoder's output and takes ``K`` gradient steps; :func:`refine_locally` does both, with
``num_steps`` = ``K`` or "until converged" and ``init="encoder"`` or ``"prior"``.

Local parameters :math:`\lambda_x`: the Gaussian's ``loc`` and log-scale (mean-field guide);
for an :class:`~vilab.guides.amortized.flows.AmortizedFlowGuide` also the context vector
:math:`h` that sets the flow's per-datapoint parameters (the flow networks stay fixed), so
the local family is "this flow with any context", a subset of the fully local flow family of
Cremer et al., which also frees the flow network weights.

References:
    Inference Suboptimality in Variational Autoencoders, Cremer, Li & Duvenaud, 2018,
    arXiv:1801.03558.
    Semi-Amortized Variational Autoencoders, Kim, Wiseman, Miller, Sontag & Rush, 2018,
    arXiv:1802.02550.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from vilab.inference.vae.objectives import elbo_terms, log_importance_weights

__all__ = [
    "LocalGuide",
    "RefinementResult",
    "GapReport",
    "refine_locally",
    "gap_decomposition",
    "monte_carlo_elbo",
    "importance_log_likelihood",
]


def _inverse_softplus(value: torch.Tensor) -> torch.Tensor:
    return value + torch.log(-torch.expm1(-value))


class LocalGuide(nn.Module):
    r"""Per-datapoint variational parameters for a fixed batch of ``N`` points.

    :math:`q(z_n) = T_{h_n}\big(\mathcal{N}(\mu_n, \operatorname{diag}\sigma_n^2)\big)` with
    free :math:`\mu_n, \sigma_n` and, when ``transforms`` is given, a free context
    :math:`h_n` for the conditional flow :math:`T`. A Pyro guide ``guide(x)`` that samples
    ``"z"`` ``(N, D)`` in ``pyro.plate("data", N, dim=-1)``; ``x`` only fixes the batch size.

    Args:
        loc: ``(N, D)`` initial means.
        scale: ``(N, D)`` initial standard deviations.
        context: ``(N, H)`` initial flow contexts, or ``None`` for a Gaussian.
        transforms: Conditional transforms (``.condition(h)``), kept fixed, or ``None``.
    """

    def __init__(
        self,
        loc: torch.Tensor,
        scale: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        transforms: Optional[nn.ModuleList] = None,
    ):
        super().__init__()
        if loc.shape != scale.shape or loc.dim() != 2:
            raise ValueError(
                f"loc, scale: expected equal shapes (N, D); got {tuple(loc.shape)} and {tuple(scale.shape)}"
            )
        if (context is None) != (transforms is None):
            raise ValueError("context, transforms: expected both or neither")
        self.loc = nn.Parameter(loc.detach().clone())
        self.raw_scale = nn.Parameter(_inverse_softplus(scale.detach().clamp_min(1e-4)))
        self.context = None if context is None else nn.Parameter(context.detach().clone())
        # Stored outside the module tree so the local optimiser never sees the flow weights.
        self.__dict__["_transforms"] = transforms

    @property
    def num_points(self) -> int:
        return self.loc.shape[0]

    def distribution(self, x: Optional[torch.Tensor] = None) -> dist.TorchDistribution:
        """:math:`q(z_n)`: batch shape ``(N,)``, event shape ``(D,)``."""
        base = dist.Normal(self.loc, F.softplus(self.raw_scale) + 1e-5).to_event(1)
        if self._transforms is None:
            return base
        return dist.TransformedDistribution(base, [t.condition(self.context) for t in self._transforms])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.shape[0] != self.num_points:
            raise ValueError(f"x: this local guide holds {self.num_points} points; got a batch of {x.shape[0]}")
        with pyro.plate("data", self.num_points, dim=-1):
            return pyro.sample("z", self.distribution(x))


def _initial_local(guide: nn.Module, x: torch.Tensor, init: str) -> LocalGuide:
    encoder = getattr(guide, "encoder", None)
    if encoder is None:
        raise TypeError(
            f"guide: expected an amortized guide with an `encoder` (AmortizedNormalGuide"
            f" or AmortizedFlowGuide); got {type(guide).__name__}"
        )
    if getattr(guide, "latent_dim", encoder.latent_dim) != encoder.latent_dim:
        # A two-level guide's encoder gives only q(z2 | x); its z1 has no local parameters here.
        raise TypeError(
            f"guide: local refinement needs a one-level guide whose encoder gives all "
            f"of z; got {type(guide).__name__} with {guide.latent_dim} latent numbers "
            f"and an encoder of {encoder.latent_dim}"
        )
    transforms = getattr(guide, "transforms", None)
    with torch.no_grad():
        h = encoder.features(x)
        loc, scale = encoder.head(h)
    if init == "prior":
        loc, scale = torch.zeros_like(loc), torch.ones_like(scale)
    elif init != "encoder":
        raise ValueError(f"init: expected 'encoder' or 'prior'; got {init!r}")
    return LocalGuide(loc, scale, h if transforms is not None else None, transforms)


class RefinementResult(NamedTuple):
    """The refined :class:`LocalGuide` and the batch-mean ELBO estimate after each step."""

    guide: LocalGuide
    elbo_trace: list[float]


def refine_locally(
    model: nn.Module,
    guide: nn.Module,
    x: torch.Tensor,
    *,
    num_steps: int = 100,
    learning_rate: float = 1e-2,
    num_particles: int = 1,
    init: str = "encoder",
) -> RefinementResult:
    r"""Optimise per-datapoint variational parameters for the batch ``x`` (model kept fixed).

    ``init="encoder"`` and a small ``num_steps`` is semi-amortized inference (SA-VAE's
    refinement); many steps approximate :math:`q^*_x`; ``init="prior"`` is fully iterative
    (classic SVI, no encoder).

    Args:
        model: VAE model ``model(x)`` (an ``nn.Module``; its parameters are not changed).
        guide: The amortized guide whose family (and, for ``"encoder"``, output) is used.
        x: ``(N, ...)`` batch.
        num_steps: Adam steps ``K``.
        learning_rate: Adam step size.
        num_particles: Samples per ELBO estimate per step.
        init: ``"encoder"`` or ``"prior"`` (``N(0, I)`` base, encoder context for flows).
    """
    if num_steps < 0 or num_particles < 1:
        raise ValueError(f"num_steps, num_particles: expected >= 0 and >= 1; got {num_steps}, {num_particles}")
    local = _initial_local(guide, x, init)
    optimizer = torch.optim.Adam(local.parameters(), lr=learning_rate)
    frozen = [p for p in list(model.parameters()) + list(guide.parameters()) if p.requires_grad]
    trace = []
    try:
        for p in frozen:
            p.requires_grad_(False)
        for _ in range(num_steps):
            elbo = sum(elbo_terms(model, local, x).elbo for _ in range(num_particles))
            loss = -(elbo / num_particles).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trace.append(-loss.item() / x.shape[0])
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return RefinementResult(local, trace)


@torch.no_grad()
def monte_carlo_elbo(model: nn.Module, guide: Any, x: torch.Tensor, *, num_samples: int = 100) -> torch.Tensor:
    """Per-datapoint ELBO averaged over ``num_samples`` draws, ``(N,)`` (analytic KL if Gaussian)."""
    return torch.stack([elbo_terms(model, guide, x).elbo for _ in range(num_samples)]).mean(0)


@torch.no_grad()
def importance_log_likelihood(
    model: nn.Module, guide: Any, x: torch.Tensor, *, num_samples: int = 1000, chunk_size: int = 250
) -> torch.Tensor:
    r""":math:`\log \frac1K \sum_k p(x, z_k)/q(z_k)` per datapoint, ``(N,)``, in chunks."""
    log_sum, done = x.new_full((x.shape[0],), -math.inf), 0
    while done < num_samples:
        size = min(chunk_size, num_samples - done)
        log_w = log_importance_weights(model, guide, x, num_samples=size)
        log_sum = torch.logaddexp(log_sum, torch.logsumexp(log_w, 0))
        done += size
    return log_sum - math.log(num_samples)


class GapReport(NamedTuple):
    r"""Means over the batch (nats) and per-example values of the gap decomposition.

    Attributes:
        log_likelihood: IS estimate of :math:`\log p(x)` (proposal: the refined local guide).
        elbo_amortized: ELBO of the encoder's :math:`q_\phi(z \mid x)`.
        elbo_local: ELBO of the locally optimised :math:`q^*_x`.
        approximation_gap: ``log_likelihood - elbo_local``.
        amortization_gap: ``elbo_local - elbo_amortized``.
        stderr: Standard errors over the batch of the five quantities above (same keys).
        per_example: ``{name: (N,)}`` tensors.
    """

    log_likelihood: float
    elbo_amortized: float
    elbo_local: float
    approximation_gap: float
    amortization_gap: float
    stderr: dict
    per_example: dict


def gap_decomposition(
    model: nn.Module,
    guide: nn.Module,
    x: torch.Tensor,
    *,
    refine_steps: int = 500,
    learning_rate: float = 1e-2,
    num_particles: int = 1,
    elbo_samples: int = 100,
    iw_samples: int = 1000,
) -> GapReport:
    """Amortization and approximation gaps of ``guide`` on the batch ``x`` (Cremer et al.).

    The local optimum is approximated by ``refine_steps`` Adam steps from the encoder's
    output; ``log p(x)`` by importance sampling with the refined guide as proposal.
    """
    local = refine_locally(
        model, guide, x, num_steps=refine_steps, learning_rate=learning_rate, num_particles=num_particles
    ).guide
    values = {
        "elbo_amortized": monte_carlo_elbo(model, guide, x, num_samples=elbo_samples),
        "elbo_local": monte_carlo_elbo(model, local, x, num_samples=elbo_samples),
        "log_likelihood": importance_log_likelihood(model, local, x, num_samples=iw_samples),
    }
    values["approximation_gap"] = values["log_likelihood"] - values["elbo_local"]
    values["amortization_gap"] = values["elbo_local"] - values["elbo_amortized"]
    n = x.shape[0]
    means = {k: float(v.mean()) for k, v in values.items()}
    stderr = {k: float(v.std()) / math.sqrt(n) if n > 1 else math.nan for k, v in values.items()}
    return GapReport(**means, stderr=stderr, per_example={k: v.cpu() for k, v in values.items()})
