"""KFP component `train-phase1`: train every enabled task with adaTT; write the Phase 1 checkpoint.

A thin adapter around ``ple-adatt train-phase1`` (``ple_adatt.stages.train_phase1``): the
stage is imported inside the function, so this module needs only kfp to compile. The
pipeline runs it in the CUDA image on a GPU node.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.images import DEFAULT_CUDA_IMAGE


@dsl.component(base_image=DEFAULT_CUDA_IMAGE, install_kfp_package=False)
def train_phase1(
    data: Input[Dataset],
    validation: Input[Artifact],
    checkpoint: Output[Model],
    metrics: Output[Metrics],
    overrides: list[str],
    data_config: str = "configs/data/synthetic.yaml",
    train_config: str = "configs/train/production.yaml",
    mlflow_tracking_uri: str = "",
    pipeline_run_id: str = "",
    strategy: str = "",
    only_tasks: str = "",
    seed: str = "",
):
    """Phase 1 on ``data``: only the tasks ``validation`` enabled are trained.

    Args:
        data: the dataset the validate step checked.
        validation: the validate step's output directory.
        checkpoint: output directory: checkpoint.pt (state_dict with the adaTT buffers),
            manifest.json (tasks, config, per-task metrics, affinity history), preprocessing.json.
        metrics: the per-task validation metrics of the checkpoint ("<task>.<metric>").
        overrides: train-config overrides, ``key=value`` each (``--set``), e.g.
            ``training.shared_expert_epochs=2``; may be empty.
        data_config: data contract YAML, a path inside the image.
        train_config: train config YAML, a path inside the image.
        mlflow_tracking_uri: MLflow tracking URI; empty keeps the container's $MLFLOW_TRACKING_URI.
        pipeline_run_id: the pipeline run (MLflow parent run) this stage belongs to.
        strategy: a `transfer.strategy` to train with (the compare pipeline); empty keeps the config's.
        only_tasks: comma-separated tasks to train (single-task baselines); empty trains every enabled task.
        seed: one seed of a several-seed comparison (the compare pipeline's --seeds): sets `seed`, `transfer.pcgrad.seed` and `transfer.mocograd.seed` as `ple-adatt compare --seeds` does, and then overrides must not set them (train-phase2 would apply them again); empty keeps the config's (a string: KFP passes a loop item's field as one).
    """
    import json
    import math
    import os
    import sys

    from ple_adatt import __version__
    from ple_adatt.cli import run_as_component

    argv = ["train-phase1", "--data", data.path, "--data-config", data_config, "--config", train_config,
            "--validation", validation.path, "--out", checkpoint.path]
    for item in overrides:
        argv += ["--set", item]
    if strategy:
        argv += ["--set", f"transfer.strategy={strategy}"]
    if only_tasks:
        argv += ["--only-tasks", only_tasks]
    if seed.strip():
        from ple_adatt.stages.compare import seed_overrides

        try:
            n = int(seed)
        except ValueError:
            print(f"train-phase1: error: input seed {seed!r}: expected an integer in [0, 2**32 - 1] or empty",
                  file=sys.stderr)
            raise SystemExit(2) from None
        sets = seed_overrides(n)  # the same keys as `ple-adatt compare --seeds`
        keys = {item.split("=", 1)[0] for item in sets}
        clash = [item for item in overrides if item.split("=", 1)[0].strip() in keys]
        if clash:
            # train-phase2 applies `overrides` to this checkpoint's config and has no seed input:
            # it would retrain every seed's Phase 2 under the same seed
            print(f"train-phase1: error: overrides {clash} set what the seed input ({n}) sets; Phase 2 would apply "
                  "them again to every seed's checkpoint, so drop them from overrides (the seeds are the compare "
                  "pipeline's --seeds)", file=sys.stderr)
            raise SystemExit(2)
        for item in sets:
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
