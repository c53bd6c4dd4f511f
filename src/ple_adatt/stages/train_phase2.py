"""``ple-adatt train-phase2``: freeze the shared experts and fine-tune the cluster heads."""

from __future__ import annotations

import argparse

from .common import add_set_argument, add_tracking_arguments, stage_tracking


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="Phase 1 checkpoint directory")
    parser.add_argument("--data", required=True, help="dataset: a Parquet file or directory")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--config", help="train config YAML; must match the checkpoint's model, tasks and "
                        "transfer sections (default: the checkpoint's own config)")
    parser.add_argument("--data-config", help="data contract YAML; must declare the checkpoint's tasks "
                        "identically (default: the checkpoint's own)")
    add_set_argument(parser, example="training.cluster_finetune_epochs=3")  # Phase 2 keys: training.*
    add_tracking_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..artifacts import check_output_dir
    from .train_common import run_phase2, summarize

    check_output_dir(args.out, kind="checkpoint", phase="phase2",
                     inputs=(args.checkpoint, args.data, args.config, args.data_config))  # before the MLflow run opens: a bad --out leaves no failed run
    with stage_tracking("train-phase2", args) as tracker:
        manifest = run_phase2(checkpoint=args.checkpoint, data=args.data, out=args.out, config=args.config,
                              data_config=args.data_config, overrides=args.overrides, on_epoch=tracker.log_epoch)
        tracker.log_artifact(args.out, "checkpoint")
    print(summarize(manifest))
    return 0
