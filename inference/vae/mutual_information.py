r"""Objectives that keep the mutual information :math:`I_q(x; z)` up: InfoVAE (MMD) and an MI term.

Averaged over the data, the ELBO's KL term splits as

.. math::

    \mathbb{E}_x \mathrm{KL}(q(z \mid x) \,\|\, p(z)) = I_q(x; z) + \mathrm{KL}(q(z) \,\|\, p(z)),

so maximising the ELBO penalises the information the code carries. With a decoder strong
enough to model :math:`x` alone, the optimum ignores :math:`z` (posterior collapse).

* :class:`InfoVAELoss` (Zhao et al.): per datapoint
  :math:`-\mathbb{E}_q \log p(x \mid z) + (1 - \alpha)\,\mathrm{KL}(q(z \mid x)\,\|\,p(z))
  + (\alpha + \lambda - 1)\,\mathrm{MMD}^2(q(z), p(z))`; :math:`\alpha = 0, \lambda = 1` is the
  ELBO, :math:`\alpha = 1` drops the penalty on :math:`I_q` (the MMD-VAE).
* :class:`MutualInformationLoss`: :math:`-\mathrm{ELBO} - \gamma\, \hat I_q(x; z)` with the
  minibatch estimate :func:`minibatch_mutual_information` (differentiable).

Both are losses in the sense of :mod:`vilab.inference.vae.objectives`
(``loss(model, guide, x, *, step) -> LossOutput``) for models with one latent site ``"z"``.

References:
    InfoVAE: Balancing Learning and Inference in Variational Autoencoders, Zhao, Song &
    Ermon, 2019, arXiv:1706.02262.
    ELBO surgery, Hoffman & Johnson, 2016 (NIPS workshop on approximate inference).
    A Kernel Two-Sample Test, Gretton et al., 2012, JMLR 13.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from vilab.inference.vae.objectives import LossOutput
from vilab.types import Guide, Model

__all__ = [
    "KERNELS",
    "kernel_matrix",
    "maximum_mean_discrepancy",
    "minibatch_mutual_information",
    "LatentTerms",
    "latent_terms",
    "InfoVAELoss",
    "MutualInformationLoss",
]

KERNELS = ("rbf", "imq")


def kernel_matrix(a: torch.Tensor, b: torch.Tensor, *, kernel: str = "imq", bandwidth: float = 1.0) -> torch.Tensor:
    r""":math:`k(a_i, b_j)`, ``(N, M)``: RBF :math:`e^{-\|a-b\|^2/2h^2}` or inverse multiquadric
    :math:`C/(C + \|a-b\|^2)` with :math:`C = 2 D h^2` (Tolstikhin et al.'s choice)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {', '.join(KERNELS)}; got {kernel!r}")
    squared = torch.cdist(a, b).pow(2)
    if kernel == "rbf":
        return torch.exp(-squared / (2 * bandwidth**2))
    scale = 2 * a.shape[-1] * bandwidth**2
    return scale / (scale + squared)


def maximum_mean_discrepancy(
    samples_q: torch.Tensor, samples_p: torch.Tensor, *, kernel: str = "imq", bandwidth: float = 1.0
) -> torch.Tensor:
    r"""Unbiased :math:`\widehat{\mathrm{MMD}}^2` between ``(N, D)`` and ``(M, D)`` samples.

    .. math:: \frac{1}{N(N-1)}\sum_{i \ne j} k(q_i, q_j) + \frac{1}{M(M-1)}\sum_{i \ne j}
        k(p_i, p_j) - \frac{2}{NM}\sum_{i,j} k(q_i, p_j)
    """
    n, m = samples_q.shape[0], samples_p.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"samples_q, samples_p: expected at least 2 samples each; got {n}, {m}")
    kqq = kernel_matrix(samples_q, samples_q, kernel=kernel, bandwidth=bandwidth)
    kpp = kernel_matrix(samples_p, samples_p, kernel=kernel, bandwidth=bandwidth)
    kqp = kernel_matrix(samples_q, samples_p, kernel=kernel, bandwidth=bandwidth)
    within_q = (kqq.sum() - kqq.diagonal().sum()) / (n * (n - 1))
    within_p = (kpp.sum() - kpp.diagonal().sum()) / (m * (m - 1))
    return within_q + within_p - 2 * kqp.mean()


def minibatch_mutual_information(posterior: torch.distributions.Distribution, z: torch.Tensor) -> torch.Tensor:
    r"""Differentiable :math:`\hat I_q(x; z) = \frac1M \sum_i [\log q(z_i \mid x_i)
    - \log \frac1M \sum_j q(z_i \mid x_j)]` from a batch ``posterior`` (batch shape ``(M,)``)
    and its draws ``z`` ``(M, D)``; between 0 and :math:`\log M`."""
    m = z.shape[0]
    pairwise = posterior.log_prob(z.unsqueeze(1))  # [i, j] = log q(z_i | x_j)
    return (pairwise.diagonal() - (torch.logsumexp(pairwise, 1) - math.log(m))).mean()


