"""The pipeline: dataset -> validate -> train-phase1 -> train-phase2 -> report -> register.

:func:`build_pipeline` returns the KFP pipeline for a set of :class:`PipelineOptions`
(image registry, training resources, caching); the runtime inputs (dataset URI, configs,
overrides, MLflow URI) are pipeline parameters, set per run.

Placement: the training steps run in the CUDA image and request a GPU
(``set_accelerator_type`` / ``set_accelerator_limit``), CPU and memory, mount a memory-backed
``/dev/shm`` (DataLoader workers and NCCL need more than the container runtime's 64 MiB) and
tolerate the GPU node taint; every step retries transient failures with a backoff (register
too: it is idempotent, a retry after a lost answer finds the version it registered).

Caching: a cache hit runs no container, so the step logs no nested MLflow run under that
pipeline run's parent. Validate is therefore not cached unless ``cache_validate`` asks for it
(it is cheap next to training, and every run's MLflow parent then shows its validation);
the training steps are not cached unless ``cache_training`` asks; report is cached (its
inputs are the run's new checkpoints, so it hits only when the training steps did); register
never is (each run registers its model version).
"""


import re
from dataclasses import dataclass, field
from typing import Any

from kfp import dsl, kubernetes

from components.images import VERSION, image
from components.register.component import register
from components.report.component import report
from components.train_phase1.component import train_phase1
from components.train_phase2.component import train_phase2
from components.validate.component import validate

PIPELINE_NAME = "ple-adatt"
#: pipeline task name of each stage (what kfp names the task, and the folder of a local run)
TASKS = ("validate", "train-phase1", "train-phase2", "report", "register")
DATASET_TASK = "importer"


#: a memory quantity kfp's ``set_memory_*`` takes (and Kubernetes too): an integer with an optional
#: binary (Ki..Ei) or decimal (M..E) suffix; kfp refuses Kubernetes' ``k`` and decimals, Kubernetes kfp's ``K``
_MEMORY = re.compile(r"[0-9]+(Ki|Mi|Gi|Ti|Pi|Ei|M|G|T|P|E)?")
_MEMORY_LIKE = re.compile(r"([0-9]+)\s*([kmgtpe])(i?)b?", re.IGNORECASE)  # 16GB, 512mb, 8 GiB: meant 16G, 512M, 8Gi
#: a Kubernetes quantity (what an emptyDir's sizeLimit takes; kfp passes it through unchecked)
_QUANTITY = re.compile(r"\+?([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?")
#: a CPU quantity (kfp's check): cores (8, 0.5) or millicores (500m)
_CPU = re.compile(r"([0-9]*[.])?[0-9]+m?")


def _memory_hint(value: str) -> str:
    m = _MEMORY_LIKE.fullmatch(value.strip())
    if not m:
        return ""
    n, unit, binary = m.group(1), m.group(2).upper(), m.group(3)
    if binary:
        return f" (did you mean {n}{unit}i?)"
    return f" (did you mean {n}000?)" if unit == "K" else f" (did you mean {n}{unit}?)"


def quantity_error(kind: str, value: str) -> str | None:
    """Why ``value`` cannot be a step's ``kind`` quantity, or None: "cpu" and "memory" as kfp's
    resource setters take them, "size" as Kubernetes takes it (the /dev/shm emptyDir's size)."""
    value = str(value)
    if kind == "cpu":
        if _CPU.fullmatch(value) and float(value.rstrip("m")) > 0:
            return None
        return (f"{value!r} is not a Kubernetes CPU quantity: a positive number of cores or millicores, "
                "e.g. 8, 0.5 or 500m")
    if kind == "size":
        m = _QUANTITY.fullmatch(value)
        if m and float(m.group(1)) > 0:
            return None
        return (f"{value!r} is not a Kubernetes quantity{_memory_hint(value)}: a positive number with an optional "
                "suffix Ki, Mi, Gi, Ti (powers of 1024) or k, M, G, T (powers of 1000), e.g. 8Gi")
    if _MEMORY.fullmatch(value) and int(value.rstrip("KMGTPEi")) > 0:
        return None
    return (f"{value!r} is not a memory quantity kfp accepts{_memory_hint(value)}: a positive integer with an "
            "optional suffix Ki, Mi, Gi, Ti (powers of 1024) or M, G, T (powers of 1000), e.g. 16Gi")


def _check_quantities(obj: Any, fields: dict[str, str]) -> None:
    for name, kind in fields.items():
        value = getattr(obj, name)
        if value is not None and (why := quantity_error(kind, value)):
            raise ValueError(f"{name} {why}")


@dataclass(frozen=True)
class StepResources:
    """Kubernetes requests/limits of one step (quantities as Kubernetes writes them)."""

    cpu: str
    memory: str
    cpu_limit: str | None = None
    memory_limit: str | None = None

    def __post_init__(self) -> None:
        _check_quantities(self, {"cpu": "cpu", "memory": "memory", "cpu_limit": "cpu", "memory_limit": "memory"})


@dataclass(frozen=True)
class TrainingResources:
    """What the two training steps ask the cluster for."""

    gpu: bool = True  # False: CPU image, no accelerator (a CPU-only cluster; slow)
    accelerator_type: str = "nvidia.com/gpu"
    accelerators: int = 1
    cpu: str = "8"
    memory: str = "32Gi"
    shm_size: str = "8Gi"  # the memory-backed /dev/shm emptyDir

    def __post_init__(self) -> None:
        _check_quantities(self, {"cpu": "cpu", "memory": "memory", "shm_size": "size"})
        if self.gpu and self.accelerators < 1:
            raise ValueError(f"accelerators must be >= 1 with a GPU, got {self.accelerators}; "
                             "pass --no-gpu for a CPU-only cluster")


