"""adaTT: adaptive task transfer (seed ``000_...``, sections 2-7 and appendix A).

Measure, select, regulate: per-task gradients on the shared experts give a cosine
affinity matrix (EMA-smoothed, :class:`TaskAffinityComputer`); blended with a domain
group prior, with negative transfer blocked, it becomes softmax transfer weights; each
task's loss then borrows ``lambda * sum_j w_ij L_j`` from its affine tasks, capped at
``max_transfer_ratio`` of its own loss. A three-phase schedule (warmup -> dynamic ->
frozen) controls when transfer starts and when its weights stop moving.

The public API follows the seed's names (``compute_affinity``, ``compute_transfer_loss``,
``on_epoch_end``, ``detect_negative_transfer``, ``get_transfer_matrix``). The trainer uses
the vectorised form (:meth:`AdaptiveTaskTransfer.transfer_losses`) that takes the task
losses as one (T,) tensor with a presence mask, so no host synchronisation is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linalg import gram_matrix

__all__ = ["TaskAffinityComputer", "AdaptiveTaskTransfer"]

logger = logging.getLogger(__name__)

NORM_EPS = 1e-8  # gradient norm clamp (seed 14.5)
TEMPERATURE_EPS = 1e-6
_BLOCKED_LOGIT = -1e9  # finite, so softmax never sees an all -inf row (NaN gradients)


class TaskAffinityComputer(nn.Module):
    """EMA of the gradient cosine-similarity matrix between tasks (seed section 2, 3).

    Buffers: ``affinity_matrix`` (T, T), identity at start; ``update_count``.
    """

    def __init__(self, task_names: list[str], ema_decay: float = 0.9):
        super().__init__()
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
        self.task_names = list(task_names)
        self.n_tasks = len(self.task_names)
        self.ema_decay = float(ema_decay)
        self.register_buffer("affinity_matrix", torch.eye(self.n_tasks))
        self.register_buffer("update_count", torch.tensor(0, dtype=torch.long))

    def compute_affinity(self, task_gradients: Mapping[str, Tensor]) -> Tensor:
        """Update the EMA from flattened per-task gradients; a missing task counts as zeros.

        Returns this step's (un-smoothed) cosine matrix.
        """
        if not task_gradients:
            raise ValueError("compute_affinity needs at least one task gradient")
        unknown = sorted(set(task_gradients) - set(self.task_names))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; tasks are {self.task_names}")
        ref = next(iter(task_gradients.values())).flatten()
        rows = [task_gradients[n].flatten() if n in task_gradients else torch.zeros_like(ref)
                for n in self.task_names]
        return self.update(torch.stack(rows, dim=0))  # (T, P)

    @torch.no_grad()
    def update(self, grad_matrix: Tensor) -> Tensor:
        """EMA update from a (T, P) gradient matrix in task order (rows of zeros = absent).

        A matrix with a non-finite value (a batch whose loss overflowed) is not observed: the
        check runs on the device, so the training loop still never waits for it."""
        g = grad_matrix.float()
        normed = g / g.norm(dim=1, keepdim=True).clamp(min=NORM_EPS)
        cos = gram_matrix(normed)  # (T, T), one GEMM for all pairs
        ema = self.ema_decay * self.affinity_matrix + (1.0 - self.ema_decay) * cos
        # first update copies the observation; clamp after every update (seed N-03)
        new = torch.where(self.update_count > 0, ema, cos).clamp(-1.0, 1.0)
        ok = torch.isfinite(cos).all()
        self.affinity_matrix.copy_(torch.where(ok, new, self.affinity_matrix))
        self.update_count.add_(ok.to(self.update_count.dtype))
        return cos

    def get_affinity_matrix(self) -> Tensor:
        return self.affinity_matrix


def _group_members(spec: Any) -> tuple[list[str], float]:
    if isinstance(spec, Mapping):
        return list(spec.get("members", [])), float(spec.get("intra_strength", 0.5))
    return list(spec.members), float(spec.intra_strength)


class AdaptiveTaskTransfer(nn.Module):
    """Adaptive task transfer with group prior, blocking and a 3-phase schedule.

    Seed sections 4 (transfer loss), 5 (group prior), 6 (schedule), 7 (negative transfer).
    ``task_groups`` is ``{group: {"members": [...], "intra_strength": x}}``; members that
    are not among ``task_names`` are ignored, as in the seed.
    """

    def __init__(
        self,
        task_names: list[str],
        *,
        task_groups: Mapping[str, Any],
        inter_group_strength: float = 0.3,
        transfer_lambda: float = 0.1,
        temperature: float = 1.0,
        warmup_epochs: int,
        freeze_epoch: int,
        negative_transfer_threshold: float = -0.1,
        ema_decay: float = 0.9,
        prior_blend_start: float = 0.5,
        prior_blend_end: float = 0.1,
        max_transfer_ratio: float = 0.5,
    ):
        super().__init__()
        if freeze_epoch <= warmup_epochs:
            raise ValueError(
                f"freeze_epoch ({freeze_epoch}) must be greater than warmup_epochs ({warmup_epochs}): "
                "otherwise the dynamic phase never runs and adaTT transfers nothing it learned"
            )
        self.task_names = list(task_names)
        self.n_tasks = n = len(self.task_names)
        self.task_groups = {g: _group_members(s) for g, s in task_groups.items()}
        self.inter_group_strength = float(inter_group_strength)
        self.transfer_lambda = float(transfer_lambda)
        self.temperature = float(temperature)
        self.warmup_epochs = int(warmup_epochs)
        self.freeze_epoch = int(freeze_epoch)
        self.neg_threshold = float(negative_transfer_threshold)
        self.prior_blend_start = float(prior_blend_start)
        self.prior_blend_end = float(prior_blend_end)
        self.max_transfer_ratio = float(max_transfer_ratio)

        self.affinity_computer = TaskAffinityComputer(self.task_names, ema_decay)
        self.transfer_weights = nn.Parameter(torch.zeros(n, n))  # W, learnable
        self.register_buffer("group_prior", self._build_group_prior())
        self.register_buffer("current_epoch", torch.tensor(0, dtype=torch.long))
        self.register_buffer("is_frozen", torch.tensor(False))
        self.register_buffer("diag_mask", torch.eye(n, dtype=torch.bool), persistent=False)
        # host-side mirror of is_frozen, so the hot path never reads a device tensor
        self._frozen = False
        self.register_load_state_dict_post_hook(self._sync_after_load)

    @staticmethod
    def _sync_after_load(module: AdaptiveTaskTransfer, _keys: Any) -> None:
        module._frozen = bool(module.is_frozen)

    # ------------------------------------------------------------------ prior and schedule

    def _build_group_prior(self) -> Tensor:
        """Inter strength everywhere, intra strength within a group, zero diagonal, rows sum to 1."""
        n = self.n_tasks
        prior = torch.full((n, n), self.inter_group_strength)
        for _group, (members, strength) in self.task_groups.items():
            idx = [self.task_names.index(m) for m in members if m in self.task_names]
            for i in idx:
                for j in idx:
                    if i != j:
                        prior[i, j] = strength
        prior.fill_diagonal_(0.0)
        return prior / prior.sum(dim=1, keepdim=True).clamp(min=NORM_EPS)

    def blend_ratio(self, epoch: int) -> float:
        """Prior share r(e): linear from prior_blend_start at warmup to prior_blend_end at freeze."""
        span = self.freeze_epoch - self.warmup_epochs
        progress = min(max(epoch - self.warmup_epochs, 0) / span, 1.0)
        return self.prior_blend_start - (self.prior_blend_start - self.prior_blend_end) * progress

    def phase(self, epoch: int) -> str:
        if epoch < self.warmup_epochs:
            return "warmup"
        return "frozen" if self._frozen else "dynamic"

    # ---------------------------------------------------------------------- the weights

    def _weights(self, ratio: float, present: Tensor, detach_w: bool) -> Tensor:
        """Row-softmax transfer weights over eligible partners; others get exactly zero.

        The seed's excerpt zeroes blocked *logits* before the softmax, which still leaves a
        blocked task the weight exp(0)/sum. Its stated intent (section 7.2: "완전 차단") is
        zero weight, so blocked, absent and self entries are masked out of the softmax
        instead, and a row with no eligible partner transfers nothing.
        """
        affinity = self.affinity_computer.affinity_matrix
        w = self.transfer_weights.detach() if detach_w else self.transfer_weights
        raw = (w + affinity) * (1.0 - ratio) + self.group_prior * ratio  # R
        eligible = (affinity > self.neg_threshold) & ~self.diag_mask & present.view(1, -1)
        logits = (raw / max(self.temperature, TEMPERATURE_EPS)).masked_fill(~eligible, _BLOCKED_LOGIT)
        weights = F.softmax(logits, dim=-1)
        return weights * eligible.to(weights.dtype)

    def transfer_losses(self, losses: Tensor, present: Tensor, task_gradients: Tensor | None,
                        epoch: int) -> tuple[Tensor, Tensor | None]:
        """Vectorised :meth:`compute_transfer_loss`.

        ``losses`` (T,) weighted task losses (zero where absent), ``present`` (T,) bool,
        ``task_gradients`` (T, P) or None. Returns the enhanced losses (T,) and the weights
        used (None during warmup).
        """
        if epoch < self.warmup_epochs:  # phase 1: measure only
            if task_gradients is not None:
                self.affinity_computer.update(task_gradients)
            return losses, None
        if self._frozen:  # phase 3: fixed weights, no measurement
            weights = self._weights(self.prior_blend_end, present, detach_w=True)
        else:  # phase 2: measure, then transfer with annealed prior
            if task_gradients is not None:
                self.affinity_computer.update(task_gradients)
            weights = self._weights(self.blend_ratio(epoch), present, detach_w=False)
        mask = present.to(losses.dtype)
        losses = losses * mask
        transfer = self.transfer_lambda * (weights.to(losses.dtype) @ losses)  # (T,)
        if self.max_transfer_ratio > 0:  # G-01: cap at a share of the task's own loss
            transfer = torch.minimum(transfer, self.max_transfer_ratio * losses.detach())
        return losses + transfer * mask, weights

    def compute_transfer_loss(self, task_losses: Mapping[str, Tensor],
                              task_gradients: Mapping[str, Tensor] | None, epoch: int) -> dict[str, Tensor]:
        """Transfer-enhanced losses for the tasks present in ``task_losses`` (seed 4.1)."""
        unknown = sorted(set(task_losses) - set(self.task_names))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; tasks are {self.task_names}")
        if not task_losses:
            return {}
        if epoch < self.warmup_epochs:
            if task_gradients:
                self.affinity_computer.compute_affinity(task_gradients)
            return dict(task_losses)
        ref = next(iter(task_losses.values()))
        losses = torch.stack([task_losses[n] if n in task_losses else torch.zeros((), device=ref.device,
                                                                                   dtype=ref.dtype)
                              for n in self.task_names])
        present = torch.tensor([n in task_losses for n in self.task_names], device=ref.device)
        grads = None
        if task_gradients and not self._frozen:
            ref_g = next(iter(task_gradients.values())).flatten()
            grads = torch.stack([task_gradients[n].flatten() if n in task_gradients else torch.zeros_like(ref_g)
                                 for n in self.task_names])
        enhanced, _ = self.transfer_losses(losses, present, grads, epoch)
        return {n: enhanced[i] for i, n in enumerate(self.task_names) if n in task_losses}

    # ---------------------------------------------------------------------- schedule + API

    affinity_only = True  # gradients feed only the affinity (see transfer/base.py)

    @property
    def observing(self) -> bool:
        """Whether a measurement would change anything: not once the weights are frozen (the
        trainer then measures nothing: the affinity stays as it was at the freeze)."""
        return not self._frozen

    def observe(self, task_gradients: Tensor) -> None:
        """Per-task gradients read after the training backward (``transfer.measure_in_backward``):
        the affinity update that :meth:`transfer_losses` would have made, one step later."""
        if not self._frozen:
            self.affinity_computer.update(task_gradients)

    def on_epoch_end(self, epoch: int) -> list[str]:
        """Record the finished epoch; freeze the weights once ``epoch >= freeze_epoch``."""
        self.current_epoch.fill_(int(epoch))
        events = []
        if epoch >= self.freeze_epoch and not self._frozen:
            self.is_frozen.fill_(True)
            self._frozen = True
            logger.info("adaTT: transfer weights frozen after epoch %d", epoch + 1)  # 1-based, as the epoch lines
            events.append("adatt_freeze_epoch")
        return events

    def detect_negative_transfer(self) -> dict[str, list[str]]:
        """Pairs whose affinity is below the threshold: ``{task_i: [task_j, ...]}``."""
        a = self.affinity_computer.get_affinity_matrix().detach().cpu()
        out: dict[str, list[str]] = {}
        for i, ti in enumerate(self.task_names):
            neg = [tj for j, tj in enumerate(self.task_names) if i != j and float(a[i, j]) < self.neg_threshold]
            if neg:
                out[ti] = neg
        return out

    @torch.no_grad()
    def get_transfer_matrix(self) -> Tensor:
        """The current transfer weights with every task present, (T, T)."""
        epoch = int(self.current_epoch)
        ratio = self.prior_blend_end if self._frozen else self.blend_ratio(epoch)
        present = torch.ones(self.n_tasks, dtype=torch.bool, device=self.transfer_weights.device)
        return self._weights(ratio, present, detach_w=True).clone()
