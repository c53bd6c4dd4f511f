"""KFP component `register`: register the Phase 2 checkpoint as an MLflow model version.

A thin adapter around ``ple-adatt register`` (``ple_adatt.stages.register``): the stage is
imported inside the function, so this module needs only kfp to compile. Never cached: every run
that reaches it registers a new model version.
"""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components.images import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def register(
    checkpoint: Input[Model],
    validation: Input[Artifact],
    report: Input[Artifact],
    registration: Output[Artifact],
    overrides: list[str],
    mlflow_tracking_uri: str = "",
    pipeline_run_id: str = "",
):
    """Register ``checkpoint`` with its report and validation result, tagged with lineage.

    Args:
        checkpoint: the train-phase2 checkpoint directory.
        validation: the validate step's output directory (attached to the model version).
        report: the report step's output directory (attached to the model version).
        registration: output directory: registration.json (model name, version, aliases,
            champion decision, lineage), manifest.json.
        overrides: overrides of the checkpoint's train config, whose ``registry`` section
            names the model and its aliases (e.g. ``registry.model_name=ple-adatt-eu``); may be empty.
        mlflow_tracking_uri: MLflow tracking URI; empty keeps the container's $MLFLOW_TRACKING_URI.
        pipeline_run_id: the pipeline run (MLflow parent run) recorded in the lineage tags.
    """
    import json
    import os

    from ple_adatt import __version__
    from ple_adatt.cli import run_as_component

    argv = ["register", "--checkpoint", checkpoint.path, "--validation", validation.path,
            "--report", report.path, "--out", registration.path]
    for item in overrides:
        argv += ["--set", item]
    run_as_component(argv, mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=pipeline_run_id)

    with open(os.path.join(registration.path, "registration.json")) as f:
        record = json.load(f)
    registration.metadata.update({k: v for k, v in record.items() if isinstance(v, (str, int, float, bool))})
    registration.metadata["component_version"] = __version__
