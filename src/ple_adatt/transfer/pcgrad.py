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
from .linalg import gram_matrix

__all__ = ["PCGrad", "pcgrad_combine"]

_EPS = 1e-20


_GOLDEN = -7046029254386353131  # splitmix64's constants as int64 (0x9E3779B97F4A7C15, ...)
_MUL1 = -4658895280553007687
_MUL2 = -7723592293110705685


def _srl(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(x: Tensor) -> Tensor:
    x = x + _GOLDEN  # int64 arithmetic wraps, as the hash wants
    x = (x ^ _srl(x, 30)) * _MUL1
    x = (x ^ _srl(x, 27)) * _MUL2
    return x ^ _srl(x, 31)


def random_orders(n: int, seed: int, draw: Tensor | int, device: torch.device) -> Tensor:
    """One pseudo-random order of the ``n`` tasks per task, (n, n).

    Each row is the argsort of hashed keys ``splitmix64(splitmix64(seed, draw) + i * n + j)``:
    a uniformly random permutation, different for every ``draw``. It is computed on the
    device from a draw counter that lives there, so there is no host generator, no copy and
    no read; the same (seed, draw) gives the same orders on every device; and a CUDA graph
    that replays the step (and the counter's in-place increment) draws new orders each time.
    """
    draw = torch.as_tensor(draw, dtype=torch.int64, device=device)
    base = _splitmix64(_splitmix64(draw + (int(seed) << 32)))
    idx = torch.arange(n * n, dtype=torch.int64, device=device).view(n, n)
    return _splitmix64(base + idx).argsort(dim=1)


def pcgrad_combine(grads: Tensor, present: Tensor, seed: int = 0, draw: Tensor | int = 0) -> Tensor:
    """Sum of the PCGrad-projected task gradients.

    ``grads`` (T, P) per-task gradients, ``present`` (T,) bool. For each present task ``i``
    and each other present task ``j`` in a random order (:func:`random_orders` of ``seed``
    and ``draw``): if ``g_i' . g_j < 0`` then
    ``g_i' -= (g_i' . g_j / |g_j|^2) g_j``. Returns (P,).

    Every projected gradient stays a combination of the original ones, ``g_i' = A_i G``, so
    the surgery runs on the (T, T) Gram matrix ``G G^T`` for all tasks at once: one GEMM
    over P, then T small steps on the device, no host synchronisation.
    """
    g = grads.float()
    T, dev = g.shape[0], g.device
    gram = gram_matrix(g)  # (T, T)
    sq = gram.diagonal()
    rows = torch.arange(T, device=dev)
    usable = present.to(torch.bool) & (sq > _EPS)
    coef = torch.eye(T, device=dev)  # g_i' = coef[i] @ g
    orders = random_orders(T, seed, draw, dev)
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
        self.seed = int(seed)
        # the random orders' draw counter, on the model's device (not in checkpoints)
        self.register_buffer("draws", torch.zeros((), dtype=torch.long), persistent=False)

    def shared_gradient(self, task_grads: Tensor, present: Tensor, representation: Tensor | None = None) -> Tensor:
        out = pcgrad_combine(task_grads, present, self.seed, self.draws)
        self.draws.add_(1)
        return out
