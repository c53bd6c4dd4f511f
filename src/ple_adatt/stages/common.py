"""Helpers shared by the stage CLIs: errors, ``--set`` overrides and the tracking hook.

Every stage wraps its work in :func:`stage_tracking`, which yields a tracker. Until MLflow
tracking is wired in (``ple_adatt.tracking``), the tracker is a :class:`NullTracker` that
records nothing; stages call it the same way either way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class StageError(RuntimeError):
    """A stage cannot proceed; the message says which input is wrong and how to fix it."""


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a train-config key, e.g. --set training.shared_expert_epochs=2 (repeatable)",
    )


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pipeline-run-id",
        default=os.environ.get("PLE_ADATT_PIPELINE_RUN_ID"),
        help="id of the pipeline run this stage belongs to (its MLflow parent run); "
        "default $PLE_ADATT_PIPELINE_RUN_ID",
    )
    parser.add_argument("--no-tracking", action="store_true", help="do not log this stage to MLflow")


class NullTracker:
    """The tracker interface; records nothing."""

    def log_params(self, params: dict[str, Any]) -> None:  # flattened config
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_epoch(self, record: Any) -> None:  # a training.EpochRecord
        pass

    def log_event(self, name: str, value: float, step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: Any, name: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass


@contextlib.contextmanager
def stage_tracking(stage: str, args: argparse.Namespace | None = None, **context: Any) -> Iterator[Any]:
    """Yield the tracker of one stage run (a nested MLflow run once tracking is wired in)."""
    try:
        from .. import tracking  # noqa: F401  (optional until the MLflow layer lands)
    except ImportError:
        yield NullTracker()
        return
    with tracking.stage_run(stage, args, **context) as tracker:
        yield tracker
