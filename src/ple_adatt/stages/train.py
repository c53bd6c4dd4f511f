"""``ple-adatt train``: both phases in one process, without the pipeline.

Writes ``OUT/phase1`` and ``OUT/phase2`` checkpoints (the same artifacts the pipeline's
train-phase1 and train-phase2 steps write). Both are written to temporary directories inside
``OUT`` and replace ``OUT/phase1`` and ``OUT/phase2`` only once Phase 2 has finished: a run
that fails in either phase leaves them as they were. Anything else in ``OUT`` is left alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_set_argument, add_tracking_arguments, stage_tracking


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset: a Parquet file or directory")
    parser.add_argument("--data-config", required=True, help="data contract YAML (configs/data/*.yaml)")
    parser.add_argument("--config", required=True, help="train config YAML (configs/train/*.yaml)")
    parser.add_argument("--validation", help="output directory of `ple-adatt validate` (optional)")
    parser.add_argument("--out", required=True, help="run directory; checkpoints go to OUT/phase1 and OUT/phase2")
    add_set_argument(parser)
    add_tracking_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..artifacts import atomic_output_dir, check_output_dir, check_run_dir
    from .train_common import run_phase1, run_phase2, summarize

    out = Path(args.out)
    inputs = (args.data, args.validation, args.config, args.data_config)
    # OUT may hold other stages' outputs (runs/ with runs/validate), not the data or configs
    check_run_dir(out, inputs=(args.data, args.config, args.data_config))
    for phase in ("phase1", "phase2"):  # each is replaced whole; OUT itself keeps what else it holds
        check_output_dir(out / phase, f"--out {out}: its", kind="checkpoint", phase=phase, inputs=inputs)
    created = not out.exists()
    try:
        # phase2 replaces OUT/phase2 first, then phase1 OUT/phase1 (with: last in, first out)
        with atomic_output_dir(out / "phase1") as p1, atomic_output_dir(out / "phase2") as p2:
            with stage_tracking("train-phase1", args) as tracker:
                run_phase1(data=args.data, data_config=args.data_config, config=args.config, out=p1,
                           validation=args.validation, overrides=args.overrides, stage="train",
                           on_epoch=tracker.log_epoch,
                           final=f"{out / 'phase1'} (in place once Phase 2 has finished)")
                tracker.log_artifact(p1, "checkpoint")
            with stage_tracking("train-phase2", args) as tracker:
                manifest = run_phase2(checkpoint=p1, data=args.data, out=p2, overrides=args.overrides,
                                      stage="train", on_epoch=tracker.log_epoch, final=out / "phase2")
                tracker.log_artifact(p2, "checkpoint")
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # made for this run, left empty by the failure
        raise
    print(summarize(manifest))
    print(f"checkpoints: {out / 'phase1'} and {out / 'phase2'}")
    return 0
