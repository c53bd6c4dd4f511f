"""KFP component `train-phase2`: freeze the shared experts, fine-tune the cluster heads.

A thin adapter around ``ple-adatt train-phase2`` (``ple_adatt.stages.train_phase2``): the
stage is imported inside the function, so this module needs only kfp to compile. The
pipeline runs it in the CUDA image on a GPU node.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import DEFAULT_CUDA_IMAGE


@dsl.component(base_image=DEFAULT_CUDA_IMAGE, install_kfp_package=False)
def train_phase2(
    phase1_checkpoint: Input[Model],
    data: Input[Dataset],
    checkpoint: Output[Model],
    metrics: Output[Metrics],
    overrides: list[str],
    mlflow_tracking_uri: str = "",
    pipeline_run_id: str = "",
):
    """Phase 2 from ``phase1_checkpoint`` on ``data``, with the checkpoint's own config.

    Args:
        phase1_checkpoint: the train-phase1 checkpoint directory.
        data: the dataset Phase 1 was trained on.
        checkpoint: output directory, the Phase 2 checkpoint (same layout as Phase 1's).
        metrics: the per-task validation metrics with the cluster heads ("<task>.<metric>").
        overrides: train-config overrides (``training.*`` keys, e.g.
            ``training.cluster_finetune_epochs=3``); may be empty.
        mlflow_tracking_uri: MLflow tracking URI; empty keeps the container's $MLFLOW_TRACKING_URI.
        pipeline_run_id: the pipeline run (MLflow parent run) this stage belongs to.
    """
    import json
    import math
    import os

    from ple_adatt import __version__
    from ple_adatt.cli import run_as_component

    argv = ["train-phase2", "--checkpoint", phase1_checkpoint.path, "--data", data.path,
            "--out", checkpoint.path]
    for item in overrides:
        argv += ["--set", item]
    run_as_component(argv, mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=pipeline_run_id)

    with open(os.path.join(checkpoint.path, "manifest.json")) as f:
        manifest = json.load(f)
    for task, values in manifest["metrics"]["tasks"].items():
        for key, value in values.items():
            if key != "n" and isinstance(value, (int, float)) and math.isfinite(value):
                metrics.log_metric(f"{task}.{key}", float(value))
    checkpoint.metadata.update({"phase": manifest["phase"], "tasks": manifest["tasks"],
                                "component_version": __version__})
