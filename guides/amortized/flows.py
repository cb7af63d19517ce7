r"""Amortized encoder + normalizing flow guides for VAEs.

The guide draws :math:`z_0 \sim \mathcal{N}(\mu(x), \operatorname{diag}\sigma(x)^2)` from a
Gaussian encoder and pushes it through :math:`K` flow steps whose parameters are functions of
the encoder's hidden features :math:`h(x)`:

.. math::

    z_K = f_K \circ \dots \circ f_1(z_0; h(x)), \qquad
    \log q(z_K \mid x) = \log q_0(z_0 \mid x) - \sum_{k=1}^K \log\left|\det
    \frac{\partial f_k}{\partial z_{k-1}}\right|.

Flows (all Pyro ``conditional_*`` transforms except Sylvester, which Pyro has only unconditioned):

* ``"planar"``, ``"radial"``: Rezende & Mohamed, Variational Inference with Normalizing Flows,
  2015, arXiv:1505.05770.
* ``"sylvester"``: van den Berg et al., Sylvester Normalizing Flows for Variational Inference,
  2018, arXiv:1803.05649 (Householder variant, per-datapoint parameters; written here).
* ``"iaf"``: Kingma et al., Improved Variational Inference with Inverse Autoregressive Flow,
  2016, arXiv:1606.04934 (gated "stable" update, alternating variable order).
* ``"spline"``: Durkan et al., Neural Spline Flows, 2019, arXiv:1906.04032 (autoregressive
  linear rational-quadratic splines; Dolatabadi et al. 2020, arXiv:2001.05168).
"""

from __future__ import annotations

from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.transforms import (
    ConditionalAffineAutoregressive,
    ConditionalPlanar,
    ConditionalRadial,
    ConditionalSplineAutoregressive,
)
from pyro.nn import ConditionalAutoRegressiveNN, DenseNN
from torch import nn
from torch.distributions import constraints

from vilab.guides.amortized.encoders import _empirical_quantiles

__all__ = ["FLOWS", "ConditionalSylvester", "AmortizedFlowGuide", "build_conditional_flow"]

FLOWS = ("planar", "radial", "sylvester", "iaf", "spline")
_INVERTIBLE = ("iaf", "spline")


class _ConditionedSylvester(dist.transforms.Transform):
    r"""Sylvester step with per-datapoint parameters (see :class:`ConditionalSylvester`)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, q_matrix, r_matrix, r_tilde, bias):
        super().__init__(cache_size=1)
        self.q_matrix, self.r_matrix, self.r_tilde, self.bias = q_matrix, r_matrix, r_tilde, bias
        self._cached_log_det = None

    def _call(self, x):
        qt_x = (self.q_matrix.transpose(-1, -2) @ x.unsqueeze(-1)).squeeze(-1)
        preactivation = (self.r_tilde @ qt_x.unsqueeze(-1)).squeeze(-1) + self.bias
        hidden = torch.tanh(preactivation)
        a_matrix = self.q_matrix @ self.r_matrix
        y = x + (a_matrix @ hidden.unsqueeze(-1)).squeeze(-1)
        diagonal = torch.diagonal(self.r_matrix, dim1=-2, dim2=-1) * torch.diagonal(self.r_tilde, dim1=-2, dim2=-1)
        self._cached_log_det = torch.log1p((1 - hidden.pow(2)) * diagonal).sum(-1)
        return y

    def _inverse(self, y):
        raise NotImplementedError(
            "the Sylvester flow has no analytic inverse; only its own samples (cached) can be scored"
        )

    def log_abs_det_jacobian(self, x, y):
        x_old, y_old = self._cached_x_y
        if x is not x_old or y is not y_old:
            self(x)  # recompute the cached log-det for this x
        return self._cached_log_det


class ConditionalSylvester(ConditionalTransformModule):
    r"""Householder-Sylvester flow step with parameters produced from a context by a network.

    .. math::

        f(z) = z + Q R \tanh(\tilde R Q^\top z + b), \qquad
        \log|\det J_f| = \sum_i \log\left(1 + (1 - \tanh^2(\cdot)_i) R_{ii}\tilde R_{ii}\right),

    with :math:`Q` a product of ``num_householder`` Householder reflections, :math:`R,\tilde R`
    upper triangular with diagonals in :math:`(-1, 1)` (``tanh``), which keeps
    :math:`1 + h' R_{ii}\tilde R_{ii} > 0`, so the step is invertible.

    Args:
        input_dim: ``D``.
        context_dim: Size of the context :math:`h(x)`.
        hidden_dims: Hidden widths of the parameter network.
        num_householder: Number of reflections in :math:`Q`.

    References:
        Sylvester Normalizing Flows for Variational Inference, van den Berg, Hasenclever,
        Tomczak & Welling, 2018, arXiv:1803.05649.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, input_dim: int, context_dim: int, hidden_dims: Sequence[int], *, num_householder: int = 8):
        super().__init__()
        self.input_dim, self.num_householder = input_dim, num_householder
        d = input_dim
        self.nn = DenseNN(context_dim, list(hidden_dims), param_dims=[d * d, d * d, d, d, d, num_householder * d])
        self.register_buffer("upper", torch.triu(torch.ones(d, d), diagonal=1))

    def _householder_product(self, vectors: torch.Tensor) -> torch.Tensor:
        d = self.input_dim
        vectors = vectors.reshape(*vectors.shape[:-1], self.num_householder, d)
        vectors = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        eye = torch.eye(d, dtype=vectors.dtype, device=vectors.device)
        q_matrix = eye.expand(*vectors.shape[:-2], d, d)
        for k in range(self.num_householder):
            v = vectors[..., k, :]
            q_matrix = q_matrix - 2 * (q_matrix @ v.unsqueeze(-1)) @ v.unsqueeze(-2)
        return q_matrix

    def condition(self, context: torch.Tensor) -> _ConditionedSylvester:
        d = self.input_dim
        r_dense, s_dense, r_diag, s_diag, bias, vectors = self.nn(context)
        r_matrix = r_dense.reshape(*r_dense.shape[:-1], d, d) * self.upper + torch.diag_embed(torch.tanh(r_diag))
        r_tilde = s_dense.reshape(*s_dense.shape[:-1], d, d) * self.upper + torch.diag_embed(torch.tanh(s_diag))
        return _ConditionedSylvester(self._householder_product(vectors), r_matrix, r_tilde, bias)


