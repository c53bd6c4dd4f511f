"""Compile the compare pipeline: each strategy and single-task baseline trained in parallel, then compared.

Validate, then train-phase1 -> train-phase2 per strategy in a ``dsl.ParallelFor``, the same
per task alone (single-task baselines) in a second ``dsl.ParallelFor``, then one compare
step over the collected Phase 2 checkpoints.

    python -m pipelines.compare_pipeline --out build/ple-adatt-compare.yaml \
        [--strategies adatt,pcgrad,mgda] [--single-tasks ctr,cvr | --data-config configs/data/adult.yaml] \
        [--seeds 3 | --seeds 0,1,2]

Same components, images and placement as the main pipeline (``pipelines/pipeline.py``, which
this module leaves unchanged). Strategies, single-task baselines and seeds are compile-time
lists (the baselines default to every task of ``--data-config``, and ``--single-tasks`` must
name tasks of it; ``--single-tasks none`` drops them); the data and configs are run-time
parameters, and a baseline task must be trainable under the run's data config and validation
result.

Seeds: without ``--seeds`` every branch trains at the train config's ``seed`` (``seed=<n>``
in ``overrides`` picks another) and the comparison page carries the one-seed caveat. With
``--seeds`` each loop runs over (strategy, seed) and (task, seed) pairs, train-phase1 gets
the pair's ``seed`` input (the trainer's seed and PCGrad's / MoCoGrad's task-order seeds, as
``ple-adatt compare --seeds``), and the compare step reads several seeds per strategy and
task: mean ± sd, paired intervals and verdicts, as the CLI. A count N means seeds 0..N-1
(the train config is a run-time parameter, so the compiler cannot start from its ``seed``,
which is 0 in every config shipped). Why flat loops over pairs: a ``dsl.Collected`` over
nested ``ParallelFor`` loops (seeds outside, strategies inside) compiles in kfp 2.17.0 but
kfp.local hands the fan-in a list of lists and fails, and separate per-seed loops would give
the compare step one collected list per seed, which one ``list[Model]`` input cannot take.
With ``--seeds``, ``overrides`` must not set the seed keys (train-phase1 refuses them: Phase
2 applies ``overrides`` too and has no seed input). Details: docs/compare.md.
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


def check_single_tasks(tasks: list[str], data_config: str = DEFAULT_DATA_CONFIG) -> list[str]:
    """``--single-tasks``: each a task of ``data_config`` (the tasks ``ple-adatt compare --tasks``
    checks against), once; ValueError naming the valid tasks and the closest one otherwise."""
    import difflib

    valid = tasks_of(data_config)
    bad = [t for t in tasks if t not in valid]
    if bad:
        def named(t: str) -> str:
            close = difflib.get_close_matches(t, valid, n=1)
            return f"{t!r}" + (f" (did you mean {close[0]!r}?)" if close else "")

        raise ValueError(f"--single-tasks: unknown task{'s' if len(bad) > 1 else ''} {', '.join(map(named, bad))} "
                         f"in {data_config}; tasks: {', '.join(valid)}")
    twice = next((t for i, t in enumerate(tasks) if t in tasks[:i]), None)
    if twice is not None:
        raise ValueError(f"--single-tasks: {twice!r} is named twice")
    return list(tasks)


def parse_seeds(text: str | None) -> list[int] | None:
    """``--seeds``: a count N (seeds 0..N-1) or a comma-separated list, checked as ``ple-adatt
    compare --seeds`` checks it (ValueError with its message); None when not given."""
    from ple_adatt.stages.common import StageError
    from ple_adatt.stages.compare import parse_seeds as parse

    try:
        return parse(text, 0)
    except StageError as e:
        raise ValueError(str(e)) from None


def seed_items(names: list[str], key: str, seeds: list[int]) -> list[dict[str, str]]:
    """The loop items of a several-seed compare: every name under every seed. The seed is a
    string: a loop item's field is a string channel in kfp 2.17.0 (an int item reaches the
    component as a float under kfp.local)."""
    return [{key: name, "seed": str(seed)} for seed in seeds for name in names]


def build_compare_pipeline(strategies: list[str] | tuple[str, ...] = DEFAULT_STRATEGIES,
                           options: PipelineOptions | None = None,
                           single_tasks: list[str] | None = None,
                           seeds: list[int] | None = None,
                           data_config: str = DEFAULT_DATA_CONFIG) -> Any:
    """The compare pipeline for ``strategies`` (validated against the package's names) and
    single-task baselines of ``single_tasks`` (default: every task of ``data_config``; each must
    be one of its tasks); ``seeds``: train every strategy and baseline under each (None: one run
    at the config's seed)."""
    from ple_adatt.config import STRATEGY_NAMES

    bad = [s for s in strategies if s not in STRATEGY_NAMES]
    if bad or not strategies:
        raise ValueError(f"unknown strategies {bad or '(none given)'}; valid: {', '.join(STRATEGY_NAMES)}")
    if seeds is not None:
        seeds = parse_seeds(",".join(map(str, seeds)) + ",")  # the CLI's checks: range, duplicates, empty
    opts = options or PipelineOptions()
    singles = tasks_of(data_config) if single_tasks is None else check_single_tasks(list(single_tasks), data_config)
    items: list[Any] = list(strategies) if seeds is None else seed_items(list(strategies), "strategy", seeds)
    single_items: list[Any] = singles if seeds is None else seed_items(singles, "only_tasks", seeds)
    what = "" if seeds is None else f" x seeds {','.join(map(str, seeds))}"

    @dsl.pipeline(name=PIPELINE_NAME,
                  description=f"ple-adatt {VERSION}: validate -> per strategy{what} (parallel) train-phase1 -> "
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
            overrides: train-config overrides for every branch, ``key=value`` each (``seed=<n>`` is the one seed every branch trains when compiled without --seeds; compiled with --seeds, leave seed and transfer.pcgrad/mocograd.seed out: train-phase1 refuses them).
            mlflow_tracking_uri: MLflow tracking server; empty keeps the image's $MLFLOW_TRACKING_URI.
            gx_rows: rows the Great Expectations suite sees ("all" or a count).
        """
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        dataset, checked = import_and_validate(data_uri, data_config, gx_rows, mlflow_tracking_uri, run_id, opts)
        with dsl.ParallelFor(items=items, parallelism=len(items)) as item:
            per_seed = {} if seeds is None else {"seed": item.seed}
            phase1 = train_phase1(data=dataset.output, validation=checked.outputs["validation"],
                                  overrides=overrides, data_config=data_config, train_config=train_config,
                                  mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=run_id,
                                  strategy=item if seeds is None else item.strategy, **per_seed)
            _training_step(phase1, opts)
            phase2 = train_phase2(phase1_checkpoint=phase1.outputs["checkpoint"], data=dataset.output,
                                  overrides=overrides, mlflow_tracking_uri=mlflow_tracking_uri,
                                  pipeline_run_id=run_id)
            _training_step(phase2, opts)
        if singles:
            with dsl.ParallelFor(items=single_items, parallelism=len(single_items)) as one:
                per_seed = {} if seeds is None else {"seed": one.seed}
                alone1 = train_phase1(data=dataset.output, validation=checked.outputs["validation"],
                                      overrides=overrides, data_config=data_config, train_config=train_config,
                                      mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=run_id,
                                      strategy=SINGLE_STRATEGY, only_tasks=one if seeds is None else one.only_tasks,
                                      **per_seed)
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
                             options: PipelineOptions | None = None, single_tasks: list[str] | None = None,
                             seeds: list[int] | None = None, data_config: str = DEFAULT_DATA_CONFIG) -> str:
    from pathlib import Path

    from kfp import compiler

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_compare_pipeline(strategies, options, single_tasks, seeds, data_config),
                                package_path=str(path))
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
    parser.add_argument("--seeds", metavar="N|S1,S2,...",
                        help="train every strategy and baseline under several seeds, as `ple-adatt compare --seeds`: "
                             "a count N (seeds 0..N-1) or a comma-separated list; the comparison then shows mean ± sd "
                             "and paired 95%% intervals. Default: one run at the train config's seed")
    from ple_adatt.cli import parse_args_strictly  # stdlib only at import

    args = parse_args_strictly(parser, argv)  # --strategy: "did you mean --strategies?"
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    try:
        if args.single_tasks is None:
            singles = tasks_of(args.data_config)
        elif args.single_tasks.strip().lower() == "none":
            singles = []
        else:
            singles = [t.strip() for t in args.single_tasks.split(",") if t.strip()]
        seeds = parse_seeds(args.seeds)
        path = compile_compare_pipeline(args.out, strategies, PipelineOptions(registry=args.registry), singles, seeds,
                                        args.data_config)
    except ValueError as e:
        print(f"compare_pipeline: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
