"""Inference: SVI, NUTS, their comparison, diagnostics and evaluation."""
from vilab.inference.compare import ComparisonReport, MethodResult, compare
from vilab.inference.diagnostics import k_hat_verdict, nuts_diagnostics, psis
from vilab.inference.nuts import NUTSResult, run_nuts
from vilab.inference.svi import NonFiniteLossError, SVIResult, fit_svi

__all__ = ["fit_svi", "run_nuts", "compare", "SVIResult", "NUTSResult", "ComparisonReport", "MethodResult",
           "NonFiniteLossError", "psis", "k_hat_verdict", "nuts_diagnostics"]
