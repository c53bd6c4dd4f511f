"""The group check on real runs: the synthetic data's planted groups (data.synthetic.GROUPS) are
the configured ones, so no task may be flagged as misplaced; a config that moves a task into the
wrong group must still get it flagged."""

from __future__ import annotations

import json
from pathlib import Path

from rephelpers import ROOT, Run

from ple_adatt.data.synthetic import GROUPS


def test_the_planted_groups_flag_no_task(run: Run) -> None:
    configured = {g: spec["members"] for g, spec in run.report["settings"]["task_groups"].items()}
    assert configured == GROUPS
    rows = run.report["agreement"]["tasks"]
    assert [r["task"] for r in rows if r["misplaced"]] == []
    assert run.report["summary"]["misplaced_tasks"] == []
    # tasks with a positive gap are listed as within noise, not as misplaced
    weak = [r["task"] for r in rows if r["weakly_closer"]]
    assert [w["task"] for w in run.report["summary"]["weakly_closer_tasks"]] == weak
    assert all(r["gap"] <= r["min_gap"] for r in rows if r["weakly_closer"])
    html = (run.report_dir / "report.html").read_text()
    assert "<b>0</b><span>tasks closer to another group (beyond noise)" in html
    assert "wrong group?</span>" not in html
    md = (run.report_dir / "report.md").read_text()
    assert "| tasks closer to another group (beyond noise) | none |" in md


def test_a_task_configured_in_the_wrong_group_is_flagged(run: Run, tmp_path: Path) -> None:
    """consumption_cycle (planted in consumption) configured in value: a real run, trained with
    that config (more affinity updates than the session run: batch 256, every step)."""
    value = [*GROUPS["value"], "consumption_cycle"]
    consumption = [t for t in GROUPS["consumption"] if t != "consumption_cycle"]
    train, out = tmp_path / "train", tmp_path / "report"
    assert run.cli(
        "train", "--data", run.data, "--data-config", ROOT / "configs/data/synthetic.yaml",
        "--config", ROOT / "configs/train/cpu_small.yaml", "--out", train, "--no-tracking",
        "--set", f"transfer.task_groups.value.members=[{','.join(value)}]",
        "--set", f"transfer.task_groups.consumption.members=[{','.join(consumption)}]",
        "--set", "training.cluster_finetune_epochs=1", "--set", "transfer.grad_interval=1",
        "--set", "training.batch_size=256",
    ) == 0
    assert run.cli("report", "--phase1", train / "phase1", "--phase2", train / "phase2",
                   "--validation", run.validation, "--out", out, "--no-tracking") == 0
    rep = json.loads((out / "report.json").read_text())
    flagged = {r["task"]: r for r in rep["agreement"]["tasks"] if r["misplaced"]}
    assert list(flagged) == ["consumption_cycle"]
    row = flagged["consumption_cycle"]
    assert row["group"] == "value" and row["best_other_group"] == "consumption" and row["gap"] > row["min_gap"]
    assert rep["summary"]["misplaced_tasks"] == [{"task": "consumption_cycle", "group": "value",
                                                  "closer_to": "consumption"}]
    html = (out / "report.html").read_text()
    assert "<b>1</b><span>tasks closer to another group (beyond noise)" in html
    assert "consumption_cycle (value -> consumption)" in (out / "report.md").read_text()
