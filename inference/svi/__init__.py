"""Stochastic variational inference: ``fit_svi``, its convergence check and guide draws."""

from vilab.inference.svi.api import (  # noqa: F401 -- the package's public names
    SVIResult,
    GuideSample,
    NonFiniteLossError,
    LaplaceError,
    fit_svi,
    ELBOS,
    check_svi_options,
)

__all__ = ["SVIResult", "GuideSample", "NonFiniteLossError", "LaplaceError", "fit_svi", "ELBOS", "check_svi_options"]
