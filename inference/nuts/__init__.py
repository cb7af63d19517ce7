"""NUTS: ``run_nuts`` and the multi-chain sampler (tree, adaptation, batched potential)."""

from vilab.inference.nuts.api import (  # noqa: F401 -- the package's public names
    NUTSResult,
    run_nuts,
    check_nuts_options,
)

__all__ = ["NUTSResult", "run_nuts", "check_nuts_options"]
