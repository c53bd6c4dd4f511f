"""KFP component `report`: the affinity / negative-transfer report of a training run.

A thin adapter around ``ple-adatt report`` (``ple_adatt.stages.report``): the stage is
imported inside the function, so this module needs only kfp to compile.
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Model, Output

from components.images import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def report(
    phase1_checkpoint: Input[Model],
    phase2_checkpoint: Input[Model],
    validation: Input[Artifact],
    report: Output[Artifact],
    report_html: Output[HTML],
    report_md: Output[Markdown],
    mlflow_tracking_uri: str = "",
    pipeline_run_id: str = "",
):
    """Write the report of the two checkpoints and the validation result.

    Args:
        phase1_checkpoint: the train-phase1 checkpoint directory.
        phase2_checkpoint: the train-phase2 checkpoint directory.
        validation: the validate step's output directory.
        report: output directory: report.html (self-contained), report.md, report.json
            (every number in the HTML), manifest.json. Register attaches it to the model.
        report_html: a copy of report.html for the KFP UI.
        report_md: a copy of report.md for the KFP UI.
        mlflow_tracking_uri: MLflow tracking URI; empty keeps the container's $MLFLOW_TRACKING_URI.
        pipeline_run_id: the pipeline run (MLflow parent run) this stage belongs to.
    """
    import os
    import shutil

    from ple_adatt import __version__
    from ple_adatt.cli import run_as_component

    run_as_component(["report", "--phase1", phase1_checkpoint.path, "--phase2", phase2_checkpoint.path,
                      "--validation", validation.path, "--out", report.path],
                     mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=pipeline_run_id)

    shutil.copyfile(os.path.join(report.path, "report.html"), report_html.path)
    shutil.copyfile(os.path.join(report.path, "report.md"), report_md.path)
    report.metadata.update({"component_version": __version__})
