r"""The numbers a VAE is judged by: IS log-likelihood, ELBO split, posterior-collapse diagnostics.

All functions take ``(model, guide, loader)`` (Pyro callables with a ``"data"`` plate at
``dim=-1`` and a latent site ``"z"``) or ``(vae, loader)`` for a
:class:`~vilab.models.vae.vae.VAE`; ``loader`` yields ``x`` or ``[x, y, ...]`` batches.

* :func:`importance_sampled_log_likelihood`: :math:`\log \hat p(x) = \log \frac1K
  \sum_k p(x, z_k)/q(z_k \mid x)`, :math:`z_k \sim q(z \mid x)`, in chunks so ``K = 5000`` fits
  in memory (Burda et al. 2016, arXiv:1509.00519).
* :func:`elbo_split`: reconstruction (distortion) and KL (rate).
* :func:`active_units`: unit :math:`d` is active when :math:`\operatorname{Cov}_x(
  \mathbb{E}_{q(z \mid x)}[z_d]) > 0.01` (Burda et al. 2016).
* :func:`mutual_information`: :math:`I_q(x; z) = \mathbb{E}_x\mathbb{E}_{q(z \mid x)}[\log q(z
  \mid x) - \log q(z)]` with the aggregate posterior :math:`q(z)` approximated by the batch's
  mixture (Hoffman & Johnson 2016; He et al. 2019, arXiv:1901.05534); at most ``log(batch)``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, NamedTuple, Optional

import pyro
import torch

from vilab.inference.vae.objectives import elbo_terms, log_importance_weights

__all__ = [
    "LogLikelihoodEstimate",
    "ELBOSplit",
    "CollapseReport",
    "importance_sampled_log_likelihood",
    "elbo_split",
    "active_units",
    "kl_per_dimension",
    "mutual_information",
    "collapse_diagnostics",
    "evaluate_vae",
]


class LogLikelihoodEstimate(NamedTuple):
    """Importance-sampled :math:`\\log p(x)`.

    Attributes:
        mean: Mean over examples of :math:`\\log \\hat p(x)` (nats).
        stderr: Standard error of ``mean`` from the finite test set (sd / sqrt(N)).
        monte_carlo_stderr: Delta-method Monte Carlo error of ``mean`` from finite ``K``.
        per_example: ``(N,)`` estimates.
        num_samples: ``K``.
    """

    mean: float
    stderr: float
    monte_carlo_stderr: float
    per_example: torch.Tensor
    num_samples: int


class ELBOSplit(NamedTuple):
    """Mean ELBO, reconstruction (distortion = -reconstruction) and KL (rate), in nats."""

    elbo: float
    reconstruction: float
    kl: float
    elbo_stderr: float
    per_example: torch.Tensor


class CollapseReport(NamedTuple):
    """Posterior-collapse diagnostics.

    Attributes:
        active_units: Number of units with :math:`\\operatorname{Cov}_x(\\mathbb{E}_q[z_d])`
            above the threshold.
        unit_variances: ``(D,)`` those covariances.
        kl_per_dim: ``(D,)`` mean KL per dimension, or ``None`` when the KL does not factorise.
        mutual_information: :math:`I_q(x; z)` estimate in nats, or ``None`` (see ``note``).
        note: Why an entry is ``None``.
    """

    active_units: int
    unit_variances: torch.Tensor
    kl_per_dim: Optional[torch.Tensor]
    mutual_information: Optional[float]
    note: str


def _unpack(model: Any, guide: Any, loader: Any):
    if loader is None and hasattr(model, "model") and hasattr(model, "guide"):
        return model.model, model.guide, guide
    if loader is None:
        raise TypeError("loader: expected (model, guide, loader) or (vae, loader); got no loader")
    return model, guide, loader


def _batches(loader: Iterable, device: Optional[torch.device]) -> Iterable[torch.Tensor]:
    for batch in loader:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        yield x.to(device) if device is not None else x


def _device(module: Any) -> Optional[torch.device]:
    parameters = getattr(module, "parameters", None)
    first = next(parameters(), None) if parameters else None
    return first.device if first is not None else None


@torch.no_grad()
def importance_sampled_log_likelihood(
    model: Any, guide: Any = None, loader: Any = None, *, num_samples: int = 5000, chunk_size: int = 500
) -> LogLikelihoodEstimate:
    r"""Estimate :math:`\log p(x)` with the guide as proposal, ``num_samples`` per example.

    The ``K`` samples are drawn ``chunk_size`` at a time and combined with a running
    log-sum-exp, so memory is ``O(chunk_size x batch)``. By Jensen's inequality the estimate
    is, in expectation, at least the ELBO and at most :math:`\log p(x)`.

    Args:
        model, guide, loader: See the module docstring.
        num_samples: ``K``.
        chunk_size: Samples per vectorized pass.
    """
    model, guide, loader = _unpack(model, guide, loader)
    if num_samples < 1 or chunk_size < 1:
        raise ValueError(f"num_samples, chunk_size: expected positive integers; got {num_samples}, {chunk_size}")
    device = _device(model)
    estimates, mc_variances = [], []
    for x in _batches(loader, device):
        log_sum = x.new_full((x.shape[0],), -math.inf)
        log_sum_sq = x.new_full((x.shape[0],), -math.inf)
        done = 0
        while done < num_samples:
            size = min(chunk_size, num_samples - done)
            log_w = log_importance_weights(model, guide, x, num_samples=size)
            log_sum = torch.logaddexp(log_sum, torch.logsumexp(log_w, 0))
            log_sum_sq = torch.logaddexp(log_sum_sq, torch.logsumexp(2 * log_w, 0))
            done += size
        log_mean = log_sum - math.log(num_samples)
        estimates.append(log_mean)
        # Delta method: Var[log mean(w)] ~= (E[w^2] / E[w]^2 - 1) / K.
        ratio = torch.exp(log_sum_sq - math.log(num_samples) - 2 * log_mean)
        mc_variances.append((ratio - 1).clamp_min(0) / num_samples)
    per_example = torch.cat(estimates).cpu()
    n = per_example.numel()
    stderr = per_example.std().item() / math.sqrt(n) if n > 1 else float("nan")
    mc_stderr = math.sqrt(torch.cat(mc_variances).sum().item()) / n
    return LogLikelihoodEstimate(per_example.mean().item(), stderr, mc_stderr, per_example, num_samples)


@torch.no_grad()
def elbo_split(
    model: Any, guide: Any = None, loader: Any = None, *, num_samples: int = 1, analytic_kl: bool = True
) -> ELBOSplit:
    """Test ELBO split into reconstruction and KL, averaged over ``num_samples`` draws."""
    model, guide, loader = _unpack(model, guide, loader)
    device = _device(model)
    rec, kl = [], []
    for x in _batches(loader, device):
        draws = [elbo_terms(model, guide, x, analytic_kl=analytic_kl) for _ in range(num_samples)]
        rec.append(torch.stack([d.reconstruction for d in draws]).mean(0))
        kl.append(torch.stack([d.kl for d in draws]).mean(0))
    reconstruction, kl_all = torch.cat(rec).cpu(), torch.cat(kl).cpu()
    elbo = reconstruction - kl_all
    n = elbo.numel()
    stderr = elbo.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return ELBOSplit(elbo.mean().item(), reconstruction.mean().item(), kl_all.mean().item(), stderr, elbo)


def _posterior_mean(guide: Any, x: torch.Tensor, num_samples: int):
    """``(E_q[z], variance of that estimate)``: exact for Gaussian guides, else Monte Carlo."""
    distribution = guide.distribution(x)
    base = getattr(distribution, "base_dist", None)
    if not getattr(distribution, "transforms", None) and isinstance(base, torch.distributions.Normal):
        return base.loc, torch.zeros_like(base.loc)
    draws = distribution.sample((num_samples,))
    return draws.mean(0), draws.var(0) / num_samples


@torch.no_grad()
def active_units(
    model: Any, guide: Any = None, loader: Any = None, *, threshold: float = 0.01, num_samples: int = 200
) -> tuple[int, torch.Tensor]:
    r"""Active units (Burda et al. 2016): :math:`\operatorname{Cov}_x(\mathbb{E}_q[z_d]) > 0.01`.

    For flow guides :math:`\mathbb{E}_q[z]` is a ``num_samples`` Monte Carlo mean; its
    sampling variance is subtracted so it does not pass for activity.

    Returns:
        ``(count, variances)`` with ``variances`` of shape ``(D,)``.
    """
    model, guide, loader = _unpack(model, guide, loader)
    means, noise = [], []
    for x in _batches(loader, _device(guide)):
        mean, noise_variance = _posterior_mean(guide, x, num_samples)
        means.append(mean)
        noise.append(noise_variance)
    means, noise = torch.cat(means), torch.cat(noise)
    variances = (means.var(0) - noise.mean(0)).clamp_min(0).cpu()
    return int((variances > threshold).sum()), variances


@torch.no_grad()
def kl_per_dimension(model: Any, guide: Any = None, loader: Any = None) -> Optional[torch.Tensor]:
    """Mean analytic KL per latent dimension, ``(D,)``; ``None`` if it does not factorise
    (flow guides, mixture priors)."""
    model, guide, loader = _unpack(model, guide, loader)
    total, count = None, 0
    for x in _batches(loader, _device(model)):
        terms = elbo_terms(model, guide, x, analytic_kl=True)
        if terms.kl_per_dim is None:
            return None
        total = terms.kl_per_dim.sum(0) if total is None else total + terms.kl_per_dim.sum(0)
        count += x.shape[0]
    return (total / count).cpu()


@torch.no_grad()
def mutual_information(model: Any, guide: Any = None, loader: Any = None) -> Optional[float]:
    r"""Minibatch estimate of :math:`I_q(x; z)` in nats; ``None`` if ``q(z|x)`` cannot be scored
    at other examples' samples (planar, radial, Sylvester flows have no inverse).

    Each batch of ``M`` examples uses :math:`\log q(z_i) \approx \log\frac1M\sum_j
    q(z_i \mid x_j)`; batch estimates are averaged weighted by size.
    """
    model, guide, loader = _unpack(model, guide, loader)
    if not getattr(guide, "has_inverse", True) or not hasattr(guide, "log_density"):
        return None
    total, count = 0.0, 0
    for x in _batches(loader, _device(guide)):
        m = x.shape[0]
        z = guide.distribution(x).sample()
        # [i, j] = log q(z_i | x_j); expanded so conditional flows see a full (M, M) batch.
        # Inverting another datapoint's flow at z_i far from its mass can overflow (a gated
        # IAF step divides by a sigmoid near 0): that density is 0 to working precision, so a
        # non-finite off-diagonal entry counts as log 0 instead of failing validation.
        with pyro.validation_enabled(False):
            pairwise = guide.log_density(x, z.unsqueeze(1).expand(m, m, z.shape[-1]))
        off_diagonal = ~torch.eye(m, dtype=torch.bool, device=pairwise.device)
        pairwise = pairwise.masked_fill(off_diagonal & ~torch.isfinite(pairwise), -math.inf)
        log_aggregate = torch.logsumexp(pairwise, 1) - math.log(m)
        total += (pairwise.diagonal() - log_aggregate).sum().item()
        count += m
    return total / count


def collapse_diagnostics(
    model: Any, guide: Any = None, loader: Any = None, *, threshold: float = 0.01, num_samples: int = 200
) -> CollapseReport:
    """Active units, KL per dimension and mutual information in one record."""
    model, guide, loader = _unpack(model, guide, loader)
    count, variances = active_units(model, guide, loader, threshold=threshold, num_samples=num_samples)
    per_dim = kl_per_dimension(model, guide, loader)
    information = mutual_information(model, guide, loader)
    notes = []
    if per_dim is None:
        notes.append("KL per dimension is undefined: q(z|x) or p(z) is not a diagonal Normal")
    if information is None:
        notes.append(
            "mutual information needs log q(z|x) at arbitrary z, which this flow (no analytic inverse) cannot give"
        )
    return CollapseReport(count, variances, per_dim, information, "; ".join(notes))


def evaluate_vae(
    vae: Any, loader: Iterable, *, iw_samples: int = 5000, chunk_size: int = 500, elbo_samples: int = 1
) -> dict[str, Any]:
    """Every metric of this module for one VAE and one loader, as a JSON-ready dict.

    Keys: ``elbo``, ``reconstruction``, ``kl``, ``elbo_stderr``, ``log_likelihood``,
    ``log_likelihood_stderr``, ``log_likelihood_mc_stderr``, ``iw_samples``, ``active_units``,
    ``unit_variances``, ``kl_per_dim``, ``mutual_information``, ``note`` and
    ``num_examples`` (all in nats per example).
    """
    split = elbo_split(vae, loader, num_samples=elbo_samples)
    estimate = importance_sampled_log_likelihood(vae, loader, num_samples=iw_samples, chunk_size=chunk_size)
    report = collapse_diagnostics(vae, loader)
    return {
        "num_examples": int(split.per_example.numel()),
        "elbo": split.elbo,
        "reconstruction": split.reconstruction,
        "kl": split.kl,
        "elbo_stderr": split.elbo_stderr,
        "log_likelihood": estimate.mean,
        "log_likelihood_stderr": estimate.stderr,
        "log_likelihood_mc_stderr": estimate.monte_carlo_stderr,
        "iw_samples": iw_samples,
        "active_units": report.active_units,
        "latent_dim": int(report.unit_variances.numel()),
        "unit_variances": report.unit_variances.tolist(),
        "kl_per_dim": None if report.kl_per_dim is None else report.kl_per_dim.tolist(),
        "mutual_information": report.mutual_information,
        "note": report.note,
    }
