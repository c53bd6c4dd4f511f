"""Task-transfer strategies behind one narrow interface, chosen by name from ``STRATEGIES``.

A strategy owns a :class:`TaskAffinityComputer` (affinity is measured for every strategy,
so reports compare) and turns per-task weighted losses into the losses that are summed
and back-propagated:

    transfer_losses(losses (T,), present (T,) bool, task_gradients (T, P) | None, epoch)
        -> (losses (T,), transfer weights (T, T) | None)
    on_epoch_end(epoch) -> list of event names, or (name, details dict) pairs
    phase(epoch) -> str

Gradient methods add two optional members (see :mod:`.base`):

    needs_gradients_every_step: bool        # per-task gradients every step, not every grad_interval
    shared_gradient(task_grads (T, P), present (T,), representation (T, R) | None) -> (P,)
                                            # replaces the shared experts' gradient after backward
    gradient_source: "params" | "representation"   # MGDA-UB also wants dL_t/dS

One module per method: adatt (adaTT), pcgrad, mocograd, gradnorm, mgda, uncertainty, equal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import TransferConfig
from .adatt import AdaptiveTaskTransfer, TaskAffinityComputer
from .equal import EqualWeighting
from .gradnorm import GradNorm
from .mgda import MGDA
from .mocograd import MoCoGrad
from .pcgrad import PCGrad
from .uncertainty import UncertaintyWeighting

__all__ = ["STRATEGIES", "build_strategy", "EqualWeighting", "AdaptiveTaskTransfer", "TaskAffinityComputer",
           "PCGrad", "MoCoGrad", "GradNorm", "MGDA", "UncertaintyWeighting"]


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


def _pcgrad(task_names: list[str], cfg: TransferConfig) -> PCGrad:
    return PCGrad(task_names, seed=cfg.pcgrad.seed, ema_decay=cfg.adatt.ema_decay)


def _mocograd(task_names: list[str], cfg: TransferConfig) -> MoCoGrad:
    m = cfg.mocograd
    return MoCoGrad(task_names, beta=m.beta, strength=m.strength, seed=m.seed, ema_decay=cfg.adatt.ema_decay)


def _gradnorm(task_names: list[str], cfg: TransferConfig) -> GradNorm:
    return GradNorm(task_names, alpha=cfg.gradnorm.alpha, lr=cfg.gradnorm.lr, ema_decay=cfg.adatt.ema_decay)


def _mgda(task_names: list[str], cfg: TransferConfig) -> MGDA:
    return MGDA(task_names, on=cfg.mgda.on, ema_decay=cfg.adatt.ema_decay, solver=cfg.mgda.solver)


def _uncertainty(task_names: list[str], cfg: TransferConfig) -> UncertaintyWeighting:
    return UncertaintyWeighting(task_names, cfg.adatt.ema_decay)


def _equal(task_names: list[str], cfg: TransferConfig) -> EqualWeighting:
    return EqualWeighting(task_names, cfg.adatt.ema_decay)


STRATEGIES: dict[str, Callable[[list[str], TransferConfig], Any]] = {
    "adatt": _adatt,
    "pcgrad": _pcgrad,
    "mocograd": _mocograd,
    "gradnorm": _gradnorm,
    "mgda": _mgda,
    "uncertainty": _uncertainty,
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
