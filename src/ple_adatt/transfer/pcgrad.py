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


def random_orders(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """One random order of the ``n`` tasks per task, (n, n): drawn on the host generator
    (reproducible from the strategy's seed, no read from the device), then moved there. On
    CUDA through pinned memory: a copy from pageable memory may wait for the stream."""
    orders = torch.stack([torch.randperm(n, generator=generator) for _ in range(n)])
    if device.type == "cuda":
        orders = orders.pin_memory()
    return orders.to(device, non_blocking=True)


def pcgrad_combine(grads: Tensor, present: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Sum of the PCGrad-projected task gradients.

    ``grads`` (T, P) per-task gradients, ``present`` (T,) bool. For each present task ``i``
    and each other present task ``j`` in a random order: if ``g_i' . g_j < 0`` then
    ``g_i' -= (g_i' . g_j / |g_j|^2) g_j``. Returns (P,).

    Every projected gradient stays a combination of the original ones, ``g_i' = A_i G``, so
    the surgery runs on the (T, T) Gram matrix ``G G^T`` for all tasks at once: one GEMM
    over P, then T small steps on the device, no host synchronisation.
    """
    g = grads.float()
    T, dev = g.shape[0], g.device
    gram = g @ g.t()  # (T, T)
    sq = gram.diagonal()
    rows = torch.arange(T, device=dev)
    usable = present.to(torch.bool) & (sq > _EPS)
    coef = torch.eye(T, device=dev)  # g_i' = coef[i] @ g
    orders = random_orders(T, generator, dev)
    for k in range(T):
        j = orders[:, k]  # task i's k-th partner
        dot = (coef * gram[:, j].t()).sum(1)  # g_i' . g_j
        hit = usable[j] & (j != rows) & (dot < 0)
        coef = coef.index_put((rows, j), torch.where(hit, -dot / sq[j].clamp_min(_EPS), 0.0), accumulate=True)
    return (coef * present.to(g.dtype).view(-1, 1)).sum(0) @ g


class PCGrad(MeasuredStrategy):
    """PCGrad, Yu et al. NeurIPS 2020 (seed ``004_...``): random-order projection of conflicting gradients."""

    name = "pcgrad"
    needs_gradients_every_step = True
    affinity_only = False  # the gradients steer the update itself

    def __init__(self, task_names: list[str], *, seed: int = 0, ema_decay: float = 0.9):
        super().__init__(task_names, ema_decay)
        self.generator = torch.Generator().manual_seed(int(seed))

    def shared_gradient(self, task_grads: Tensor, present: Tensor, representation: Tensor | None = None) -> Tensor:
        return pcgrad_combine(task_grads, present, self.generator)