class LatentTerms(NamedTuple):
    """Per-datapoint reconstruction and KL ``(N,)``, the draws ``z`` ``(N, D)``, and the guide's
    and prior's distributions at site ``"z"``."""

    reconstruction: torch.Tensor
    kl: torch.Tensor
    z: torch.Tensor
    posterior: torch.distributions.Distribution
    prior: torch.distributions.Distribution


def latent_terms(model: Model, guide: Guide, x: torch.Tensor) -> LatentTerms:
    """Trace ``guide(x)`` and the model replayed on it; KL analytic when torch knows it.

    Raises:
        ValueError: if the guide has no site ``"z"``.
    """
    guide_trace = poutine.trace(guide).get_trace(x)
    if "z" not in guide_trace.nodes:
        raise ValueError(
            "guide: expected a latent site named 'z'; got sites "
            f"{[n for n in guide_trace.nodes if n not in ('_INPUT', '_RETURN')]}"
        )
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    reconstruction = x.new_zeros(x.shape[0])
    for site in model_trace.nodes.values():
        if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site):
            reconstruction = reconstruction + site["fn"].log_prob(site["value"])
    q, p, z = guide_trace.nodes["z"]["fn"], model_trace.nodes["z"]["fn"], guide_trace.nodes["z"]["value"]
    try:
        kl = torch.distributions.kl_divergence(q, p)
    except NotImplementedError:  # no closed form registered: one-sample estimate
        kl = q.log_prob(z) - p.log_prob(z)
    return LatentTerms(reconstruction, kl, z, q, p)


class InfoVAELoss:
    r"""The InfoVAE objective of the module docstring, with MMD as the divergence.

    Args:
        alpha: :math:`\alpha`; 1 removes the penalty on :math:`I_q(x; z)`.
        lambda_: :math:`\lambda`, weight of the aggregate-posterior divergence.
        kernel: ``"imq"`` or ``"rbf"``.
        bandwidth: Kernel bandwidth :math:`h`.
        num_prior_samples: Prior draws for the MMD per step (default: batch size).
    """

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        lambda_: float = 100.0,
        kernel: str = "imq",
        bandwidth: float = 1.0,
        num_prior_samples: int | None = None,
    ):
        if kernel not in KERNELS:
            raise ValueError(f"kernel: expected one of {', '.join(KERNELS)}; got {kernel!r}")
        if alpha + lambda_ - 1 < 0:
            raise ValueError(
                f"alpha, lambda_: expected alpha + lambda_ >= 1 so the divergence "
                f"term is not rewarded; got {alpha} + {lambda_}"
            )
        self.alpha, self.lambda_, self.kernel, self.bandwidth = alpha, lambda_, kernel, bandwidth
        self.num_prior_samples = num_prior_samples

    def __call__(self, model: Model, guide: Guide, x: torch.Tensor, *, step: int = 0) -> LossOutput:
        terms = latent_terms(model, guide, x)
        prior_draws = self._prior_draws(terms.prior, terms.z.shape[-1])
        mmd = maximum_mean_discrepancy(terms.z, prior_draws, kernel=self.kernel, bandwidth=self.bandwidth)
        loss = (-terms.reconstruction + (1 - self.alpha) * terms.kl).mean() + (self.alpha + self.lambda_ - 1) * mmd
        elbo = terms.reconstruction - terms.kl
        return LossOutput(loss, {"elbo": elbo.mean().detach(), "kl": terms.kl.mean().detach(), "mmd": mmd.detach()})

    def _prior_draws(self, prior: torch.distributions.Distribution, dim: int) -> torch.Tensor:
        # The prior at site "z" is batched over the data plate: one call gives N draws.
        wanted = self.num_prior_samples or prior.batch_shape.numel()
        rounds = math.ceil(wanted / max(prior.batch_shape.numel(), 1))
        return prior.sample((rounds,)).reshape(-1, dim)[:wanted]


class MutualInformationLoss:
    r""":math:`-\mathrm{ELBO} - \gamma\,\hat I_q(x; z)` per datapoint.

    Args:
        mi_weight: :math:`\gamma \ge 0` (0 gives the ELBO).
    """

    def __init__(self, mi_weight: float = 1.0):
        if mi_weight < 0:
            raise ValueError(f"mi_weight: expected a non-negative weight; got {mi_weight}")
        self.mi_weight = mi_weight

    def __call__(self, model: Model, guide: Guide, x: torch.Tensor, *, step: int = 0) -> LossOutput:
        terms = latent_terms(model, guide, x)
        information = minibatch_mutual_information(terms.posterior, terms.z)
        elbo = terms.reconstruction - terms.kl
        loss = -elbo.mean() - self.mi_weight * information
        return LossOutput(
            loss,
            {"elbo": elbo.mean().detach(), "kl": terms.kl.mean().detach(), "mutual_information": information.detach()},
        )
