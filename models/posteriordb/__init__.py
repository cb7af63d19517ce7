"""Pyro ports of posteriordb's posteriors (regressions, mixtures, time series)."""

__all__: list[str] = []
