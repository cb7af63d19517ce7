r"""The L-BFGS optimisation path and its inverse-Hessian estimates, as Pathfinder uses them.

L-BFGS minimises :math:`f(z) = -\log p(z)` on the unconstrained space (scipy's ``L-BFGS-B``,
without bounds); the accepted iterates :math:`z_0, \dots, z_L` and their scores are recorded.
From consecutive iterates, :math:`s_l = z_{l} - z_{l-1}` and
:math:`y_l = \nabla f(z_l) - \nabla f(z_{l-1})`; a pair enters the estimate only when it has
positive curvature, :math:`s_l^\top y_l > \epsilon \lVert y_l \rVert`. At iteration :math:`l`
the inverse Hessian is the L-BFGS matrix with a diagonal start :math:`\mathrm{diag}(\alpha_l)`,
updated along the path with Pathfinder's diagonal recursion,

.. math:: \alpha_l^{-1} = \frac{a}{b\,\alpha_{l-1}} + \frac{y_l^2}{b} - \frac{a\,s_l^2}{b\,c\,\alpha_{l-1}^2},
    \quad a = y_l^\top \mathrm{diag}(\alpha_{l-1}) y_l,\ b = y_l^\top s_l,\ c = s_l^\top \mathrm{diag}(\alpha_{l-1})^{-1} s_l,

and the last :math:`J` accepted pairs :math:`S, Y` in the compact form of Byrd, Nocedal and
Schnabel, :math:`H_l = \mathrm{diag}(\alpha_l) + W G W^\top` with
:math:`W = [S,\ \mathrm{diag}(\alpha_l) Y]`,
:math:`G = \begin{pmatrix} R^{-\top}(E + Y^\top \mathrm{diag}(\alpha_l) Y) R^{-1} & -R^{-\top} \\ -R^{-1} & 0 \end{pmatrix}`,
:math:`R = \mathrm{triu}(S^\top Y)`, :math:`E = \mathrm{diag}(S^\top Y)`. The matrix is formed
densely (:math:`D \times D`): the guides it feeds are dense Gaussians anyway.

References:
    Pathfinder: Parallel quasi-Newton variational inference, Zhang, Carpenter, Gelman and
    Vehtari, 2022, arXiv:2108.03782 (Algorithm 3 and Appendix A).
    Representations of quasi-Newton matrices and their use in limited memory methods, Byrd,
    Nocedal and Schnabel, 1994, Mathematical Programming 63.
    The recursion and the compact form follow BlackJAX's ``blackjax/optimizers/lbfgs.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import minimize

from vilab.inference.vi.density import LogDensity

__all__ = ["LBFGSPath", "lbfgs_path", "inverse_hessian_estimates"]

# A pair with s^T y below this (times |y|) carries no usable curvature (BlackJAX's epsilon).
CURVATURE_EPSILON = 1e-12


class LBFGSPath(NamedTuple):
    """The accepted L-BFGS iterates.

    Attributes:
        positions: ``(L + 1, D)`` unconstrained points, the start first.
        scores: ``(L + 1, D)`` :math:`\\nabla \\log p` at each.
        log_densities: ``(L + 1,)`` :math:`\\log p` at each.
        converged: whether L-BFGS stopped on its own tolerances (not on ``max_iterations``
            or a failed line search).
        message: scipy's reason for stopping.
    """

    positions: torch.Tensor
    scores: torch.Tensor
    log_densities: torch.Tensor
    converged: bool
    message: str


def lbfgs_path(
    density: LogDensity,
    start: torch.Tensor,
    *,
    history_size: int,
    max_iterations: int,
    relative_tolerance: float,
    gradient_tolerance: float,
) -> LBFGSPath:
    r"""Run L-BFGS on :math:`-\log p` from ``start`` ``(D,)`` and record its accepted iterates.

    ``relative_tolerance`` is scipy's ``ftol`` (stop when the relative decrease of
    :math:`-\log p` falls below it), ``gradient_tolerance`` its ``gtol`` (largest score entry).
    A point where the density is not finite counts as :math:`+\infty` for the line search.
    """
    evaluated: dict[bytes, tuple[float, np.ndarray]] = {}
    dtype = start.dtype

    def objective(x: np.ndarray):
        value, score = density.value_and_score(torch.as_tensor(x, dtype=dtype).unsqueeze(0))
        value, score = float(value[0]), score[0].numpy()
        if not (np.isfinite(value) and np.isfinite(score).all()):
            value, score = np.inf, np.zeros_like(x)
        evaluated[x.tobytes()] = (value, score)
        return -value, -score

    positions = [start.numpy().copy()]
    first = objective(positions[0])

    def record(x: np.ndarray) -> None:
        positions.append(np.array(x, copy=True))

    result = minimize(
        objective,
        positions[0],
        jac=True,
        method="L-BFGS-B",
        callback=record,
        options={
            "maxcor": history_size,
            "maxiter": max_iterations,
            "ftol": relative_tolerance,
            "gtol": gradient_tolerance,
        },
    )
    values, scores = [-first[0]], [-first[1]]
    for x in positions[1:]:
        value, score = evaluated.get(x.tobytes()) or _evaluate(objective, x)
        values.append(value)
        scores.append(score)
    as_tensor = lambda a: torch.as_tensor(np.stack(a), dtype=dtype)  # noqa: E731
    converged = bool(result.success) and result.nit < max_iterations
    return LBFGSPath(
        as_tensor(positions), as_tensor(scores), torch.as_tensor(values, dtype=dtype), converged, str(result.message)
    )


def _evaluate(objective, x: np.ndarray) -> tuple[float, np.ndarray]:
    value, gradient = objective(x)
    return -value, -gradient


def _diagonal_update(alpha: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    a = (y * alpha * y).sum()
    b = (y * s).sum()
    c = (s / alpha * s).sum()
    inverse = a / (b * alpha) + y**2 / b - a * s**2 / (b * c * alpha**2)
    return 1.0 / inverse


def _compact_inverse_hessian(alpha: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Dense :math:`H` from ``diag(alpha)`` ``(D,)`` and pairs ``s, y`` ``(m, D)``."""
    if s.shape[0] == 0:
        return torch.diag(alpha)
    S, Y = s.T, y.T
    sy = S.T @ Y
    R = torch.triu(sy)
    E = torch.diag(sy.diagonal())
    eye = torch.eye(R.shape[0], dtype=R.dtype)
    R_inv = torch.linalg.solve_triangular(R, eye, upper=True)
    alpha_y = alpha[:, None] * Y
    upper_left = R_inv.T @ (E + Y.T @ alpha_y) @ R_inv
    W = torch.cat([S, alpha_y], dim=1)
    G = torch.cat(
        [torch.cat([upper_left, -R_inv.T], dim=1), torch.cat([-R_inv, torch.zeros_like(R_inv)], dim=1)], dim=0
    )
    H = torch.diag(alpha) + W @ G @ W.T
    return (H + H.T) / 2


