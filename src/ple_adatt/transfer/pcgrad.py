"""PCGrad: project conflicting gradients (seed ``004_...``, second half).

Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task Learning",
NeurIPS 2020. Two task gradients conflict when their cosine is negative; then one is
projected onto the normal plane of the other. With many tasks each task's gradient is
projected, in random order, against every other task's (original) gradient it still
conflicts with (``N(N-1)`` checks); the surgery result is the sum of the projected
gradients. Only the shared experts' gradient is changed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MeasuredStrategy

__all__ = ["PCGrad", "pcgrad_combine"]

_EPS = 1e-20


def pcgrad_combine(grads: Tensor, present: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Sum of the PCGrad-projected task gradients.

    ``grads`` (T, P) per-task gradients, ``present`` (T,) bool. For each present task ``i``
    and each other present task ``j`` in a random order: if ``g_i' . g_j < 0`` then
    ``g_i' -= (g_i' . g_j / |g_j|^2) g_j``. Returns (P,).
    """
    g = grads.float()
    idx = [int(i) for i in torch.nonzero(present.cpu(), as_tuple=False).flatten()]
    out = torch.zeros_like(g[0])
    sq = (g * g).sum(1)  # (T,)
    for i in idx:
        gi = g[i].clone()
        order = torch.randperm(len(idx), generator=generator).tolist()
        for k in order:
            j = idx[k]
            if j == i or float(sq[j]) <= _EPS:
                continue
            dot = gi @ g[j]
            if float(dot) < 0:
                gi = gi - (dot / sq[j]) * g[j]
        out += gi
    return out


class PCGrad(MeasuredStrategy):
    """PCGrad, Yu et al. NeurIPS 2020 (seed ``004_...``): random-order projection of conflicting gradients."""

    name = "pcgrad"
    needs_gradients_every_step = True

    def __init__(self, task_names: list[str], *, seed: int = 0, ema_decay: float = 0.9):
        super().__init__(task_names, ema_decay)
        self.generator = torch.Generator().manual_seed(int(seed))

    def shared_gradient(self, task_grads: Tensor, present: Tensor, representation: Tensor | None = None) -> Tensor:
        return pcgrad_combine(task_grads, present, self.generator)