@dataclass(frozen=True)
class PipelineOptions:
    """Compile-time choices; runtime inputs are pipeline parameters."""

    registry: str | None = None  # None: $PLE_ADATT_REGISTRY, else components.images.DEFAULT_REGISTRY
    training: TrainingResources = field(default_factory=TrainingResources)
    cpu_step: StepResources = field(default_factory=lambda: StepResources(cpu="2", memory="8Gi"))
    retries: int = 2  # for transient failures (preempted node, flaky storage, an MLflow server hiccup)
    backoff: str = "60s"
    cache_training: bool = False
    cache_validate: bool = False  # a cache hit leaves the run's MLflow parent without its validate run

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")


def _cpu_step(task: Any, opts: PipelineOptions, *, retry: bool) -> None:
    r = opts.cpu_step
    task.set_container_image(image("cpu", opts.registry))
    task.set_cpu_request(r.cpu).set_memory_request(r.memory)
    task.set_cpu_limit(r.cpu_limit or r.cpu).set_memory_limit(r.memory_limit or r.memory)
    if retry and opts.retries:
        task.set_retry(num_retries=opts.retries, backoff_duration=opts.backoff, backoff_factor=2.0)


def _training_step(task: Any, opts: PipelineOptions) -> None:
    r = opts.training
    task.set_container_image(image("cuda" if r.gpu else "cpu", opts.registry))
    task.set_cpu_request(r.cpu).set_cpu_limit(r.cpu)
    task.set_memory_request(r.memory).set_memory_limit(r.memory)
    if r.gpu:
        task.set_accelerator_type(r.accelerator_type).set_accelerator_limit(r.accelerators)
        kubernetes.add_toleration(task, key=r.accelerator_type, operator="Exists", effect="NoSchedule")
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=r.shm_size)
    if opts.retries:
        task.set_retry(num_retries=opts.retries, backoff_duration=opts.backoff, backoff_factor=2.0)
    task.set_caching_options(opts.cache_training)


def import_and_validate(data_uri: Any, data_config: Any, gx_rows: Any, mlflow_tracking_uri: Any, run_id: Any,
                        opts: PipelineOptions) -> tuple[Any, Any]:
    """The first two steps every pipeline shares: import the dataset, validate it (cached only
    with ``opts.cache_validate``)."""
    dataset = dsl.importer(artifact_uri=data_uri, artifact_class=dsl.Dataset, reimport=False)
    dataset.set_display_name("dataset")
    checked = validate(data=dataset.output, data_config=data_config, gx_rows=gx_rows,
                       mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=run_id)
    _cpu_step(checked, opts, retry=True)
    checked.set_caching_options(opts.cache_validate)
    return dataset, checked


def build_pipeline(options: PipelineOptions | None = None) -> Any:
    """The ple-adatt pipeline (a KFP GraphComponent) compiled for ``options``."""
    opts = options or PipelineOptions()
    image("cpu", opts.registry)  # fail early on a malformed registry

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=f"ple-adatt {VERSION}: validate -> train-phase1 (adaTT) -> train-phase2 (cluster heads) "
        "-> report -> register in MLflow",
    )
    def ple_adatt(
        data_uri: str,
        data_config: str = "configs/data/synthetic.yaml",
        train_config: str = "configs/train/production.yaml",
        overrides: list[str] = [],  # noqa: B006  (KFP needs a literal default; never mutated)
        mlflow_tracking_uri: str = "",
        gx_rows: str = "100000",
    ):
        """Train and register the PLE-Cluster + adaTT recommender.

        Args:
            data_uri: the dataset, a Parquet file or directory (s3://, gs://, minio:// or a path).
            data_config: data contract YAML inside the image, e.g. configs/data/synthetic.yaml.
            train_config: train config YAML inside the image, e.g. configs/train/production.yaml.
            overrides: train-config overrides, ``key=value`` each, e.g. training.shared_expert_epochs=2.
            mlflow_tracking_uri: MLflow tracking server (http://...); empty: tracking.tracking_uri of the
                train config, else a store inside each pod, lost with it (make submit refuses that).
            gx_rows: rows the Great Expectations suite sees ("all" or a count).
        """
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        dataset, checked = import_and_validate(data_uri, data_config, gx_rows, mlflow_tracking_uri, run_id, opts)

        phase1 = train_phase1(data=dataset.output, validation=checked.outputs["validation"], overrides=overrides,
                              data_config=data_config, train_config=train_config,
                              mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=run_id)
        _training_step(phase1, opts)

        phase2 = train_phase2(phase1_checkpoint=phase1.outputs["checkpoint"], data=dataset.output,
                              overrides=overrides, mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=run_id)
        _training_step(phase2, opts)

        reported = report(phase1_checkpoint=phase1.outputs["checkpoint"],
                          phase2_checkpoint=phase2.outputs["checkpoint"], validation=checked.outputs["validation"],
                          mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=run_id)
        _cpu_step(reported, opts, retry=True)
        reported.set_caching_options(True)

        registered = register(checkpoint=phase2.outputs["checkpoint"], validation=checked.outputs["validation"],
                              report=reported.outputs["report"], overrides=overrides,
                              mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=run_id)
        _cpu_step(registered, opts, retry=True)  # idempotent: a retried register reuses its model version
        registered.set_caching_options(False)

    return ple_adatt


def compile_pipeline(path: str, options: PipelineOptions | None = None) -> str:
    """Write the pipeline IR YAML to ``path``; return the path."""
    from pathlib import Path

    from kfp import compiler

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(options), package_path=str(path))
    return str(path)
