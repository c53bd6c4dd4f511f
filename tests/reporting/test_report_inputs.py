"""Bad inputs end with one clear line; single-task baselines switch TCI on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rephelpers import Run

from ple_adatt.artifacts import ArtifactError
from ple_adatt.stages.report import build_report


def _edit_manifest(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    man = json.loads((dst / "manifest.json").read_text())
    for key, value in changes.items():
        node = man
        *path, last = key.split("__")
        for p in path:
            node = node[p]
        node[last] = value
    (dst / "manifest.json").write_text(json.dumps(man))
    return dst


def _fails(run: Run, capsys: pytest.CaptureFixture[str], tmp_path: Path, match: str, **over: object) -> None:
    args = {"phase1": run.phase1, "phase2": run.phase2, "validation": run.validation, "out": tmp_path / "out"}
    args.update(over)
    argv = ["report", "--no-tracking"] + [f"--{k}={v}" for k, v in args.items() if v is not None]
    capsys.readouterr()
    assert run.cli(*argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("ple-adatt report: error: ")
    assert match in err, err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_missing_directory(run: Run, capsys, tmp_path: Path) -> None:
    _fails(run, capsys, tmp_path, "nope: no such directory; train first: `make train`", phase1=tmp_path / "nope")
    _fails(run, capsys, tmp_path, "gone: no such directory; validate the data first: `make validate`",
           validation=tmp_path / "gone")


def test_wrong_artifact_kind(run: Run, capsys, tmp_path: Path) -> None:
    _fails(run, capsys, tmp_path, "artifact kind is 'validation', expected 'checkpoint'", phase1=run.validation)
    _fails(run, capsys, tmp_path, "artifact kind is 'checkpoint', expected 'validation'", validation=run.phase1)
    _fails(run, capsys, tmp_path, "no manifest.json", phase2=run.root)


def test_phases_swapped(run: Run, capsys, tmp_path: Path) -> None:
    _fails(run, capsys, tmp_path, "is a phase2 checkpoint, expected phase1", phase1=run.phase2)
    _fails(run, capsys, tmp_path, "is a phase1 checkpoint, expected phase2", phase2=run.phase1)


def test_checkpoints_of_different_runs(run: Run, capsys, tmp_path: Path) -> None:
    tasks = json.loads((run.phase2 / "manifest.json").read_text())["tasks"]
    other = _edit_manifest(run.phase2, tmp_path / "other", tasks=tasks[:-1])
    _fails(run, capsys, tmp_path, f"different runs: their tasks differ (only in phase1: ['{tasks[-1]}']", phase2=other)
    other2 = _edit_manifest(run.phase2, tmp_path / "other2", inputs__checkpoint="0" * 64)
    _fails(run, capsys, tmp_path, "was not trained from --phase1", phase2=other2)


def test_validation_of_other_data(run: Run, capsys, tmp_path: Path) -> None:
    val = _edit_manifest(run.validation, tmp_path / "val", inputs__data="sha256:" + "1" * 64)
    _fails(run, capsys, tmp_path, "computed for a different dataset", validation=val)
    val = _edit_manifest(run.validation, tmp_path / "val2", config_hash="f" * 64)
    _fails(run, capsys, tmp_path, "which differs from the data config --phase1", validation=val)


def test_tampered_checkpoint(run: Run, capsys, tmp_path: Path) -> None:
    bad = tmp_path / "p1"
    shutil.copytree(run.phase1, bad)
    with open(bad / "checkpoint.pt", "ab") as f:
        f.write(b"x")
    _fails(run, capsys, tmp_path, "content hash does not match", phase1=bad)


def test_bad_baselines(run: Run, capsys, tmp_path: Path) -> None:
    _fails(run, capsys, tmp_path, "--baselines", baselines=tmp_path / "none.json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"val_loss": {"ctr": 0.1}}))
    _fails(run, capsys, tmp_path, "expected 'single_task_baselines'", baselines=wrong)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"kind": "single_task_baselines", "val_loss": {"nope": 0.1}}))
    _fails(run, capsys, tmp_path, "tasks ['nope'] are not tasks of this run", baselines=unknown)
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(run, capsys, tmp_path, "holds no baselines.json and no single-task checkpoint", baselines=empty)


def test_tci_from_a_baselines_json(run: Run, tmp_path: Path) -> None:
    joint = json.loads((run.phase2 / "manifest.json").read_text())["metrics"]["tasks"]
    base = tmp_path / "baselines.json"
    base.write_text(json.dumps({"kind": "single_task_baselines", "phase": "phase2",
                                "val_loss": {"ctr": joint["ctr"]["loss"] * 1.25, "cvr": joint["cvr"]["loss"] * 0.8}}))
    man = build_report(phase1=run.phase1, phase2=run.phase2, validation=run.validation, out=tmp_path / "r",
                       baselines=base)
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    rows = {r["task"]: r for r in rep["tci"]["tasks"]}
    assert rows["ctr"]["tci"] == pytest.approx(0.2) and rows["ctr"]["conflict"] is False
    assert rows["cvr"]["tci"] == pytest.approx(-0.25) and rows["cvr"]["conflict"] is True
    assert rows["cvr"]["joint_loss"] == pytest.approx(joint["cvr"]["loss"])
    assert man["summary"]["tci_conflicts"] == ["cvr"] and "baselines" in man["inputs"]
    assert "this project's definition following the mocograd notes" in rep["tci"]["definition"].lower()
    html = (tmp_path / "r" / "report.html").read_text()
    assert "TCI: task conflict intensity" in html and "-0.250" in html and "No single-task baselines" not in html
    assert "| tasks with TCI < 0 (worse jointly) | cvr |" in (tmp_path / "r" / "report.md").read_text()


def test_tci_from_a_directory_of_single_task_checkpoints(run: Run, tmp_path: Path) -> None:
    m1 = json.loads((run.phase1 / "manifest.json").read_text())
    d = tmp_path / "baselines"
    (d / "ltv" / "phase2").mkdir(parents=True)
    single = {"kind": "checkpoint", "schema_version": 1, "phase": "phase2", "tasks": ["ltv"],
              "metrics": {"tasks": {"ltv": {"loss": 0.5}}}}
    (d / "ltv" / "phase2" / "manifest.json").write_text(json.dumps(single))
    (d / "baselines.json").write_text(json.dumps({"kind": "single_task_baselines", "phase": "phase1",
                                                  "val_loss": {"ctr": m1["metrics"]["tasks"]["ctr"]["loss"]}}))
    build_report(phase1=run.phase1, phase2=run.phase2, validation=run.validation, out=tmp_path / "r", baselines=d)
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    rows = {(r["task"], r["phase"]): r for r in rep["tci"]["tasks"]}
    assert rows[("ctr", "phase1")]["tci"] == pytest.approx(0.0)
    m2 = json.loads((run.phase2 / "manifest.json").read_text())
    assert rows[("ltv", "phase2")]["tci"] == pytest.approx((0.5 - m2["metrics"]["tasks"]["ltv"]["loss"]) / 0.5)
    # a multi-task checkpoint is no baseline
    (d / "joint").symlink_to(run.phase1)
    with pytest.raises(ArtifactError, match="a baseline checkpoint must train one task"):
        build_report(phase1=run.phase1, phase2=run.phase2, validation=run.validation, out=tmp_path / "r2",
                     baselines=d)
