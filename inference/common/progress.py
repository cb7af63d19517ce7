"""Progress output that suits where it goes: a tqdm bar on a terminal, a status line elsewhere.

A tqdm bar redraws itself many times a second; written to a file or a pipe (a batch job's
log) every redraw stays, tens of kilobytes per epoch. :func:`progress_bar` gives the bar only
when the stream is a terminal, and otherwise a :class:`StatusLine`: one short line every
``interval`` seconds and one when the work ends.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO

from tqdm.auto import tqdm

__all__ = ["STATUS_INTERVAL", "StatusLine", "is_interactive", "is_terminal", "progress_bar"]

# Seconds between two status lines: a long run's log shows it is alive without growing much.
STATUS_INTERVAL = 30.0


def is_terminal(stream: Optional[TextIO] = None) -> bool:
    """Whether ``stream`` (default: ``sys.stderr``, where progress goes) is a terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def is_interactive() -> bool:
    """Whether a redrawn bar is seen as a bar: stderr is a terminal, or this is a notebook
    (where tqdm draws a widget)."""
    return is_terminal() or _in_notebook()


def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")  # imported by every notebook kernel; never import it here
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


class StatusLine:
    """A tqdm stand-in for logs: ``desc: n/total (p%), t s, key=value`` lines, at most one per
    ``interval`` seconds, and a last one on :meth:`close`.

    Supports the tqdm calls vilab makes: iteration, ``update``, ``set_postfix``, ``close``.
    """

    def __init__(
        self,
        iterable: Optional[Iterable] = None,
        *,
        total: Optional[int] = None,
        desc: str = "",
        interval: float = STATUS_INTERVAL,
        stream: Optional[TextIO] = None,
        enabled: bool = True,
    ):
        self.iterable = iterable
        self.total = total if total is not None or iterable is None else _length(iterable)
        self.desc, self.interval, self.enabled = desc, interval, enabled
        self.stream = stream
        self.n, self.postfix = 0, ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            self.update(1)  # counted when started, so a loop left early by `break` counts right
            yield item

    def update(self, n: int = 1) -> None:
        """Count ``n`` more iterations; print a line if ``interval`` seconds passed since the last."""
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._print()

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the count (``elbo=-12.3``)."""
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        """Print the final line (once)."""
        if not self.closed:
            self.closed = True
            self._print()

    def line(self) -> str:
        """The current status line."""
        count = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        parts = [f"{self.desc}: {count}", f"{time.monotonic() - self.start:.0f} s"]
        return ", ".join(parts + ([self.postfix] if self.postfix else []))

    def _print(self) -> None:
        if self.enabled:
            print(self.line(), file=self.stream or sys.stderr, flush=True)


def _length(iterable: Iterable) -> Optional[int]:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def progress_bar(
    iterable: Optional[Iterable] = None,
    *,
    total: Optional[int] = None,
    desc: str = "",
    enabled: bool = True,
    interval: float = STATUS_INTERVAL,
    leave: bool = False,
):
    """A tqdm bar when stderr is a terminal (or in a notebook), else a :class:`StatusLine`;
    silent unless ``enabled``.

    Args:
        iterable: What to iterate over (or ``None`` and call ``update``).
        total: Expected iterations (default: ``len(iterable)``).
        desc: Label of the bar or line.
        enabled: ``False``: no output at all.
        interval: Seconds between status lines (not a terminal only).
        leave: Keep the finished bar on screen (terminal only).
    """
    if enabled and is_interactive():
        return tqdm(iterable, total=total, desc=desc, leave=leave)
    return StatusLine(iterable, total=total, desc=desc, interval=interval, enabled=enabled)