def build_conditional_flow(
    flow: str,
    latent_dim: int,
    context_dim: int,
    num_flows: int,
    *,
    hidden_dims: Optional[Sequence[int]] = None,
    count_bins: int = 8,
    bound: float = 3.0,
    num_householder: int = 8,
) -> nn.ModuleList:
    """``num_flows`` conditional transforms of one kind (see the module docstring).

    Raises:
        ValueError: for an unknown ``flow`` or sizes an autoregressive flow cannot use.
    """
    if flow not in FLOWS:
        raise ValueError(f"flow: expected one of {', '.join(FLOWS)}; got {flow!r}")
    if num_flows < 1:
        raise ValueError(f"num_flows: expected a positive integer; got {num_flows}")
    if flow in ("iaf", "spline") and latent_dim < 2:
        raise ValueError(f"latent_dim: the {flow} flow needs latent_dim >= 2; got {latent_dim}")
    d = latent_dim
    hidden = list(hidden_dims) if hidden_dims is not None else [max(4 * d, 64)] * 2
    steps = []
    for k in range(num_flows):
        # Alternate the autoregressive order so every coordinate conditions on every other.
        order = torch.arange(d) if k % 2 == 0 else torch.arange(d - 1, -1, -1)
        if flow == "planar":
            steps.append(ConditionalPlanar(DenseNN(context_dim, hidden, param_dims=[1, d, d])))
        elif flow == "radial":
            steps.append(ConditionalRadial(DenseNN(context_dim, hidden, param_dims=[d, 1, 1])))
        elif flow == "sylvester":
            steps.append(ConditionalSylvester(d, context_dim, hidden, num_householder=num_householder))
        elif flow == "iaf":
            arn = ConditionalAutoRegressiveNN(d, context_dim, hidden, permutation=order)
            steps.append(ConditionalAffineAutoregressive(arn, stable=True))
        else:
            arn = ConditionalAutoRegressiveNN(
                d,
                context_dim,
                hidden,
                permutation=order,
                param_dims=[count_bins, count_bins, count_bins - 1, count_bins],
            )
            steps.append(ConditionalSplineAutoregressive(d, arn, count_bins=count_bins, bound=bound, order="linear"))
    return nn.ModuleList(steps)


