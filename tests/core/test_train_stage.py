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


def test_a_finished_run_writes_both_checkpoints_and_leaves_the_rest_of_out_alone(data, tmp_path, capsys):
    out = tmp_path / "runs"
    (out / "validate").mkdir(parents=True)  # `--out runs` beside other stages' outputs
    (out / "validate" / "manifest.json").write_text("{}")
    assert _train(data, out) == 0
    printed = capsys.readouterr().out
    # the final paths, never the temporary directories they were written to
    assert f"phase 1 checkpoint written to {out / 'phase1'} (in place once Phase 2 has finished)" in printed
    assert f"phase 2 checkpoint written to {out / 'phase2'} (" in printed
    assert ".tmp-" not in printed
    assert sorted(p.name for p in out.iterdir()) == ["phase1", "phase2", "validate"]
    assert (out / "phase2" / "checkpoint.pt").is_file() and (out / "validate" / "manifest.json").is_file()


def test_sigterm_during_training_removes_the_partial_output(data, tmp_path):
    """timeout or Kubernetes stops a step with SIGTERM: the temporary output directory goes, as
    on Ctrl-C, and the exit code says so."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ple_adatt.cli", "train", "--no-tracking", "--data", str(data), "--data-config",
           str(ROOT / "configs/data/synthetic.yaml"), "--config", str(ROOT / "configs/train/cpu_small.yaml"),
           "--out", str(out), "--set", "training.shared_expert_epochs=50"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob(".phase1.tmp-*")):  # Phase 1's temporary directory: training has begun
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(3.0)  # well inside Phase 1's 50 epochs
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM); its partial outputs were removed" in err
    assert list(tmp_path.iterdir()) == []
