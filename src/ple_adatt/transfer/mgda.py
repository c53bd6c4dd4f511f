"""MGDA: the min-norm point in the convex hull of the task gradients (seed ``003_...``).

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018
(after Désidéri's multiple-gradient descent algorithm). The common descent direction is
``d = sum_i a_i g_i`` with ``a`` solving

    min_a | sum_i a_i g_i |^2   subject to   a_i >= 0, sum_i a_i = 1,

a quadratic program over the T x T Gram matrix ``M = G G^T``. The seed's sketch calls
``scipy.optimize.minimize``; here :func:`min_norm_weights` solves it exactly in torch with
a primal active-set method (finite termination; each iteration solves the KKT system of
the equality-constrained problem on the free set), so no scipy runs in the training loop.

``on: representation`` is MGDA-UB: the weights ``a`` come from the gradients on the
shared representation (the shared experts' outputs) instead of the shared parameters,
an upper bound that is cheaper to form in the paper; the update is still ``sum a_i g_i``.
The shared update is scaled by the number n of present tasks, so that equal weights
``a_i = 1/n`` give the plain sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MeasuredStrategy

__all__ = ["MGDA", "min_norm_weights"]


def _kkt_solve(M: Tensor, free: Tensor) -> tuple[Tensor, float]:
    """Minimise a^T M a on the free set with sum(a) = 1; returns (a (T,), multiplier nu)."""
    idx = torch.nonzero(free, as_tuple=False).flatten()
    k = len(idx)
    K = torch.zeros(k + 1, k + 1, dtype=M.dtype)
    K[:k, :k] = M[idx][:, idx]
    K[:k, k] = 1.0
    K[k, :k] = 1.0
    rhs = torch.zeros(k + 1, dtype=M.dtype)
    rhs[k] = 1.0
    sol = torch.linalg.pinv(K) @ rhs  # pinv: linearly dependent gradients make M_FF singular
    a = torch.zeros(M.shape[0], dtype=M.dtype)
    a[idx] = sol[:k]
    return a, float(sol[k])


def min_norm_weights(gram: Tensor, tol: float = 1e-10, max_iter: int | None = None) -> Tensor:
    """Exact minimiser ``a`` of ``a^T gram a`` over the probability simplex, (T, T) -> (T,).

    Primal active-set method in float64: start at the vertex with the smallest norm; solve
    the equality-constrained problem on the free set; step to it or to the first bound that
    blocks; release the bound with the most negative multiplier ``(M a)_i - a^T M a`` until
    none is negative (the KKT conditions of the QP hold).
    """
    M = gram.detach().double().cpu()
    T = M.shape[0]
    if T == 1:
        return torch.ones(1, dtype=gram.dtype)
    scale = float(M.diagonal().abs().max())
    if scale <= 0:
        return torch.full((T,), 1.0 / T, dtype=gram.dtype)
    M = M / scale
    M = 0.5 * (M + M.T)
    k0 = int(M.diagonal().argmin())
    a = torch.zeros(T, dtype=M.dtype)
    a[k0] = 1.0
    free = torch.zeros(T, dtype=torch.bool)
    free[k0] = True
    for _ in range(max_iter or 20 * T + 20):
        target, _nu = _kkt_solve(M, free)
        p = target - a
        if float(p.abs().max()) <= tol:
            grad = M @ a  # multipliers of the bounds a_i >= 0 (i not free)
            mu = grad - float(a @ grad)
            mu[free] = 0.0
            j = int(mu.argmin())
            if float(mu[j]) >= -tol:
                break
            free[j] = True
            continue
        step, block = 1.0, -1
        for i in torch.nonzero(free & (p < -tol), as_tuple=False).flatten().tolist():
            t = float(-a[i] / p[i])
            if t < step:
                step, block = t, i
        a = a + step * p
        if block >= 0:
            a[block] = 0.0
            free[block] = False
    a = a.clamp_min(0.0)
    return (a / a.sum()).to(gram.dtype)


class MGDA(MeasuredStrategy):
    """MGDA / MGDA-UB, Sener & Koltun NeurIPS 2018 (seed ``003_...``): min-norm common direction.

    Buffer ``last_weights`` (T,): the ``a`` of the latest step (absent tasks 0), for logs.
    """

    name = "mgda"
    needs_gradients_every_step = True
    affinity_only = False  # the gradients steer the update itself

    def __init__(self, task_names: list[str], *, on: str = "params", ema_decay: float = 0.9):
        super().__init__(task_names, ema_decay)
        if on not in ("params", "representation"):
            raise ValueError(f"unknown mgda.on {on!r}; valid: params, representation")
        self.on = on
        self.gradient_source = on
        self.register_buffer("last_weights", torch.zeros(self.n_tasks))

    def weights(self, grads: Tensor, present: Tensor) -> Tensor:
        """Min-norm weights over the present tasks' rows of ``grads`` (T, P) -> (T,)."""
        idx = torch.nonzero(present, as_tuple=False).flatten()
        a = torch.zeros(grads.shape[0], dtype=torch.float32, device=grads.device)
        if len(idx) == 0:
            return a
        g = grads[idx].double()
        a[idx] = min_norm_weights(g @ g.T).to(a.device, torch.float32)
        return a

    def shared_gradient(self, task_grads: Tensor, present: Tensor, representation: Tensor | None = None) -> Tensor:
        src = representation if self.on == "representation" else task_grads
        if src is None:
            raise ValueError("mgda with on=representation needs the gradients on the shared representation")
        a = self.weights(src, present)
        self.last_weights.copy_(a)
        n = int(present.sum())
        return n * (a.to(task_grads.dtype) @ task_grads)
