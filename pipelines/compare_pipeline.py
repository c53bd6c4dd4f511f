"""Compile the compare pipeline: each strategy and single-task baseline trained in parallel, then compared.

Validate, then train-phase1 -> train-phase2 per strategy in a ``dsl.ParallelFor``, the same
per task alone (single-task baselines) in a second ``dsl.ParallelFor``, then one compare
step over the collected Phase 2 checkpoints.

    python -m pipelines.compare_pipeline --out build/ple-adatt-compare.yaml \
        [--strategies adatt,pcgrad,mgda] [--single-tasks ctr,cvr | --data-config configs/data/adult.yaml]

Same components, images and placement as the main pipeline (``pipelines/pipeline.py``, which
this module leaves unchanged). Strategies and single-task baselines are compile-time lists
(the baselines default to every task of ``--data-config``; ``--single-tasks none`` drops
them); the data and configs are run-time parameters, and a baseline task must be trainable
under the run's data config and validation result.

One seed: every branch trains at the train config's ``seed`` (``seed=<n>`` in ``overrides``
picks another), so the comparison page carries the one-seed caveat. ``ple-adatt compare
--seeds`` trains several; per-seed branches here would need a ``seed`` input on train-phase1
and a compare component that keeps the single-task checkpoints of different seeds apart
(docs/compare.md). For several seeds, run this pipeline once per seed and compare the
checkpoints with ``ple-adatt compare --runs NAME=DIR`` (a name repeated once per seed).
"""


import argparse
import sys
from typing import Any

from kfp import dsl

from components.compare.component import compare
from components.images import VERSION
from components.train_phase1.component import train_phase1
from components.train_phase2.component import train_phase2
from pipelines.pipeline import PipelineOptions, _cpu_step, _training_step, import_and_validate

PIPELINE_NAME = "ple-adatt-compare"
DEFAULT_STRATEGIES = ("adatt", "pcgrad", "mocograd", "gradnorm", "mgda", "uncertainty", "equal")
DEFAULT_DATA_CONFIG = "configs/data/synthetic.yaml"
SINGLE_STRATEGY = "equal"  # a model with one task has nothing to transfer


def tasks_of(data_config: str) -> list[str]:
    from ple_adatt.config import load_data_config

    return load_data_config(data_config).task_names


def build_compare_pipeline(strategies: list[str] | tuple[str, ...] = DEFAULT_STRATEGIES,
                           options: PipelineOptions | None = None,
                           single_tasks: list[str] | None = None) -> Any:
    """The compare pipeline for ``strategies`` (validated against the package's names) and
    single-task baselines of ``single_tasks`` (default: every task of the synthetic config)."""
    from ple_adatt.config import STRATEGY_NAMES

    bad = [s for s in strategies if s not in STRATEGY_NAMES]
    if bad or not strategies:
        raise ValueError(f"unknown strategies {bad or '(none given)'}; valid: {', '.join(STRATEGY_NAMES)}")
    opts = options or PipelineOptions()
    items = list(strategies)
    singles = list(tasks_of(DEFAULT_DATA_CONFIG) if single_tasks is None else single_tasks)

    @dsl.pipeline(name=PIPELINE_NAME,
                  description=f"ple-adatt {VERSION}: validate -> per strategy (parallel) train-phase1 -> "
                  "train-phase2 -> compare")
    def ple_adatt_compare(
        data_uri: str,
        data_config: str = "configs/data/synthetic.yaml",
        train_config: str = "configs/train/production.yaml",
        overrides: list[str] = [],  # noqa: B006  (KFP needs a literal default; never mutated)
        mlflow_tracking_uri: str = "",
        gx_rows: str = "100000",
    ):
        """Train the same data with several task-transfer strategies and compare them.

        Args:
            data_uri: the dataset, a Parquet file or directory.
            data_config: data contract YAML inside the image.
            train_config: train config YAML inside the image; each branch sets transfer.strategy.
            overrides: train-config overrides for every branch, ``key=value`` each (``seed=<n>``:
                the one seed every branch trains; this pipeline runs one seed).
            mlflow_tracking_uri: MLflow tracking server; empty keeps the image's $MLFLOW_TRACKING_URI.
            gx_rows: rows the Great Expectations suite sees ("all" or a count).
        """
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        dataset, checked = import_and_validate(data_uri, data_config, gx_rows, mlflow_tracking_uri, run_id, opts)
        with dsl.ParallelFor(items=items, parallelism=len(items)) as strategy:
            phase1 = train_phase1(data=dataset.output, validation=checked.outputs["validation"],
                                  overrides=overrides, data_config=data_config, train_config=train_config,
                                  mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=run_id,
                                  strategy=strategy)
            _training_step(phase1, opts)
            phase2 = train_phase2(phase1_checkpoint=phase1.outputs["checkpoint"], data=dataset.output,
                                  overrides=overrides, mlflow_tracking_uri=mlflow_tracking_uri,
                                  pipeline_run_id=run_id)
            _training_step(phase2, opts)
        if singles:
            with dsl.ParallelFor(items=singles, parallelism=len(singles)) as task:
                alone1 = train_phase1(data=dataset.output, validation=checked.outputs["validation"],
                                      overrides=overrides, data_config=data_config, train_config=train_config,
                                      mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=run_id,
                                      strategy=SINGLE_STRATEGY, only_tasks=task)
                alone1.set_display_name("single-task-phase1")
                _training_step(alone1, opts)
                alone2 = train_phase2(phase1_checkpoint=alone1.outputs["checkpoint"], data=dataset.output,
                                      overrides=overrides, mlflow_tracking_uri=mlflow_tracking_uri,
                                      pipeline_run_id=run_id)
                alone2.set_display_name("single-task-phase2")
                _training_step(alone2, opts)
            compared = compare(checkpoints=dsl.Collected(phase2.outputs["checkpoint"]),
                               singles=dsl.Collected(alone2.outputs["checkpoint"]),
                               mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=run_id)
        else:
            compared = compare(checkpoints=dsl.Collected(phase2.outputs["checkpoint"]),
                               mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=run_id)
        _cpu_step(compared, opts, retry=True)

    return ple_adatt_compare


def compile_compare_pipeline(path: str, strategies: list[str] | tuple[str, ...] = DEFAULT_STRATEGIES,
                             options: PipelineOptions | None = None, single_tasks: list[str] | None = None) -> str:
    from pathlib import Path

    from kfp import compiler

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_compare_pipeline(strategies, options, single_tasks), package_path=str(path))
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.compare_pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/ple-adatt-compare.yaml", help="IR YAML to write")
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES), help="comma-separated strategies")
    parser.add_argument("--registry", help="image registry (default $PLE_ADATT_REGISTRY or the package default)")
    parser.add_argument("--single-tasks", help="comma-separated tasks to train alone as baselines, or 'none' "
                        "(default: every task of --data-config)")
    parser.add_argument("--data-config", default=DEFAULT_DATA_CONFIG,
                        help=f"data config whose tasks are the default baselines (default {DEFAULT_DATA_CONFIG})")
    args = parser.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    try:
        if args.single_tasks is None:
            singles = tasks_of(args.data_config)
        elif args.single_tasks.strip().lower() == "none":
            singles = []
        else:
            singles = [t.strip() for t in args.single_tasks.split(",") if t.strip()]
        path = compile_compare_pipeline(args.out, strategies, PipelineOptions(registry=args.registry), singles)
    except ValueError as e:
        print(f"compare_pipeline: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
