"""Passes over a traced ATen graph: simplification, broadcasts, value-dependent shapes, and sending a graph to another process."""

__all__: list[str] = []
