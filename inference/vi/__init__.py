"""VI methods that are not SVI on a guide: DADVI, Pathfinder, batch-and-match, Gaussian score
matching, and calibration (VSBC/SBC). They are registered by name in
:mod:`vilab.inference.svi.methods`, through which ``fit_svi`` and ``compare`` run them."""

from vilab.inference.svi.methods import METHODS, get_method, is_method

__all__ = ["METHODS", "get_method", "is_method"]
