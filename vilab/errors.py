"""vilab's exceptions, in one hierarchy.

Every error vilab raises on purpose derives from :class:`VilabError`, so ``except VilabError``
catches them all; each also derives from the built-in exception a caller would expect
(``ValueError`` for bad input or a broken file, ``RuntimeError`` for a computation that cannot go
on, ``FloatingPointError`` for a NaN), so code that catches those keeps working. The modules that
raise them re-export them under their old names (``vilab.inference.svi.api.NonFiniteLossError`` is
this module's class).

Example:
    >>> from vilab.errors import NonFiniteLossError, VilabError
    >>> error = NonFiniteLossError("loss is nan at step 3", step=3)
    >>> isinstance(error, VilabError), isinstance(error, FloatingPointError), error.step
    (True, True, 3)
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = [
    "VilabError",
    "NonFiniteLossError",
    "LaplaceError",
    "CompiledSVIError",
    "VectorizationError",
    "ChainError",
    "CheckpointError",
    "TrainingInterrupted",
]


class VilabError(Exception):
    """Base class of every exception vilab raises on purpose."""


class NonFiniteLossError(VilabError, FloatingPointError, RuntimeError):
    """The loss became NaN or infinite.

    Raised by SVI (``fit_svi``: ``step`` and ``site`` say where, the guide keeps its last
    finite parameters, and ``result`` holds the run up to the last good step) and by VAE training
    (the message names epoch, batch and step; ``last.ckpt`` keeps the last good state).

    Args:
        message: What became non-finite and where.
        step: The optimisation step, where known.
        site: The sample site whose log density was non-finite, where known.
        result: The partial result up to the last finite step, where the caller has one.
    """

    def __init__(
        self, message: str, step: Optional[int] = None, site: Optional[str] = None, result: Any = None
    ) -> None:
        super().__init__(message)
        self.step, self.site, self.result = step, site, result


class LaplaceError(VilabError, ValueError):
    """The Laplace approximation does not exist at the fitted mode (its Hessian is not positive
    definite)."""


class CompiledSVIError(VilabError, RuntimeError):
    """The SVI step of this model and guide cannot be compiled (the reason is the message)."""


class VectorizationError(VilabError, RuntimeError):
    """The model cannot be evaluated correctly for a batch of chains in one call."""


class ChainError(VilabError, RuntimeError):
    """A chain failed in its worker process; the message holds the worker's traceback."""


class CheckpointError(VilabError, ValueError):
    """A checkpoint file is missing, truncated, tampered with or not a vilab checkpoint."""


class TrainingInterrupted(VilabError):
    """Training was stopped by a signal (``signum``); ``last.ckpt`` holds the last finished epoch."""

    # Not a RuntimeError: Pyro's trace re-raises a RuntimeError from inside a model or guide
    # as ``type(error)(message)``, which a signal arriving mid-step would turn into a TypeError.

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
