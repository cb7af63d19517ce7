"""What the algorithms share: tracing a model, argument checks, sample dictionaries, ArviZ conversion and diagnostics."""

# Before any sampler or guide looks up a site's transform (see supports.py for why globally).
from vilab.inference.common import supports as _supports  # noqa: F401

__all__: list[str] = []
