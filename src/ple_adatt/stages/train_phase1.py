"""``ple-adatt train-phase1``: train everything with the task-transfer strategy (adaTT)."""

from __future__ import annotations

import argparse

from .common import add_set_argument, add_tracking_arguments, stage_tracking


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset: a Parquet file or directory")
    parser.add_argument("--data-config", required=True, help="data contract YAML (configs/data/*.yaml)")
    parser.add_argument("--config", required=True, help="train config YAML (configs/train/*.yaml)")
    parser.add_argument("--validation", help="output directory of `ple-adatt validate`: only its enabled tasks train")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--only-tasks", help="comma-separated subset of the trainable tasks to train "
                        "(e.g. one task: a single-task baseline)")
    add_set_argument(parser)
    add_tracking_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..artifacts import check_output_dir
    from .train_common import run_phase1, summarize

    check_output_dir(args.out, kind="checkpoint", phase="phase1",
                     inputs=(args.data, args.validation, args.config, args.data_config))  # before the MLflow run opens: a bad --out leaves no failed run
    with stage_tracking("train-phase1", args) as tracker:
        manifest = run_phase1(data=args.data, data_config=args.data_config, config=args.config, out=args.out,
                              validation=args.validation, overrides=args.overrides, on_epoch=tracker.log_epoch,
                              only_tasks=[t.strip() for t in args.only_tasks.split(",") if t.strip()]
                              if args.only_tasks else None)
        tracker.log_artifact(args.out, "checkpoint")
    print(summarize(manifest))
    return 0
