r"""Deep Markov model: a nonlinear state-space model with neural transitions and emissions.

For ``N`` sequences :math:`x_{1:T}` with ``F`` features per step:

.. math::

    z_t \mid z_{t-1} \sim \mathcal{N}\big(\mu_\theta(z_{t-1}), \operatorname{diag}
    \sigma_\theta(z_{t-1})^2\big), \qquad
    x_t \mid z_t \sim \mathrm{Bernoulli}(\sigma(g_\theta(z_t)))
    \ \text{or}\ \mathcal{N}(g_\theta(z_t), \operatorname{diag} s^2),

with a learned :math:`z_0` and the gated transition of Krishnan et al.:
:math:`\mu = (1 - \gamma) \odot (W z_{t-1} + b) + \gamma \odot \tilde\mu(z_{t-1})`,
:math:`\gamma = \mathrm{sigmoid}(\cdot)`. Sites: ``"z_t"`` ``(N, D)`` and ``"x_t"`` ``(N, F)``
for ``t = 1..T`` in ``pyro.plate("data", N, dim=-1)``, so the IWAE and evaluation helpers of
:mod:`vilab.inference.vae.objectives` and :mod:`vilab.inference.vae.evaluation` apply unchanged.
The guide is :class:`~vilab.guides.amortized.dmm.DMMGuide`.

References:
    Structured Inference Networks for Nonlinear State Space Models, Krishnan, Shalit &
    Sontag, 2017, arXiv:1609.09869.
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from vilab.guides.amortized.dmm import DMMGuide

__all__ = ["GatedTransition", "Emitter", "DeepMarkovModel", "DMM", "LIKELIHOODS"]

LIKELIHOODS = ("bernoulli", "normal")


class GatedTransition(nn.Module):
    """``z_{t-1} (..., D) -> (loc, scale)`` of :math:`p(z_t \\mid z_{t-1})` (gated, see module)."""

    def __init__(self, latent_dim: int, hidden_dim: int):
        super().__init__()
        self.gate = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, latent_dim), nn.Sigmoid()
        )
        self.proposal = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, latent_dim))
        self.linear = nn.Linear(latent_dim, latent_dim)
        nn.init.eye_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.scale = nn.Linear(latent_dim, latent_dim)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, proposed = self.gate(z), self.proposal(z)
        loc = (1 - gate) * self.linear(z) + gate * proposed
        return loc, F.softplus(self.scale(F.relu(proposed))) + 1e-4


class Emitter(nn.Module):
    """``z_t (..., D) -> `` Bernoulli logits or Normal means ``(..., F)``."""

    def __init__(self, latent_dim: int, output_dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class DeepMarkovModel(nn.Module):
    """The generative model ``model(x)`` of the module docstring.

    Args:
        input_dim: ``F``.
        latent_dim: ``D``.
        likelihood: ``"bernoulli"`` or ``"normal"`` (with a learned per-feature scale).
        transition_dim: Hidden width of the transition networks.
        emission_dim: Hidden width of the emitter.
    """

    def __init__(
        self,
        input_dim: int,
        latent_dim: int,
        *,
        likelihood: str = "bernoulli",
        transition_dim: int = 64,
        emission_dim: int = 64,
    ):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood: expected one of {', '.join(LIKELIHOODS)}; got {likelihood!r}")
        self.input_dim, self.latent_dim, self.likelihood = input_dim, latent_dim, likelihood
        self.transition = GatedTransition(latent_dim, transition_dim)
        self.emitter = Emitter(latent_dim, input_dim, emission_dim)
        self.z_0 = nn.Parameter(torch.zeros(latent_dim))
        self.raw_obs_scale = nn.Parameter(torch.full((input_dim,), -1.0))

    def emission(self, z: torch.Tensor) -> dist.TorchDistribution:
        r""":math:`p(x_t \mid z_t)` with event shape ``(F,)``."""
        out = self.emitter(z)
        if self.likelihood == "bernoulli":
            return dist.Bernoulli(logits=out).to_event(1)
        return dist.Normal(out, F.softplus(self.raw_obs_scale) + 1e-3).to_event(1)

    def emission_mean(self, z: torch.Tensor) -> torch.Tensor:
        out = self.emitter(z)
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out

    def forward(
        self, x: Optional[torch.Tensor] = None, *, batch_size: Optional[int] = None, num_steps: Optional[int] = None
    ) -> torch.Tensor:
        """Score ``x`` ``(N, T, F)``, or with ``x=None`` draw ``batch_size`` sequences of
        ``num_steps``; returns the latent path ``(..., N, T, D)``."""
        if x is not None:
            if x.dim() != 3 or x.shape[-1] != self.input_dim:
                raise ValueError(f"x: expected sequences of shape (N, T, {self.input_dim}); got {tuple(x.shape)}")
            batch_size, num_steps = x.shape[0], x.shape[1]
        elif batch_size is None or num_steps is None:
            raise ValueError("batch_size, num_steps: expected integers when x is None")
        z = self.z_0.expand(batch_size, self.latent_dim)
        path = []
        with pyro.plate("data", batch_size, dim=-1):
            for t in pyro.markov(range(num_steps)):
                loc, scale = self.transition(z)
                z = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1))
                pyro.sample(f"x_{t + 1}", self.emission(z), obs=None if x is None else x[:, t])
                path.append(z)
        return torch.stack(path, -2)


class DMM(nn.Module):
    """Model and structured guide bundled, with reconstructions and forecasts.

    Args:
        input_dim, latent_dim, likelihood, transition_dim, emission_dim: See
            :class:`DeepMarkovModel`.
        rnn_dim: GRU size of :class:`~vilab.guides.amortized.dmm.DMMGuide`.
    """

    def __init__(
        self,
        input_dim: int,
        latent_dim: int,
        *,
        likelihood: str = "bernoulli",
        transition_dim: int = 64,
        emission_dim: int = 64,
        rnn_dim: int = 128,
    ):
        super().__init__()
        self.model = DeepMarkovModel(
            input_dim, latent_dim, likelihood=likelihood, transition_dim=transition_dim, emission_dim=emission_dim
        )
        self.guide = DMMGuide(input_dim, latent_dim, rnn_dim)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Emission means at one draw :math:`z_{1:T} \\sim q(\\cdot \\mid x)`: ``(N, T, F)``."""
        return self.model.emission_mean(self.guide(x))

    @torch.no_grad()
    def forecast(self, x_context: torch.Tensor, num_ahead: int, *, num_samples: int = 1) -> torch.Tensor:
        r"""Infer :math:`z_{1:T_0}` from ``x_context`` ``(N, T_0, F)``, roll the transition
        ``num_ahead`` steps on, and return emission means ``(num_samples, N, num_ahead, F)``."""
        if num_ahead < 1:
            raise ValueError(f"num_ahead: expected a positive integer; got {num_ahead}")
        z = self.guide(x_context.expand(num_samples, *x_context.shape).reshape(-1, *x_context.shape[1:]))[..., -1, :]
        means = []
        for _ in range(num_ahead):
            loc, scale = self.model.transition(z)
            z = loc + scale * torch.randn_like(loc)
            means.append(self.model.emission_mean(z))
        return torch.stack(means, -2).reshape(num_samples, *x_context.shape[:1], num_ahead, -1)
