"""The five components: versions and images, committed YAML, and their functions on real artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kfp import dsl

import ple_adatt
from components import COMPONENTS
from components.build import ROOT, compile_text, load, stale, yaml_path
from components.images import DEFAULT_REGISTRY, FLAVOURS, image, registry

TRAINING = {"train-phase1", "train-phase2"}


def _executor_images(doc: dict) -> list[str]:
    return [e["container"]["image"] for e in doc["deploymentSpec"]["executors"].values()]


@pytest.mark.parametrize("stage", list(COMPONENTS))
def test_component_image_and_metadata_carry_the_package_version(stage):
    comp = load(stage)
    flavour = "cuda" if stage in TRAINING else "cpu"
    assert comp.component_spec.implementation.container.image == image(flavour, DEFAULT_REGISTRY)
    assert comp.component_spec.implementation.container.image.endswith(f"/ple-adatt-{flavour}:{ple_adatt.__version__}")
    meta = yaml.safe_load((ROOT / COMPONENTS[stage] / "metadata.yaml").read_text())
    assert meta["name"] == stage == comp.name
    assert meta["version"] == ple_adatt.__version__
    assert meta["image"] == flavour
    assert meta["stability"] in {"alpha", "beta", "stable"}
    assert (ROOT / COMPONENTS[stage] / "README.md").read_text().startswith(f"# {stage}")
    committed = yaml.safe_load(yaml_path(stage).read_text())
    assert _executor_images(committed) == [image(flavour, DEFAULT_REGISTRY)]


def test_committed_component_yaml_is_up_to_date():
    assert stale() == [], "run `make components` and commit components/*/component.yaml"


def test_a_stale_component_yaml_is_detected(tmp_path):
    for stage in COMPONENTS:
        dst = yaml_path(stage, tmp_path)
        dst.parent.mkdir(parents=True)
        dst.write_text(compile_text(stage))
    assert stale(tmp_path) == []
    target = yaml_path("report", tmp_path)
    target.write_text(target.read_text().replace(ple_adatt.__version__, "0.0.0-old"))
    yaml_path("validate", tmp_path).unlink()
    assert stale(tmp_path) == ["validate", "report"]


def test_image_names_and_registry_validation(monkeypatch):
    monkeypatch.delenv("PLE_ADATT_REGISTRY", raising=False)
    assert image("cuda") == f"{DEFAULT_REGISTRY}/ple-adatt-cuda:{ple_adatt.__version__}"
    monkeypatch.setenv("PLE_ADATT_REGISTRY", "localhost:5000/ml/")
    assert image("cpu") == f"localhost:5000/ml/ple-adatt-cpu:{ple_adatt.__version__}"
    assert image("cpu", "registry.example.com/team") == f"registry.example.com/team/ple-adatt-cpu:{ple_adatt.__version__}"
    with pytest.raises(ValueError, match="valid: cpu, cuda"):
        image("rocm")
    with pytest.raises(ValueError, match="not a valid registry"):
        registry("Has Spaces/x")
    assert set(FLAVOURS) == {"cpu", "cuda"}


# ---- the component functions on artifacts in a temp dir ------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from ple_adatt.data.synthetic import write_parquet

    return Path(write_parquet(tmp_path_factory.mktemp("data") / "tiny.parquet", rows=1200, seed=3))


def test_validate_component_writes_its_artifacts(tiny_data, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PLE_ADATT_PIPELINE_RUN_ID", raising=False)
    validation = dsl.Artifact(uri=str(tmp_path / "validate" / "validation"))
    html = dsl.HTML(uri=str(tmp_path / "validate" / "validation_html"))
    metrics = dsl.Metrics(uri=str(tmp_path / "validate" / "metrics"))
    (tmp_path / "validate").mkdir()
    load("validate").python_func(
        data=dsl.Dataset(uri=str(tiny_data)), validation=validation, validation_html=html, metrics=metrics,
        data_config=str(Path("configs/data/synthetic.yaml").resolve()), gx_rows="all", pipeline_run_id="run-42",
    )
    avail = json.loads((Path(validation.path) / "availability.json").read_text())
    assert validation.metadata["enabled_tasks"] == avail["enabled_tasks"]
    assert validation.metadata["component_version"] == ple_adatt.__version__
    assert Path(html.path).read_bytes() == (Path(validation.path) / "validation.html").read_bytes()
    assert metrics.metadata["tasks_enabled"] == len(avail["enabled_tasks"]) > 0
    assert metrics.metadata["tasks_declared"] == 16
    assert 0.0 < metrics.metadata["availability.ctr"] <= 1.0
    import os

    assert os.environ["PLE_ADATT_PIPELINE_RUN_ID"] == "run-42"  # the stage sees the pipeline run


def test_train_component_refuses_a_foreign_validation_dir_with_the_stage_exit_code(tiny_data, tmp_path, capsys,
                                                                                  monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # restored after: the component sets it
    not_validation = tmp_path / "not-validation"
    not_validation.mkdir()
    (not_validation / "manifest.json").write_text(json.dumps({"kind": "report", "schema_version": 1}))
    ckpt = dsl.Model(uri=str(tmp_path / "train-phase1" / "checkpoint"))
    with pytest.raises(SystemExit) as exc:
        load("train-phase1").python_func(
            data=dsl.Dataset(uri=str(tiny_data)), validation=dsl.Artifact(uri=str(not_validation)),
            checkpoint=ckpt, metrics=dsl.Metrics(uri=str(tmp_path / "m")), overrides=[],
            data_config="configs/data/synthetic.yaml", train_config="configs/train/cpu_small.yaml",
            mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "ple-adatt train-phase1: error:" in err and "kind is 'report'" in err
    assert not Path(ckpt.path).exists()


def test_component_folders_are_complete():
    for stage, folder in COMPONENTS.items():
        files = {p.name for p in (ROOT / folder).iterdir()}
        assert {"component.py", "metadata.yaml", "README.md", "component.yaml"} <= files, stage
        # the adapter imports only stdlib and kfp at the top; the stage is imported inside the function
        top = [ln for ln in (ROOT / folder / "component.py").read_text().splitlines() if ln.startswith(("import ", "from "))]
        assert all(ln.startswith(("from kfp", "import kfp", "from components.images")) for ln in top), top


def test_single_task_training_and_the_compare_component_on_component_artifacts(tiny_data, tmp_path, monkeypatch):
    """train-phase1 with a strategy / only_tasks, then compare over joint and single-task checkpoints."""
    from ple_adatt.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PLE_ADATT_NO_TRACKING", "1")
    val = tmp_path / "validation"
    assert main(["validate", "--data", str(tiny_data), "--config", "configs/data/synthetic.yaml",
                 "--out", str(val), "--no-tracking"]) == 0
    quick = ["training.shared_expert_epochs=1", "transfer.adatt.warmup_epochs=0", "transfer.adatt.freeze_epoch=1"]

    def phase1(name: str, strategy: str, only_tasks: str) -> dsl.Model:
        ckpt = dsl.Model(uri=str(tmp_path / name / "checkpoint"))
        load("train-phase1").python_func(
            data=dsl.Dataset(uri=str(tiny_data)), validation=dsl.Artifact(uri=str(val)), checkpoint=ckpt,
            metrics=dsl.Metrics(uri=str(tmp_path / name / "metrics")), overrides=quick,
            data_config="configs/data/synthetic.yaml", train_config="configs/train/cpu_small.yaml",
            strategy=strategy, only_tasks=only_tasks)
        return ckpt

    joint = [phase1("adatt", "adatt", "ctr,cvr"), phase1("equal", "equal", "ctr,cvr")]
    singles = [phase1("alone-ctr", "equal", "ctr"), phase1("alone-cvr", "equal", "cvr")]
    assert singles[0].metadata["tasks"] == ["ctr"] and joint[0].metadata["tasks"] == ["ctr", "cvr"]
    out = dsl.Artifact(uri=str(tmp_path / "compare" / "comparison"))
    html = dsl.HTML(uri=str(tmp_path / "compare" / "comparison_html"))
    md = dsl.Markdown(uri=str(tmp_path / "compare" / "comparison_md"))
    (tmp_path / "compare").mkdir()
    load("compare").python_func(checkpoints=joint, singles=singles, comparison=out, comparison_html=html,
                                comparison_md=md)
    report = json.loads((Path(out.path) / "compare.json").read_text())
    assert [s["name"] for s in report["strategies"]] == ["adatt", "equal"]
    assert {t["name"] for t in report["tasks"] if t.get("single_task")} == {"ctr", "cvr"}
    assert all(s["delta_m"] is not None for s in report["strategies"])
    assert Path(html.path).read_bytes() == (Path(out.path) / "compare.html").read_bytes()
