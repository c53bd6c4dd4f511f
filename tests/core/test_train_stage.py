"""``ple-adatt train`` (both phases in one process) writes OUT whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from ple_adatt import cli
from ple_adatt.data.synthetic import write_parquet
from ple_adatt.errors import StageError

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--set", "training.shared_expert_epochs=1", "--set", "training.cluster_finetune_epochs=1",
        "--set", "transfer.adatt.warmup_epochs=0", "--set", "transfer.adatt.freeze_epoch=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_parquet(tmp_path_factory.mktemp("train-stage") / "syn.parquet", rows=3000, seed=0)


def _train(data: Path, out: Path) -> int:
    return cli.main(["train", "--no-tracking", "--data", str(data), "--data-config",
                     str(ROOT / "configs/data/synthetic.yaml"), "--config", str(ROOT / "configs/train/cpu_small.yaml"),
                     "--out", str(out), *FAST])


def test_a_phase2_failure_leaves_no_phase1_behind_and_keeps_the_old_run(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "marker").write_text("the previous run")

    def broken(**kwargs):
        raise StageError("phase 2 broke")

    monkeypatch.setattr("ple_adatt.stages.train_common.run_phase2", broken)
    assert _train(data, out) == 2
    assert "phase 2 broke" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["marker"]  # the old run, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary directory left


def test_a_finished_run_writes_both_checkpoints(data, tmp_path):
    out = tmp_path / "run"
    assert _train(data, out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["phase1", "phase2"]
    assert (out / "phase2" / "checkpoint.pt").is_file()
