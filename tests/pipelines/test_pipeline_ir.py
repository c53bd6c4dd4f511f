"""The compiled pipeline IR: five stages wired by artifacts, GPU placement, retries, caching, images."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kfp import components as kfp_components

import ple_adatt
from pipelines.compile import main as compile_main
from pipelines.pipeline import TASKS, PipelineOptions, TrainingResources, compile_pipeline

V = ple_adatt.__version__


def _load(path: Path) -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 2, "pipeline spec + Kubernetes platform spec"
    return docs[0], docs[1]["platforms"]["kubernetes"]


@pytest.fixture(scope="module")
def ir(tmp_path_factory) -> tuple[Path, dict, dict]:
    path = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
    assert compile_main(["--out", str(path), "--registry", "registry.example.com/recsys"]) == 0
    spec, k8s = _load(path)
    return path, spec, k8s


def _executor(spec: dict, task: str) -> dict:
    label = spec["components"][spec["root"]["dag"]["tasks"][task]["componentRef"]["name"]]["executorLabel"]
    return spec["deploymentSpec"]["executors"][label]["container"]


def test_ir_loads_back_with_five_stage_tasks_and_the_dataset_importer(ir):
    path, spec, _ = ir
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {*TASKS, "importer"}
    assert spec["pipelineInfo"]["name"] == "ple-adatt"
    assert f"ple-adatt {V}" in spec["pipelineInfo"]["description"]
    loaded = kfp_components.load_component_from_file(str(path))
    assert loaded.name == "ple-adatt"
    assert set(loaded.component_spec.inputs) == {"data_uri", "data_config", "train_config", "overrides",
                                                 "mlflow_tracking_uri", "gx_rows"}
    assert not loaded.component_spec.inputs["data_uri"].optional


def test_artifact_edges_between_the_stages(ir):
    _, spec, _ = ir
    tasks = spec["root"]["dag"]["tasks"]

    def edges(task: str) -> dict[str, tuple[str, str]]:
        arts = tasks[task]["inputs"].get("artifacts", {})
        return {name: (a["taskOutputArtifact"]["producerTask"], a["taskOutputArtifact"]["outputArtifactKey"])
                for name, a in arts.items()}

    assert edges("validate") == {"data": ("importer", "artifact")}
    assert edges("train-phase1") == {"data": ("importer", "artifact"), "validation": ("validate", "validation")}
    assert edges("train-phase2") == {"phase1_checkpoint": ("train-phase1", "checkpoint"),
                                     "data": ("importer", "artifact")}
    assert edges("report") == {"phase1_checkpoint": ("train-phase1", "checkpoint"),
                               "phase2_checkpoint": ("train-phase2", "checkpoint"),
                               "validation": ("validate", "validation")}
    assert edges("register") == {"checkpoint": ("train-phase2", "checkpoint"),
                                 "validation": ("validate", "validation"), "report": ("report", "report")}
    for task in TASKS:  # every stage nests under the KFP run in MLflow
        params = tasks[task]["inputs"]["parameters"]
        assert params["pipeline_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
        assert params["mlflow_tracking_uri"] == {"componentInputParameter": "mlflow_tracking_uri"}


def test_training_steps_request_a_gpu_cpu_memory_and_shm(ir):
    _, spec, k8s = ir
    for task in ("train-phase1", "train-phase2"):
        c = _executor(spec, task)
        res = c["resources"]
        assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert res["accelerator"]["resourceCount"] == "1"
        assert res["resourceCpuRequest"] == res["resourceCpuLimit"] == "8"
        assert res["resourceMemoryRequest"] == res["resourceMemoryLimit"] == "32Gi"
        assert c["image"] == f"registry.example.com/recsys/ple-adatt-cuda:{V}"
        label = spec["components"][spec["root"]["dag"]["tasks"][task]["componentRef"]["name"]]["executorLabel"]
        ex = k8s["deploymentSpec"]["executors"][label]
        assert ex["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "8Gi",
                                         "volumeName": "dshm"}]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in ex["tolerations"]
    for task in ("validate", "report", "register"):
        c = _executor(spec, task)
        assert "accelerator" not in c.get("resources", {})
        assert c["image"] == f"registry.example.com/recsys/ple-adatt-cpu:{V}"


def test_retries_and_caching(ir):
    _, spec, _ = ir
    tasks = spec["root"]["dag"]["tasks"]
    for task in TASKS:  # register too: it is idempotent, so a retried register is safe
        assert tasks[task]["retryPolicy"]["maxRetryCount"] == 2, task
        assert tasks[task]["retryPolicy"]["backoffDuration"] == "60s", task
    cache = {t: tasks[t].get("cachingOptions", {}).get("enableCache", False) for t in TASKS}
    # a cache hit runs no container and logs no nested MLflow run: validate is cached only when asked
    assert cache == {"validate": False, "train-phase1": False, "train-phase2": False, "report": True,
                     "register": False}


def test_compile_flag_caches_validate(tmp_path):
    path = tmp_path / "p.yaml"
    assert compile_main(["--out", str(path), "--cache-validate"]) == 0
    tasks = _load(path)[0]["root"]["dag"]["tasks"]
    assert tasks["validate"]["cachingOptions"]["enableCache"] is True
    assert tasks["train-phase1"].get("cachingOptions", {}).get("enableCache", False) is False


def test_every_image_in_the_ir_is_tagged_with_the_package_version(ir):
    _, spec, _ = ir
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values() if "container" in e}
    assert images == {f"registry.example.com/recsys/ple-adatt-cpu:{V}", f"registry.example.com/recsys/ple-adatt-cuda:{V}"}


def test_options_cache_training_cpu_only_and_resources(tmp_path):
    opts = PipelineOptions(registry="localhost:5000/ml", cache_training=True, retries=0,
                           training=TrainingResources(gpu=False, cpu="4", memory="16Gi", shm_size="2Gi"))
    spec, k8s = _load(Path(compile_pipeline(str(tmp_path / "p.yaml"), opts)))
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["train-phase1"]["cachingOptions"]["enableCache"] is True
    assert all("retryPolicy" not in tasks[t] for t in TASKS)
    c = _executor(spec, "train-phase1")
    assert "accelerator" not in c["resources"] and c["resources"]["resourceCpuLimit"] == "4"
    assert c["image"] == f"localhost:5000/ml/ple-adatt-cpu:{V}"
    assert all(e["emptyDirMounts"][0]["sizeLimit"] == "2Gi" for e in k8s["deploymentSpec"]["executors"].values())
    with pytest.raises(ValueError, match="--no-gpu"):
        TrainingResources(accelerators=0)


def test_compile_rejects_a_bad_registry_in_one_line(tmp_path, capsys):
    assert compile_main(["--out", str(tmp_path / "p.yaml"), "--registry", "Not A Registry"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compile: error: image registry") and "\n" not in err
    assert not (tmp_path / "p.yaml").exists()
