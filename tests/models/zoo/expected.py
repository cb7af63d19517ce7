"""Zoo cases that known vilab bugs break: (model, check) -> the bug, for strict xfail marks.

``check`` is ``nuts``, ``svi`` (both guides) or ``svi:<guide>``, ``compare``, ``fast_nuts`` or
``fast_svi``. Remove an entry when the fix is merged; a strict xfail that starts passing fails.
``TIMING_DEPENDENT`` cases fail only when the fusion policy, which watches the run's pace, asks
for a compile-time estimate: they are non-strict xfails.
Found by ``benchmarks/zoo_table.py`` (same seeds and settings as the tests).
"""

from __future__ import annotations

__all__ = ["KNOWN", "TIMING_DEPENDENT"]

_GRAPH_KEY = (
    "fit_svi crashes in FusePolicy: fast_inductor.graph_key views a stride-0 one-element graph "
    "constant as bytes (RuntimeError: self.stride(-1) must be 1 to view Double as Byte)"
)
_IMPROPER = (
    "ImproperUniform (Stan's flat prior, written literally) is refused: check_model traces the model "
    "by sampling every site, and ImproperUniform cannot be sampled"
)

TIMING_DEPENDENT = {("coin_fairness", "svi"), ("coin_fairness", "compare")}

KNOWN: dict = {
    **{
        (name, check): _IMPROPER
        for name in ("robust_regression", "ordered_logistic", "missing_obs_mask")
        for check in ("nuts", "svi", "compare")
    },
    ("coin_fairness", "svi"): _GRAPH_KEY,
    ("coin_fairness", "compare"): _GRAPH_KEY,
}