def inverse_hessian_estimates(path: LBFGSPath, history_size: int) -> list[torch.Tensor | None]:
    r"""Pathfinder's inverse-Hessian estimate :math:`H_l` at each iterate :math:`l = 1..L`
    (``(D, D)``, or ``None`` where it is not positive definite)."""
    positions, gradients = path.positions, -path.scores
    alpha = torch.ones(positions.shape[1], dtype=positions.dtype)
    pairs_s, pairs_y, estimates = [], [], []
    for l in range(1, positions.shape[0]):
        s, y = positions[l] - positions[l - 1], gradients[l] - gradients[l - 1]
        if float((s * y).sum()) > CURVATURE_EPSILON * float(y.norm()):
            alpha = _diagonal_update(alpha, s, y)
            pairs_s, pairs_y = (pairs_s + [s])[-history_size:], (pairs_y + [y])[-history_size:]
        if not bool((alpha > 0).all() & torch.isfinite(alpha).all()):
            estimates.append(None)
            continue
        stack = lambda pairs: torch.stack(pairs) if pairs else positions.new_zeros(0, positions.shape[1])  # noqa: E731
        H = _compact_inverse_hessian(alpha, stack(pairs_s), stack(pairs_y))
        estimates.append(H if bool(torch.isfinite(H).all()) else None)
    return estimates
