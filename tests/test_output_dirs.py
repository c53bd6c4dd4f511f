"""atomic_output_dir replaces only an empty directory or an earlier output of the same kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ple_adatt.artifacts import ArtifactError, atomic_output_dir, check_output_dir


def _output(path: Path, kind: str, text: str = "x") -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"kind": kind}))
    (path / "data.txt").write_text(text)
    return path


def test_a_directory_of_another_kind_is_left_as_it_was(tmp_path: Path) -> None:
    out = _output(tmp_path / "out", "validation")
    refused = pytest.raises(ArtifactError, match=r"holds a validation output \(its manifest.json\), not an earlier "
                                                 r"checkpoint output; it was left as it was")
    with refused, atomic_output_dir(out) as tmp:  # the guard at the end reads the new output's kind
        _output(tmp / "sub", "x")
        (tmp / "manifest.json").write_text(json.dumps({"kind": "checkpoint"}))
    assert (out / "data.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left


def test_files_without_a_manifest_are_never_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "phase1").mkdir(parents=True)
    with pytest.raises(ArtifactError, match="holds phase1, which is not an earlier report output"):
        check_output_dir(out, kind="report")
    refused = pytest.raises(ArtifactError, match="holds phase1, which is not an earlier output of a stage")
    with refused, atomic_output_dir(out) as tmp:
        (tmp / "f").write_text("new")
    assert (out / "phase1").is_dir() and not (out / "f").exists()


def test_an_earlier_output_of_the_same_kind_and_an_empty_directory_are_replaced(tmp_path: Path) -> None:
    failed = _output(tmp_path / "v", "validation_failed", "old")  # a failed validation, then one that passes
    empty = tmp_path / "e"
    empty.mkdir()
    for out in (failed, empty):
        check_output_dir(out, kind="validation")
        with atomic_output_dir(out) as tmp:
            (tmp / "manifest.json").write_text(json.dumps({"kind": "validation"}))
            (tmp / "data.txt").write_text("new")
        assert (out / "data.txt").read_text() == "new"


def test_an_out_holding_an_input_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "runs" / "d.parquet"
    data.parent.mkdir()
    data.write_bytes(b"x")
    with pytest.raises(ArtifactError, match=f"--out {tmp_path / 'runs'}: holds the input {data}"):
        check_output_dir(tmp_path / "runs", kind="validation", inputs=(None, data))
    check_output_dir(tmp_path / "other", kind="validation", inputs=(data,))


def _listed_output(path: Path, kind: str, files: list[str], **extra: str) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"kind": kind, "files": files, **extra}))
    for f in files:
        (path / f).write_text("old")
    return path


def test_an_earlier_output_with_files_it_did_not_write_is_refused(tmp_path: Path) -> None:
    out = _listed_output(tmp_path / "report", "report", ["report.html", "report.json"])
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="holds notes.txt besides an earlier report output, which the stage did "
                                            "not write"):
        check_output_dir(out, kind="report")
    refused = pytest.raises(ArtifactError, match="holds notes.txt besides an earlier report output")
    with refused, atomic_output_dir(out) as tmp:
        (tmp / "manifest.json").write_text(json.dumps({"kind": "report", "files": ["report.html"]}))
        (tmp / "report.html").write_text("new")
    assert (out / "notes.txt").read_text() == "mine" and (out / "report.html").read_text() == "old"
    (out / "notes.txt").unlink()  # only its own files: replaced, also those the new output no longer writes
    check_output_dir(out, kind="report")
    with atomic_output_dir(out) as tmp:
        (tmp / "manifest.json").write_text(json.dumps({"kind": "report", "files": ["report.html"]}))
        (tmp / "report.html").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "report.html"]


def test_a_checkpoint_of_the_other_phase_is_not_replaced(tmp_path: Path) -> None:
    p2 = _listed_output(tmp_path / "p2", "checkpoint", ["checkpoint.pt"], phase="phase2")
    with pytest.raises(ArtifactError, match=r"holds a phase2 checkpoint output \(its manifest.json\), not an "
                                            "earlier phase1 checkpoint output"):
        check_output_dir(p2, kind="checkpoint", phase="phase1")
    with pytest.raises(ArtifactError, match="holds a phase2 checkpoint output"), atomic_output_dir(p2) as tmp:
        (tmp / "manifest.json").write_text(json.dumps({"kind": "checkpoint", "phase": "phase1", "files": []}))
    assert json.loads((p2 / "manifest.json").read_text())["phase"] == "phase2"
    check_output_dir(p2, kind="checkpoint", phase="phase2")
    check_output_dir(p2, kind="checkpoint")  # no phase asked: any checkpoint


def test_a_stage_refuses_an_out_holding_its_own_config(tmp_path: Path, capsys) -> None:
    from ple_adatt.cli import main
    from ple_adatt.data.synthetic import write_parquet

    root = Path(__file__).resolve().parents[1]
    data = write_parquet(tmp_path / "d.parquet", rows=200, seed=0)
    out = tmp_path / "v"
    out.mkdir()
    cfg = out / "synthetic.yaml"
    cfg.write_text((root / "configs/data/synthetic.yaml").read_text())
    assert main(["validate", "--no-tracking", "--data", str(data), "--config", str(cfg), "--out", str(out)]) == 2
    assert f"--out {out}: holds the input {cfg}" in capsys.readouterr().err
    assert cfg.is_file()
