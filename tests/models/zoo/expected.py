"""Zoo cases that known vilab bugs break: (model, check) -> the bug, for strict xfail marks.

``check`` is ``nuts``, ``svi`` (both guides) or ``svi:<guide>``, ``compare``, ``fast_nuts`` or
``fast_svi``. Remove an entry when the fix is merged; a strict xfail that starts passing fails.
``TIMING_DEPENDENT`` cases fail only on some runs (they depend on the machine's pace): they are
non-strict xfails.
Found by ``benchmarks/zoo_table.py`` (same seeds and settings as the tests).
"""

from __future__ import annotations

__all__ = ["KNOWN", "TIMING_DEPENDENT"]

TIMING_DEPENDENT: set = set()

KNOWN: dict = {}
