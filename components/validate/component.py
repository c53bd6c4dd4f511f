"""KFP component `validate`: per-task target availability and the GX suite, before any GPU hour.

A thin adapter around ``ple-adatt validate`` (``ple_adatt.stages.validate``): the stage is
imported inside the function, so this module needs only kfp to compile.
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output

from components.images import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def validate(
    data: Input[Dataset],
    validation: Output[Artifact],
    validation_html: Output[HTML],
    metrics: Output[Metrics],
    data_config: str = "configs/data/synthetic.yaml",
    gx_rows: str = "100000",
    mlflow_tracking_uri: str = "",
    pipeline_run_id: str = "",
):
    """Validate ``data`` against its contract; write the validation directory.

    Args:
        data: the dataset (a Parquet file or a directory of Parquet files).
        validation: output directory: availability.json (``enabled_tasks``), validation.html,
            expectation_suite.json, manifest.json. Train and report read it.
        validation_html: a copy of validation.html for the KFP UI.
        metrics: tasks enabled / declared, checks passed, per-task availability rate.
        data_config: data contract YAML, a path inside the image (or the working directory).
        gx_rows: rows the GX suite sees ("all" or a count); exact counts cover every row.
        mlflow_tracking_uri: MLflow tracking URI; empty keeps the container's
            $MLFLOW_TRACKING_URI (else the stage's local store).
        pipeline_run_id: the pipeline run (MLflow parent run) this stage belongs to.
    """
    import json
    import os
    import shutil

    from ple_adatt import __version__
    from ple_adatt.cli import run_as_component

    run_as_component(["validate", "--data", data.path, "--config", data_config, "--out", validation.path,
                      "--gx-rows", gx_rows], mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=pipeline_run_id)

    shutil.copyfile(os.path.join(validation.path, "validation.html"), validation_html.path)
    with open(os.path.join(validation.path, "availability.json")) as f:
        avail = json.load(f)
    enabled = list(avail["enabled_tasks"])
    summary = avail.get("check_summary", {})
    metrics.log_metric("tasks_enabled", len(enabled))
    metrics.log_metric("tasks_declared", len(avail.get("tasks", {})))
    for key in ("passed", "total"):
        if isinstance(summary.get(key), int):
            metrics.log_metric(f"checks_{key}", summary[key])
    for task, info in avail.get("tasks", {}).items():
        if isinstance(info.get("rate"), (int, float)):
            metrics.log_metric(f"availability.{task}", float(info["rate"]))
    validation.metadata.update({"enabled_tasks": enabled, "component_version": __version__})
