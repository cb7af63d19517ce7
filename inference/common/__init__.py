"""What the algorithms share: tracing a model, argument checks, sample dictionaries, ArviZ conversion and diagnostics."""

# Before any sampler or guide looks up a site's transform (see vilab/supports.py for why globally).
import vilab.supports  # noqa: F401

__all__: list[str] = []
