"""One tiny trained run for the report tests, built once per session (~20 s on 2 cores).

Data (4000 rows) -> validate -> train (4 Phase-1 epochs: warmup, dynamic x2, frozen; one
Phase-2 epoch) with the blocking threshold raised to 0.0 so that some pairs are blocked,
then the report. Everything goes through the real CLIs in-process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ple_adatt.cli import main

ROOT = Path(__file__).resolve().parents[2]
THRESHOLD = 0.0


@dataclass
class Run:
    root: Path
    data: Path
    validation: Path
    phase1: Path
    phase2: Path
    report_dir: Path
    report: dict[str, Any]

    def cli(self, *args: str) -> int:
        return main([str(a) for a in args])


@pytest.fixture(scope="session")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("report-run")
    data, val, train, out = root / "data.parquet", root / "validation", root / "train", root / "report"
    assert main(["generate", "--out", str(data), "--rows", "4000"]) == 0
    assert main(["validate", "--data", str(data), "--config", str(ROOT / "configs/data/synthetic.yaml"),
                 "--out", str(val), "--gx-rows", "2000", "--no-tracking"]) == 0
    assert main([
        "train", "--data", str(data), "--data-config", str(ROOT / "configs/data/synthetic.yaml"),
        "--config", str(ROOT / "configs/train/cpu_small.yaml"), "--out", str(train),
        "--no-tracking",
        "--set", "training.shared_expert_epochs=4", "--set", "transfer.adatt.freeze_epoch=2",
        "--set", "training.cluster_finetune_epochs=1", "--set", "training.early_stopping_patience=10",
        "--set", f"transfer.adatt.negative_transfer_threshold={THRESHOLD}",
    ]) == 0
    assert main(["report", "--phase1", str(train / "phase1"), "--phase2", str(train / "phase2"),
                 "--validation", str(val), "--out", str(out), "--no-tracking"]) == 0
    report = json.loads((out / "report.json").read_text())
    return Run(root, data, val, train / "phase1", train / "phase2", out, report)


@pytest.fixture(scope="session")
def phase1_checkpoint(run: Run) -> Any:
    from ple_adatt.checkpoint import load_checkpoint

    return load_checkpoint(run.phase1)
