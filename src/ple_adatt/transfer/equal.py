"""Equal weighting: the plain (fixed-weight) sum of the task losses.

The baseline every multi-task method is measured against (seed ``003_...``, "decision
criteria": start from the weighted sum). Per-task weights come from ``tasks.<t>.weight``.
"""

from __future__ import annotations

from .base import MeasuredStrategy

__all__ = ["EqualWeighting"]


class EqualWeighting(MeasuredStrategy):
    """The plain weighted sum of task losses (seed ``003_...``); affinity is still measured."""

    name = "equal"
