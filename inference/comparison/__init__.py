"""``compare``: several guides and NUTS on one model, scored against a reference."""

from vilab.inference.comparison.api import (  # noqa: F401 -- the package's public names
    MethodResult,
    ComparisonReport,
    compare,
    reference_from_draws,
)

__all__ = ["MethodResult", "ComparisonReport", "compare", "reference_from_draws"]
