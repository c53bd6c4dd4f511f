"""Helpers shared by the stage CLIs: errors, ``--set`` overrides and the tracking hook.

Every stage wraps its work in :func:`stage_tracking`, which yields a tracker (a nested
MLflow run, or a :class:`NullTracker` with ``--no-tracking``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from typing import Any

from ..errors import StageError
from ..tracking import NullTracker, stage_run

__all__ = ["StageError", "NullTracker", "NO_TRACKING_ENV", "add_set_argument", "add_tracking_arguments",
           "no_tracking_env", "stage_tracking"]

NO_TRACKING_ENV = "PLE_ADATT_NO_TRACKING"


def no_tracking_env() -> bool:
    """Whether ``$PLE_ADATT_NO_TRACKING`` turns tracking off (1, true, yes)."""
    return os.environ.get(NO_TRACKING_ENV, "").strip().lower() in ("1", "true", "yes")


def add_set_argument(parser: argparse.ArgumentParser, example: str = "training.shared_expert_epochs=2") -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a train-config key, e.g. --set {example} (repeatable)",
    )


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pipeline-run-id",
        default=os.environ.get("PLE_ADATT_PIPELINE_RUN_ID"),
        help="id of the pipeline run this stage belongs to (its MLflow parent run); "
        "default $PLE_ADATT_PIPELINE_RUN_ID",
    )
    parser.add_argument(
        "--no-tracking",
        action="store_true",
        default=no_tracking_env(),
        help="do not log this stage to MLflow (default on when $PLE_ADATT_NO_TRACKING is 1)",
    )


@contextlib.contextmanager
def stage_tracking(stage: str, args: argparse.Namespace | None = None, **context: Any) -> Iterator[Any]:
    """Yield the tracker of one stage run: a nested MLflow run (see ``ple_adatt.tracking``)."""
    with stage_run(stage, args, **context) as tracker:
        yield tracker
