"""Inference: SVI, NUTS, their comparison, diagnostics and evaluation."""
from vilab.inference.amortization import gap_decomposition, refine_locally
from vilab.inference.compare import ComparisonReport, MethodResult, compare
from vilab.inference.diagnostics import k_hat_verdict, nuts_diagnostics, psis
from vilab.inference.fast_svi import CompiledSVIError
from vilab.inference.minibatch import fit_minibatch
from vilab.inference.mutual_information import InfoVAELoss, MutualInformationLoss, maximum_mean_discrepancy
from vilab.inference.nuts import NUTSResult, run_nuts
from vilab.inference.objectives import (ELBOLoss, IWAELoss, KLAnnealing, PyroELBOLoss, elbo_terms, free_bits_kl,
                                        iwae_bound, log_importance_weights)
from vilab.inference.svi import LaplaceError, NonFiniteLossError, SVIResult, fit_svi
from vilab.inference.vae_evaluation import (active_units, collapse_diagnostics, elbo_split, evaluate_vae,
                                            importance_sampled_log_likelihood, mutual_information)

__all__ = ["fit_svi", "run_nuts", "compare", "SVIResult", "NUTSResult", "ComparisonReport", "MethodResult",
           "NonFiniteLossError", "LaplaceError", "CompiledSVIError", "psis", "k_hat_verdict", "nuts_diagnostics",
           "ELBOLoss", "IWAELoss", "KLAnnealing", "PyroELBOLoss", "elbo_terms", "free_bits_kl", "iwae_bound",
           "log_importance_weights", "active_units", "collapse_diagnostics", "elbo_split", "evaluate_vae",
           "importance_sampled_log_likelihood", "mutual_information", "gap_decomposition", "refine_locally",
           "fit_minibatch", "InfoVAELoss", "MutualInformationLoss", "maximum_mean_discrepancy"]
