"""Uncertainty weighting as a strategy: equal transfer over uncertainty-weighted losses.

The weighting itself is the core's (``ple_adatt.losses.MultiTaskLoss`` with
``weighting="uncertainty"``: learned log-variances, Kendall, Gal & Cipolla, CVPR 2018);
``transfer.strategy: uncertainty`` switches it on (``TrainConfig.effective_loss_weighting``),
so there is one implementation. The strategy itself only measures affinity.
"""

from __future__ import annotations

from .base import MeasuredStrategy

__all__ = ["UncertaintyWeighting"]


class UncertaintyWeighting(MeasuredStrategy):
    """Kendall et al. 2018 "Multi-Task Learning Using Uncertainty to Weigh Losses" (seed ``003_...``).

    The learned weights live in ``criterion.log_vars`` of the system, not here.
    """

    name = "uncertainty"
