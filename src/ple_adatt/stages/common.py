"""Helpers shared by the stage CLIs."""

from __future__ import annotations

import argparse


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
