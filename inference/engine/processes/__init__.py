"""Forked processes: the background compile server, the chain workers and independent chains."""

__all__: list[str] = []
