"""Errors shared across layers (stages, tracking, registry)."""

from __future__ import annotations


class StageError(RuntimeError):
    """A stage cannot proceed; the message says which input is wrong and how to fix it."""


class TrainingError(StageError):
    """Training cannot go on (no rows to train on, a diverged run); nothing is written."""
