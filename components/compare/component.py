"""KFP component `compare`: the strategy comparison of several Phase 2 checkpoints.

A thin adapter around ``ple-adatt compare --runs`` (``ple_adatt.stages.compare``): the
stage is imported inside the function, so this module needs only kfp to compile. The
compare pipeline (``pipelines/compare_pipeline.py``) feeds it the checkpoints of its
parallel-for over strategies (and seeds, with ``--seeds``) (``dsl.Collected``).
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Model, Output

from components.images import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def compare(
    checkpoints: Input[list[Model]],
    comparison: Output[Artifact],
    comparison_html: Output[HTML],
    comparison_md: Output[Markdown],
    singles: Input[list[Model]] = None,
    mlflow_tracking_uri: str = "",
    pipeline_run_id: str = "",
):
    """Compare the Phase 2 checkpoints of several strategies on the same data.

    Args:
        checkpoints: Phase 2 checkpoint directories, one per strategy and seed (the manifest names both; several seeds of a strategy are passed as repeated --runs NAME=DIR).
        singles: Phase 2 checkpoint directories of the single-task baselines, one per task and seed (optional; a task with several seeds is grouped as <task>/seed-<n>).
        comparison: output directory: compare.html (self-contained), compare.md, compare.json, manifest.json.
        comparison_html: the comparison page in the KFP UI.
        comparison_md: the comparison table in the KFP UI.
        mlflow_tracking_uri: MLflow tracking URI; empty keeps the container's $MLFLOW_TRACKING_URI.
        pipeline_run_id: the pipeline run (MLflow parent run) this stage belongs to.
    """
    import json
    import os
    import shutil
    import sys
    import tempfile

    from ple_adatt.cli import run_as_component

    argv = ["compare", "--out", comparison.path]
    for ck in checkpoints:
        with open(os.path.join(ck.path, "manifest.json")) as f:
            strategy = json.load(f)["strategy"]
        argv += ["--runs", f"{strategy}={ck.path}"]
    # --singles wants one directory per task: the checkpoint itself (one seed), or one seed-<n>/
    # per seed, the layout `ple-adatt compare --seeds` writes (the seed is the manifest's)
    by_task: dict[str, dict[int, str]] = {}
    for ck in singles or []:
        with open(os.path.join(ck.path, "manifest.json")) as f:
            man = json.load(f)
        (task,) = man["tasks"]
        seed = int((man.get("train_config") or {}).get("seed", 0))
        if seed in by_task.setdefault(task, {}):
            print(f"compare: error: two single-task checkpoints of {task!r} with seed {seed} "
                  f"({by_task[task][seed]} and {ck.path}); each task once per seed", file=sys.stderr)
            raise SystemExit(2)
        by_task[task][seed] = ck.path
    singles_dir = tempfile.mkdtemp(prefix="singles-")
    for task, seeds in by_task.items():
        if len(seeds) == 1:
            os.symlink(next(iter(seeds.values())), os.path.join(singles_dir, task))
            continue
        os.mkdir(os.path.join(singles_dir, task))
        for seed, path in sorted(seeds.items()):
            os.symlink(path, os.path.join(singles_dir, task, f"seed-{seed}"))
    if singles:
        argv += ["--singles", singles_dir]
    run_as_component(argv, mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=pipeline_run_id)
    shutil.copyfile(os.path.join(comparison.path, "compare.html"), comparison_html.path)
    shutil.copyfile(os.path.join(comparison.path, "compare.md"), comparison_md.path)
