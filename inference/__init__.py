"""Inference: SVI, NUTS, their comparison, diagnostics and evaluation."""

from vilab.inference.vae.amortization import gap_decomposition, refine_locally
from vilab.inference.comparison.api import ComparisonReport, MethodResult, compare
from vilab.inference.common.diagnostics import k_hat_verdict, nuts_diagnostics, psis
from vilab.inference.engine.svi_step import CompiledSVIError
from vilab.inference.vae.minibatch import fit_minibatch
from vilab.inference.vae.mutual_information import InfoVAELoss, MutualInformationLoss, maximum_mean_discrepancy
from vilab.inference.nuts.api import NUTSResult, run_nuts
from vilab.inference.vae.objectives import (
    ELBOLoss,
    IWAELoss,
    KLAnnealing,
    PyroELBOLoss,
    elbo_terms,
    free_bits_kl,
    iwae_bound,
    log_importance_weights,
)
from vilab.inference.svi.api import LaplaceError, NonFiniteLossError, SVIResult, fit_svi
from vilab.inference.vae.evaluation import (
    active_units,
    collapse_diagnostics,
    elbo_split,
    evaluate_vae,
    importance_sampled_log_likelihood,
    mutual_information,
)

__all__ = [
    "fit_svi",
    "run_nuts",
    "compare",
    "SVIResult",
    "NUTSResult",
    "ComparisonReport",
    "MethodResult",
    "NonFiniteLossError",
    "LaplaceError",
    "CompiledSVIError",
    "psis",
    "k_hat_verdict",
    "nuts_diagnostics",
    "ELBOLoss",
    "IWAELoss",
    "KLAnnealing",
    "PyroELBOLoss",
    "elbo_terms",
    "free_bits_kl",
    "iwae_bound",
    "log_importance_weights",
    "active_units",
    "collapse_diagnostics",
    "elbo_split",
    "evaluate_vae",
    "importance_sampled_log_likelihood",
    "mutual_information",
    "gap_decomposition",
    "refine_locally",
    "fit_minibatch",
    "InfoVAELoss",
    "MutualInformationLoss",
    "maximum_mean_discrepancy",
]
