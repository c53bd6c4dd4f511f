"""Task-transfer strategies behind one narrow interface, chosen by name from ``STRATEGIES``.

A strategy owns a :class:`TaskAffinityComputer` (affinity is measured for every strategy,
so reports compare) and turns per-task weighted losses into the losses that are summed
and back-propagated:

    transfer_losses(losses (T,), present (T,) bool, task_gradients (T, P) | None, epoch)
        -> (losses (T,), transfer weights (T, T) | None)
    on_epoch_end(epoch) -> list of event names
    phase(epoch) -> str
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ..config import TransferConfig
from .adatt import AdaptiveTaskTransfer, TaskAffinityComputer

__all__ = ["STRATEGIES", "build_strategy", "EqualWeighting", "AdaptiveTaskTransfer", "TaskAffinityComputer"]


class EqualWeighting(nn.Module):
    """The plain weighted sum of task losses; affinity is still measured for the report."""

    def __init__(self, task_names: list[str], ema_decay: float = 0.9):
        super().__init__()
        self.task_names = list(task_names)
        self.affinity_computer = TaskAffinityComputer(self.task_names, ema_decay)

    def transfer_losses(self, losses: Tensor, present: Tensor, task_gradients: Tensor | None,
                        epoch: int) -> tuple[Tensor, None]:
        if task_gradients is not None:
            self.affinity_computer.update(task_gradients)
        return losses, None

    def on_epoch_end(self, epoch: int) -> list[str]:
        return []

    def phase(self, epoch: int) -> str:
        return "equal"


def _adatt(task_names: list[str], cfg: TransferConfig) -> AdaptiveTaskTransfer:
    a = cfg.adatt
    groups = {g: {"members": list(s.members), "intra_strength": s.intra_strength} for g, s in cfg.task_groups.items()}
    return AdaptiveTaskTransfer(
        task_names,
        task_groups=groups,
        inter_group_strength=a.inter_group_strength,
        transfer_lambda=a.transfer_lambda,
        temperature=a.temperature,
        warmup_epochs=a.warmup_epochs,
        freeze_epoch=a.freeze_epoch,
        negative_transfer_threshold=a.negative_transfer_threshold,
        ema_decay=a.ema_decay,
        prior_blend_start=a.prior_blend_start,
        prior_blend_end=a.prior_blend_end,
        max_transfer_ratio=a.max_transfer_ratio,
    )


def _equal(task_names: list[str], cfg: TransferConfig) -> EqualWeighting:
    return EqualWeighting(task_names, cfg.adatt.ema_decay)


STRATEGIES: dict[str, Callable[[list[str], TransferConfig], Any]] = {
    "adatt": _adatt,
    "equal": _equal,
}


def build_strategy(task_names: list[str], cfg: TransferConfig) -> Any:
    try:
        factory = STRATEGIES[cfg.strategy]
    except KeyError:
        raise ValueError(
            f"unknown transfer.strategy {cfg.strategy!r}; valid: {', '.join(sorted(STRATEGIES))}"
        ) from None
    return factory(task_names, cfg)
