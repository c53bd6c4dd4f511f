"""The compare pipeline variant: a parallel-for over strategies, a fan-in compare step; the
main pipeline is left as it was."""

from __future__ import annotations

import pytest
import yaml

from pipelines.compare_pipeline import build_compare_pipeline, main
from pipelines.pipeline import TASKS


def test_compare_pipeline_fans_out_over_strategies_and_collects_the_checkpoints(tmp_path):
    out = tmp_path / "cmp.yaml"
    assert main(["--out", str(out), "--strategies", "adatt,pcgrad,mgda", "--registry", "reg.example.com/r",
                 "--single-tasks", "none"]) == 0
    spec, platform = list(yaml.safe_load_all(out.read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"importer", "validate", "for-loop-2", "compare"}
    loop = tasks["for-loop-2"]
    assert yaml.safe_load(loop["parameterIterator"]["items"]["raw"]) == ["adatt", "pcgrad", "mgda"]
    inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"train-phase1", "train-phase2"}
    assert inner["train-phase1"]["inputs"]["parameters"]["strategy"]["componentInputParameter"].startswith(
        "pipelinechannel--loop-item")
    src = tasks["compare"]["inputs"]["artifacts"]["checkpoints"]["taskOutputArtifact"]
    assert src == {"outputArtifactKey": "pipelinechannel--train-phase2-checkpoint", "producerTask": "for-loop-2"}
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values() if "container" in e}
    assert any(i.startswith("reg.example.com/r/ple-adatt-cuda:") for i in images)
    assert "train-phase1" in str(platform)  # GPU toleration / shm on the training steps


def test_compare_pipeline_rejects_unknown_strategies(capsys):
    with pytest.raises(ValueError, match=r"unknown strategies \['cagrad'\]; valid: adatt, pcgrad"):
        build_compare_pipeline(["adatt", "cagrad"])
    assert main(["--out", "/dev/null", "--strategies", "cagrad"]) == 2
    assert TASKS == ("validate", "train-phase1", "train-phase2", "report", "register")  # main pipeline unchanged


def test_compare_pipeline_trains_single_task_baselines_in_a_second_parallel_for(tmp_path):
    out = tmp_path / "cmp.yaml"
    assert main(["--out", str(out), "--strategies", "adatt,pcgrad", "--data-config", "configs/data/adult.yaml"]) == 0
    spec, _ = list(yaml.safe_load_all(out.read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    loops = {k: v for k, v in tasks.items() if k.startswith("for-loop")}
    items = {k: yaml.safe_load(v["parameterIterator"]["items"]["raw"]) for k, v in loops.items()}
    from ple_adatt.config import load_data_config

    adult_tasks = load_data_config("configs/data/adult.yaml").task_names
    assert sorted(items.values(), key=len) == [["adatt", "pcgrad"], adult_tasks]
    single_loop = next(k for k, v in items.items() if v == adult_tasks)
    inner = spec["components"][loops[single_loop]["componentRef"]["name"]]["dag"]["tasks"]
    p1 = next(t for t in inner.values() if t["componentRef"]["name"].startswith("comp-train-phase1"))
    assert p1["inputs"]["parameters"]["only_tasks"]["componentInputParameter"].startswith("pipelinechannel--loop-item")
    assert p1["inputs"]["parameters"]["strategy"]["runtimeValue"]["constant"] == "equal"
    singles = tasks["compare"]["inputs"]["artifacts"]["singles"]["taskOutputArtifact"]
    assert singles["producerTask"] == single_loop
