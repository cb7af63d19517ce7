"""Zoo cases that known vilab bugs break: (model, check) -> the bug, for strict xfail marks.

``check`` is ``nuts``, ``svi`` (both guides) or ``svi:<guide>``, ``compare``, ``fast_nuts`` or
``fast_svi``. Remove an entry when the fix is merged; a strict xfail that starts passing fails.
"""
from __future__ import annotations

__all__ = ["KNOWN"]

KNOWN: dict = {}
