r"""``ClippedAdam`` with a fixed per-element step scale (a diagonal preconditioner).

For a parameter :math:`\theta` with step scale :math:`c` (same shape), the update is Pyro's
``ClippedAdam`` run on :math:`\phi = \theta / c`:

.. math:: g_t = \mathrm{clip}(c \odot \nabla_\theta \mathcal L), \quad
    \theta_{t+1} = \theta_t - \eta_t\, c \odot \hat m_t / (\sqrt{\hat v_t} + \epsilon).

With :math:`c` the posterior sd of a location (:mod:`~vilab.inference.svi.init`) the step and
the gradient clip are in sd units, whatever the parameter's scale. :class:`CompiledSVIStep
<vilab.inference.engine.svi_step.CompiledSVIStep>` applies the same update inside its traced graph.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from pyro.optim import PyroOptim
from pyro.optim.clipped_adam import ClippedAdam

__all__ = ["ScaledClippedAdam", "scaled_clipped_adam"]


class ScaledClippedAdam(ClippedAdam):
    """Pyro's ``ClippedAdam`` with ``step_scales`` (``id(parameter) -> tensor``, missing: 1)."""

    def __init__(self, params, *, step_scales: Optional[dict[int, torch.Tensor]] = None, **options: Any):
        super().__init__(params, **options)
        self.step_scales = step_scales or {}

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None) -> Optional[Any]:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            group["lr"] *= group["lrd"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                scale = self.step_scales.get(id(p))
                grad = p.grad if scale is None else p.grad * scale
                grad = grad.clamp(-group["clip_norm"], group["clip_norm"])
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                update = exp_avg / (exp_avg_sq.sqrt() + group["eps"])
                p.sub_(step_size * (update if scale is None else scale * update))
        return loss


def scaled_clipped_adam(
    lr: float, lrd: float, clip_norm: float, step_scales: Optional[dict[int, torch.Tensor]] = None
) -> PyroOptim:
    """A Pyro optimiser (one :class:`ScaledClippedAdam` per parameter, as Pyro's own)."""
    return PyroOptim(
        ScaledClippedAdam, {"lr": lr, "lrd": lrd, "clip_norm": clip_norm, "step_scales": step_scales or {}}
    )
