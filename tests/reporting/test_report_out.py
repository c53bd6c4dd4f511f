"""An --out that is not an earlier report is refused before any work, and nothing in it is lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rephelpers import Run


def _refused(run: Run, capsys: pytest.CaptureFixture[str], out: Path, match: str, **over: object) -> None:
    args = {"phase1": run.phase1, "phase2": run.phase2, "validation": run.validation, "out": out, **over}
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    capsys.readouterr()
    assert run.cli("report", "--no-tracking", *[f"--{k}={v}" for k, v in args.items()]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("ple-adatt report: error: --out "), err
    assert match in err, err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert not list(out.parent.glob(f".{out.name}.*"))


def test_an_out_that_holds_the_checkpoints_read_is_refused_and_kept(run: Run, capsys, tmp_path: Path) -> None:
    out = tmp_path / "t6"
    shutil.copytree(run.phase1, out / "phase1")
    shutil.copytree(run.phase2, out / "phase2")
    _refused(run, capsys, out, f"holds the input {out / 'phase1'}", phase1=out / "phase1", phase2=out / "phase2")


def test_an_out_with_other_files_or_another_stages_output_is_refused(run: Run, capsys, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "stale.txt").write_text("keep me")
    _refused(run, capsys, out, "holds stale.txt, which is not an earlier report output")
    assert (out / "stale.txt").read_text() == "keep me"
    other = tmp_path / "validation-copy"
    shutil.copytree(run.validation, other)
    _refused(run, capsys, other, "holds a validation output (its manifest.json), not an earlier report output")


def test_an_earlier_report_or_an_empty_directory_is_replaced(run: Run, tmp_path: Path) -> None:
    out = tmp_path / "report"
    shutil.copytree(run.report_dir, out)
    (out / "report.md").write_text("old")
    out2 = tmp_path / "empty"
    out2.mkdir()
    for o in (out, out2):
        assert run.cli("report", "--no-tracking", "--phase1", run.phase1, "--phase2", run.phase2,
                       "--validation", run.validation, "--out", o) == 0
        assert json.loads((o / "manifest.json").read_text())["kind"] == "report"
    assert (out / "report.md").read_text() == (run.report_dir / "report.md").read_text()
