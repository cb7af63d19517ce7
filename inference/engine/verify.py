"""Checks of a traced or fused step against its reference: rounding tolerances and call timing."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch


__all__ = ["ROUNDING_RTOL_ULPS", "ROUNDING_ATOL_ULPS"]


def _call_time(function: Callable, inputs: tuple, calls: int = 20, repeats: int = 3) -> float:
    """Seconds per call, the best of ``repeats`` rounds of ``calls`` calls. A step that reuses
    its output buffers is timed through its twin that does not (``unrecycled()``): those buffers
    hold the caller's live values (a NUTS tree's state)."""
    function = function.unrecycled() if hasattr(function, "unrecycled") else function
    function(*inputs)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            function(*inputs)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def _describe(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


# Agreement of a compiled step with its eager reference, beyond float64's 1e-6 / 1e-8: in
# float32 a kernel that sums in another order is off by a few units in the last place of the
# terms, which cancellation in a gradient leaves large beside a small result (the float32 leaves
# of a GARCH, a regression and an HMM differed by 1e-5 to 2e-4 on outputs of size 6-170: rejected at 1e-6, so
# float32 models never ran fused). A wrong kernel is off by the size of the values.
ROUNDING_RTOL_ULPS = 256
ROUNDING_ATOL_ULPS = 64


def _all_close(got, expected) -> bool:
    """Whether every output equals its reference up to rounding: ``rtol=1e-6, atol=1e-8``, or
    in a dtype coarser than float64 :data:`ROUNDING_RTOL_ULPS` units of its precision and an
    absolute :data:`ROUNDING_ATOL_ULPS` units of the largest finite reference value."""
    return all(a.shape == b.shape and _close(a, b) for a, b in zip(got, expected))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    rtol, atol = 1e-6, 1e-8
    if b.is_floating_point() and b.dtype != torch.float64:
        eps = torch.finfo(b.dtype).eps
        finite = b[torch.isfinite(b)]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        rtol, atol = max(rtol, ROUNDING_RTOL_ULPS * eps), max(atol, ROUNDING_ATOL_ULPS * eps * scale)
    return torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True)
