r"""Structured guide for the deep Markov model: a backward RNN and a combiner.

.. math::

    q(z_{1:T} \mid x_{1:T}) = \prod_{t=1}^T q(z_t \mid z_{t-1}, x_{t:T}), \qquad
    h^{\text{comb}}_t = \tfrac12\big(\tanh(W z_{t-1} + b) + h^{\text{rnn}}_t\big),

with :math:`h^{\text{rnn}}_t` the state of a GRU run over :math:`x_T, \dots, x_t` and
:math:`q(z_t \mid \cdot) = \mathcal{N}(\mu(h^{\text{comb}}_t), \operatorname{diag}
\sigma(h^{\text{comb}}_t)^2)`: the "ST-R" guide of Krishnan et al., which conditions on the
future observations and the previous latent, as the true posterior's Markov structure does.

References:
    Structured Inference Networks for Nonlinear State Space Models, Krishnan, Shalit &
    Sontag, 2017, arXiv:1609.09869.
"""

from __future__ import annotations

from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Combiner", "DMMGuide"]


class Combiner(nn.Module):
    r""":math:`(z_{t-1}, h^{\text{rnn}}_t) \mapsto (\mu_t, \sigma_t)` of :math:`q(z_t \mid \cdot)`.

    Args:
        latent_dim: ``D``.
        rnn_dim: ``H``, the GRU state size.
    """

    def __init__(self, latent_dim: int, rnn_dim: int):
        super().__init__()
        self.lift = nn.Linear(latent_dim, rnn_dim)
        self.loc = nn.Linear(rnn_dim, latent_dim)
        self.scale = nn.Linear(rnn_dim, latent_dim)

    def forward(self, z_previous: torch.Tensor, h_rnn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z_previous`` ``(..., N, D)`` and ``h_rnn`` ``(N, H)`` -> two ``(..., N, D)``."""
        h = 0.5 * (torch.tanh(self.lift(z_previous)) + h_rnn)
        return self.loc(h), F.softplus(self.scale(h)) + 1e-4


class DMMGuide(nn.Module):
    """The structured guide ``guide(x)`` for :class:`~vilab.models.vae.dmm.DeepMarkovModel`.

    Samples ``"z_1"`` ... ``"z_T"`` (each ``(N, D)``) inside ``pyro.plate("data", N, dim=-1)``.

    Args:
        input_dim: ``F``, features per step.
        latent_dim: ``D``.
        rnn_dim: GRU state size ``H``.
    """

    def __init__(self, input_dim: int, latent_dim: int, rnn_dim: int = 128):
        super().__init__()
        self.input_dim, self.latent_dim = input_dim, latent_dim
        self.rnn = nn.GRU(input_dim, rnn_dim, batch_first=True)
        self.combiner = Combiner(latent_dim, rnn_dim)
        self.z_q_0 = nn.Parameter(torch.zeros(latent_dim))

    def rnn_states(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, F) -> (N, T, H)``: state at ``t`` has read ``x_T ... x_t``."""
        if x.dim() != 3 or x.shape[-1] != self.input_dim:
            raise ValueError(f"x: expected sequences of shape (N, T, {self.input_dim}); got {tuple(x.shape)}")
        states, _ = self.rnn(x.flip(1))
        return states.flip(1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Sample :math:`z_{1:T}`; return them stacked, ``(..., N, T, D)``."""
        h_rnn = self.rnn_states(x)
        z = self.z_q_0.expand(x.shape[0], self.latent_dim)
        draws = []
        with pyro.plate("data", x.shape[0], dim=-1):
            for t in pyro.markov(range(x.shape[1])):
                loc, scale = self.combiner(z, h_rnn[:, t])
                z = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1))
                draws.append(z)
        return torch.stack(draws, -2)
