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
