"""What the algorithms share: tracing a model, argument checks, sample dictionaries, ArviZ conversion and diagnostics."""

__all__: list[str] = []
