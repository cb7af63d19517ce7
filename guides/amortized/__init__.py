"""Amortized guides: encoders, conditional flows, product of experts, von Mises-Fisher, the DMM's guide and hierarchical guides."""

__all__: list[str] = []
