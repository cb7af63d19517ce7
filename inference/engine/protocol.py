"""The shape of a step as NUTS and SVI see it (re-exported by :mod:`~vilab.inference.engine.api`)."""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

__all__ = ["Step", "StepInfo"]


class StepInfo(NamedTuple):
    """How a step runs, as a result reports it.

    Attributes:
        backend: ``"eager"``, ``"graph"`` (fx code), ``"vm"`` (the virtual machine) or
            ``"inductor"`` (a fused kernel).
        fused: whether a fused kernel runs.
        decision: why (the fusion policy's reason, the virtual machine's notes).
    """

    backend: str
    fused: bool
    decision: str


@runtime_checkable
class Step(Protocol):
    """A pure function of flat tensors for fixed input shapes, as NUTS's tree builder calls it.

    ``step(*inputs)`` returns a tuple of tensors; ``backend`` says how it runs (see
    :class:`StepInfo`) and ``compiled`` whether it runs a traced graph.
    """

    backend: str
    compiled: bool

    def __call__(self, *inputs): ...
