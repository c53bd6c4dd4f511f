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
    return _train_with(data, out, ROOT / "configs/train/cpu_small.yaml")


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


def _train_with(data: Path, out: Path, config: Path, *extra: str) -> int:
    return cli.main(["train", "--no-tracking", "--data", str(data), "--data-config",
                     str(ROOT / "configs/data/synthetic.yaml"), "--config", str(config), "--out", str(out),
                     *FAST, *extra])


def test_out_must_not_be_another_stages_output_or_hold_the_inputs(data, tmp_path, capsys):
    """`--out runs/validate` left a validate output that `make validate` then refused to replace;
    `--out configs` put phase1/ and phase2/ among the configs."""
    validate = tmp_path / "validate"
    validate.mkdir()
    (validate / "manifest.json").write_text('{"kind": "validation", "files": []}')
    assert _train_with(data, validate, ROOT / "configs/train/cpu_small.yaml") == 2
    assert f"--out {validate}: is a validation output (its manifest.json), not a run directory" in \
        capsys.readouterr().err
    assert sorted(p.name for p in validate.iterdir()) == ["manifest.json"]

    configs = tmp_path / "configs"
    configs.mkdir()
    config = configs / "train.yaml"
    config.write_text((ROOT / "configs/train/cpu_small.yaml").read_text())
    assert _train_with(data, configs, config) == 2
    assert f"--out {configs}: holds the input {config}; give the run a directory of its own" in capsys.readouterr().err
    assert sorted(p.name for p in configs.iterdir()) == ["train.yaml"]


def test_out_may_hold_other_stages_outputs_the_run_reads(data, tmp_path, monkeypatch, capsys):
    """`--out runs --validation runs/validate`: the validation result is another stage's output
    beside the run's phase1/ and phase2/, never written to, so OUT may hold it."""
    validate = tmp_path / "runs" / "validate"
    validate.mkdir(parents=True)
    (validate / "manifest.json").write_text('{"kind": "validation", "files": []}')

    def reached(**kwargs):
        raise StageError("the --out checks passed")

    monkeypatch.setattr("ple_adatt.stages.train_common.run_phase1", reached)
    assert _train_with(data, tmp_path / "runs", ROOT / "configs/train/cpu_small.yaml", "--validation",
                       str(validate)) == 2
    assert "the --out checks passed" in capsys.readouterr().err


@pytest.mark.parametrize("kernel", [("transfer.grad_method=fused",),
                                    ("transfer.strategy=mgda", "transfer.mgda.solver=device")],
                         ids=["fused-grads", "mgda-device-solver"])
def test_phase2_of_a_phase1_with_kernels_runs_where_the_kernel_cannot(data, tmp_path, monkeypatch, capsys, kernel):
    """Phase 2 sets the transfer aside, so a Phase 1 trained with grad_method: fused or MGDA's
    device solver (on a GPU) continues on a CPU; the kernels' device checks are Phase 1's only."""
    p1 = tmp_path / "p1"
    sets = [a for k in kernel for a in ("--set", k)]
    assert cli.main(["train-phase1", "--no-tracking", "--data", str(data), "--data-config",
                     str(ROOT / "configs/data/synthetic.yaml"), "--config", str(ROOT / "configs/train/cpu_small.yaml"),
                     "--out", str(p1), *sets, "--set", "max_rows=300",
                     "--set", "model.shared_hidden=16", "--set", "model.expert_dim=8", *FAST]) == 0  # a small kernel: interpreted
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # now a machine that cannot run the kernel
    assert cli.main(["train-phase2", "--no-tracking", "--checkpoint", str(p1), "--data", str(data),
                     "--out", str(tmp_path / "p2"), "--set", "training.cluster_finetune_epochs=1"]) == 0
    assert (tmp_path / "p2" / "checkpoint.pt").is_file()


def test_grad_method_fused_without_cuda_is_a_config_error_before_the_data_loads(data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' interpreter would let the kernel run
    out = tmp_path / "run"
    assert _train_with(data, out, ROOT / "configs/train/cpu_small.yaml", "--set", "transfer.grad_method=fused") == 2
    captured = capsys.readouterr()
    assert "key `transfer.grad_method` is 'fused', which runs the Triton kernel on CUDA, but this run's device is " \
           "cpu; use grad_method: batched" in captured.err
    assert "Traceback" not in captured.err and "loading" not in captured.out  # one line, before any data
    assert not out.exists()


def test_mgda_device_solver_without_cuda_is_a_config_error_before_the_data_loads(data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' interpreter would let the kernel run
    out = tmp_path / "run"
    assert _train_with(data, out, ROOT / "configs/train/cpu_small.yaml", "--set", "transfer.strategy=mgda",
                       "--set", "transfer.mgda.solver=device") == 2
    captured = capsys.readouterr()
    assert "key `transfer.mgda.solver` is 'device', which solves on the GPU in a Triton kernel, but this run's " \
           "device is cpu; use solver: auto" in captured.err
    assert "Traceback" not in captured.err and "loading" not in captured.out  # one line, before any data
    assert not out.exists()


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