class AmortizedFlowGuide(nn.Module):
    r"""Gaussian encoder followed by ``num_flows`` conditional flow steps.

    A Pyro guide with the VAE model's signature: ``guide(x)`` samples site ``"z"`` of shape
    ``(batch, D)`` inside ``pyro.plate("data", batch, dim=-1)``; flow parameters are functions
    of ``encoder.features(x)``, so the flow is amortized like the encoder.

    Args:
        encoder: Module with ``features(x) -> h``, ``head(h) -> (loc, scale)``, ``feature_dim``
            and ``latent_dim`` (e.g. :class:`~vilab.guides.amortized.encoders.MLPEncoder`).
        flow: One of :data:`FLOWS`.
        num_flows: ``K`` steps.
        hidden_dims: Hidden widths of each step's parameter network.
        count_bins: Spline segments (``"spline"``).
        bound: Spline box :math:`[-B, B]` (``"spline"``).
        num_householder: Reflections per Sylvester step.
        name: Prefix for ``pyro.module`` when ``register=True``.
        register: Register parameters in Pyro's param store (for ``pyro.infer.SVI``).
    """

    def __init__(
        self,
        encoder: nn.Module,
        flow: str = "iaf",
        num_flows: int = 4,
        *,
        hidden_dims: Optional[Sequence[int]] = None,
        count_bins: int = 8,
        bound: float = 3.0,
        num_householder: int = 8,
        name: str = "vae_guide",
        register: bool = False,
    ):
        super().__init__()
        for attribute in ("features", "head", "feature_dim", "latent_dim"):
            if not hasattr(encoder, attribute):
                raise TypeError(
                    f"encoder: expected a module with `{attribute}` (like MLPEncoder); got {type(encoder).__name__}"
                )
        self.encoder, self.flow, self.num_flows = encoder, flow, num_flows
        self.latent_dim = encoder.latent_dim
        self.transforms = build_conditional_flow(
            flow,
            encoder.latent_dim,
            encoder.feature_dim,
            num_flows,
            hidden_dims=hidden_dims,
            count_bins=count_bins,
            bound=bound,
            num_householder=num_householder,
        )
        self.name, self.register = name, register

    @property
    def has_inverse(self) -> bool:
        """Whether :meth:`log_density` works for arbitrary ``z`` (IAF and spline only)."""
        return self.flow in _INVERTIBLE

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """:math:`q(z \\mid x)`: batch shape ``(batch,)``, event shape ``(D,)``."""
        h = self.encoder.features(x)
        loc, scale = self.encoder.head(h)
        base = dist.Normal(loc, scale).to_event(1)
        return dist.TransformedDistribution(base, [t.condition(h) for t in self.transforms])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Sample ``z ~ q(z | x)`` at site ``"z"``; extra arguments are ignored."""
        if self.register:
            pyro.module(self.name, self)
        with pyro.plate("data", x.shape[0], dim=-1):
            return pyro.sample("z", self.distribution(x))

    def mean(self, x: torch.Tensor, *, num_samples: int = 256) -> torch.Tensor:
        """Monte Carlo :math:`\\mathbb{E}_q[z]` from ``num_samples`` draws, ``(batch, D)``."""
        return self.distribution(x).sample((num_samples,)).mean(0)

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | torch.Tensor, x: torch.Tensor, *, num_samples: int = 1000
    ) -> dict[str, torch.Tensor]:
        r"""Per-datapoint marginal quantiles of each coordinate of :math:`q(z \mid x)`.

        The flow has no closed-form marginals, so these are empirical quantiles of
        ``num_samples`` draws per datapoint: the CDF at the estimate is within about
        :math:`\sqrt{p(1-p)/n}` of :math:`p`. Pyro autoguide style (``quantiles`` first).

        Args:
            quantiles: Levels :math:`p \in (0, 1)`, shape ``(Q,)``.
            x: Images ``(batch, C, H, W)``.
            num_samples: Draws per datapoint.

        Returns:
            ``{"z": (Q, batch, D)}``.
        """
        return _empirical_quantiles(self.distribution(x), quantiles, num_samples)

    def median(self, x: torch.Tensor, *, num_samples: int = 1000) -> dict[str, torch.Tensor]:
        """Per-datapoint marginal medians ``{"z": (batch, D)}`` (Monte Carlo, see :meth:`quantiles`)."""
        return {"z": self.quantiles([0.5], x, num_samples=num_samples)["z"][0]}

    def log_density(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """:math:`\\log q(z \\mid x)` at arbitrary ``z`` (needs the inverse: IAF, spline).

        Raises:
            NotImplementedError: for planar, radial and Sylvester flows, whose inverse has no
                closed form; their own samples are still scored exactly through the cache.
        """
        if not self.has_inverse:
            raise NotImplementedError(
                f"log_density: the {self.flow} flow has no analytic "
                f"inverse, so q(z|x) can be scored only at its own samples"
            )
        return self.distribution(x).log_prob(z)
