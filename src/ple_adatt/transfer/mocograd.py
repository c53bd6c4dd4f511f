"""MoCoGrad: momentum-calibrated conflicting gradients (seed ``002_...``).

"Towards Task-Conflicts Momentum-Calibrated Approach for Multi-task Learning" (MoCoGrad).
Each task keeps a momentum (EMA) of its gradient on the shared experts,
``m_j <- beta m_j + (1 - beta) g_j`` (the first observation of a task is copied, so the
EMA starts unbiased). When two tasks conflict (GCD > 1, i.e. the angle between the
gradients exceeds 90 degrees, cosine < 0), the conflicting gradient is calibrated with
the other task's momentum, scaled by the ratio of the gradient's norm to the momentum's
norm and the strength ``lambda``::

    g_i <- g_i + lambda * |g_i| / |m_j| * m_j

Pairs are visited in random order (as in the paper's algorithm); the update is the sum of
the calibrated gradients. The momentum lives in this module's buffers (not in the
optimizer), so it is part of every checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import MeasuredStrategy
from .linalg import gram_matrix
from .pcgrad import random_orders

__all__ = ["MoCoGrad", "mocograd_combine"]

_EPS = 1e-12


def mocograd_combine(grads: Tensor, momentum: Tensor, present: Tensor, strength: float,
                     seed: int = 0, draw: Tensor | int = 0) -> Tensor:
    """Sum of the momentum-calibrated task gradients, (T, P), (T, P), (T,) -> (P,).

    For each present task ``i`` and each other present task ``j`` in random order: if
    ``cos(g_i', g_j) < 0`` then ``g_i' += strength * |g_i'| / |m_j| * m_j``.

    As for PCGrad, every calibrated gradient is a combination of the gradients and the
    momenta, so the loop runs on the (2T, 2T) Gram matrix of ``[G; M]``: no host reads.
    """
    g = grads.float()
    T, dev = g.shape[0], g.device
    basis = torch.cat([g, momentum.float()])  # (2T, P)
    gram = gram_matrix(basis)  # (2T, 2T)
    m_norm = gram.diagonal()[T:].clamp_min(0).sqrt()
    rows = torch.arange(T, device=dev)
    usable = present.to(torch.bool) & (m_norm > _EPS)
    coef = torch.cat([torch.eye(T, device=dev), torch.zeros(T, T, device=dev)], dim=1)  # g_i' = coef[i] @ basis
    orders = random_orders(T, seed, draw, dev)
    for k in range(T):
        j = orders[:, k]
        dot = (coef * gram[:, j].t()).sum(1)  # g_i' . g_j
        norm = ((coef @ gram) * coef).sum(1).clamp_min(0).sqrt()  # |g_i'|
        hit = usable[j] & (j != rows) & (dot < 0)  # GCD > 1
        step = torch.where(hit, strength * norm / m_norm[j].clamp_min(_EPS), 0.0)
        coef = coef.index_put((rows, T + j), step, accumulate=True)
    return (coef * present.to(g.dtype).view(-1, 1)).sum(0) @ basis


class MoCoGrad(MeasuredStrategy):
    """MoCoGrad (seed ``002_...``): calibrate conflicting gradients with the other task's momentum.

    Buffers: ``momentum`` (T, P) and ``momentum_count`` (T,), sized at the first step (P is
    the shared experts' parameter count) and restored from a checkpoint at any size.
    """

    name = "mocograd"
    needs_gradients_every_step = True
    affinity_only = False  # the gradients steer the update itself

    def __init__(self, task_names: list[str], *, beta: float = 0.9, strength: float = 0.5, seed: int = 0,
                 ema_decay: float = 0.9):
        super().__init__(task_names, ema_decay)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"mocograd beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.strength = float(strength)
        self.seed = int(seed)
        # the random orders' draw counter, on the model's device (not in checkpoints)
        self.register_buffer("draws", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("momentum", torch.zeros(self.n_tasks, 0))
        self.register_buffer("momentum_count", torch.zeros(self.n_tasks, dtype=torch.long))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "momentum")
        if saved is not None and saved.shape != self.momentum.shape:  # lazily sized buffer
            self.momentum = torch.zeros(saved.shape, dtype=saved.dtype, device=self.momentum.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def update_momentum(self, task_grads: Tensor, present: Tensor) -> None:
        """EMA of each present task's gradient; absent tasks keep theirs."""
        g = task_grads.float()
        if self.momentum.shape != g.shape:
            self.momentum = torch.zeros_like(g)
        first = (self.momentum_count == 0).view(-1, 1)
        ema = torch.where(first, g, self.beta * self.momentum + (1.0 - self.beta) * g)
        self.momentum.copy_(torch.where(present.view(-1, 1), ema, self.momentum))
        self.momentum_count.add_(present.to(torch.long))

    def shared_gradient(self, task_grads: Tensor, present: Tensor, representation: Tensor | None = None) -> Tensor:
        self.update_momentum(task_grads, present)
        out = mocograd_combine(task_grads, self.momentum, present, self.strength, self.seed, self.draws)
        self.draws.add_(1)
        return out
