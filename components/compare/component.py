"""KFP component `compare`: the strategy comparison of several Phase 2 checkpoints.

A thin adapter around ``ple-adatt compare --runs`` (``ple_adatt.stages.compare``): the
stage is imported inside the function, so this module needs only kfp to compile. The
compare pipeline (``pipelines/compare_pipeline.py``) feeds it the checkpoints of its
parallel-for over strategies (``dsl.Collected``).
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
        checkpoints: Phase 2 checkpoint directories, one per strategy (its manifest names it).
        singles: Phase 2 checkpoint directories of the single-task baselines, one per task (optional).
        comparison: output directory: compare.html (self-contained), compare.md, compare.json, manifest.json.
        comparison_html: the comparison page in the KFP UI.
        comparison_md: the comparison table in the KFP UI.
        mlflow_tracking_uri: MLflow tracking URI; empty keeps the container's $MLFLOW_TRACKING_URI.
        pipeline_run_id: the pipeline run (MLflow parent run) this stage belongs to.
    """
    import json
    import os
    import shutil
    import tempfile

    from ple_adatt.cli import run_as_component

    argv = ["compare", "--out", comparison.path]
    for ck in checkpoints:
        with open(os.path.join(ck.path, "manifest.json")) as f:
            strategy = json.load(f)["strategy"]
        argv += ["--runs", f"{strategy}={ck.path}"]
    singles_dir = tempfile.mkdtemp(prefix="singles-")  # --singles wants one directory per task
    for ck in singles or []:
        with open(os.path.join(ck.path, "manifest.json")) as f:
            (task,) = json.load(f)["tasks"]
        os.symlink(ck.path, os.path.join(singles_dir, task))
    if singles:
        argv += ["--singles", singles_dir]
    run_as_component(argv, mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=pipeline_run_id)
    shutil.copyfile(os.path.join(comparison.path, "compare.html"), comparison_html.path)
    shutil.copyfile(os.path.join(comparison.path, "compare.md"), comparison_md.path)
