"""What the Makefile hands to the pipeline commands (``make -n`` and prerequisite-free targets:
nothing here installs, trains or generates)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("PLE_ADATT_REGISTRY", "DATA", "DATA_CONFIG",
                                                            "TRAIN_CONFIG", "MAKEFLAGS", "MFLAGS")}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**base, **(env or {})})


def test_a_missing_user_dataset_fails_and_is_never_generated(tmp_path):
    missing = tmp_path / "adullt.parquet"
    r = _make(str(missing), f"DATA={missing}")  # the file rule make run/validate/train/compare depend on
    assert r.returncode == 2
    assert f"dataset not found: {missing}" in r.stderr
    assert not missing.exists()
    for target in ("run", "validate", "train", "compare"):
        plan = _make("-n", target, f"DATA={missing}").stdout
        assert "ple-adatt generate" not in plan, target
        assert plan.index("dataset not found") < plan.index(f"--data {missing}"), target  # it fails first


def test_only_the_default_dataset_is_generated_on_demand():
    plan = _make("-n", "-B", "data/synthetic.parquet").stdout
    assert "ple-adatt generate --out data/synthetic.parquet" in plan


def test_the_registry_comes_from_the_environment_unless_given(tmp_path):
    env = {"PLE_ADATT_REGISTRY": "registry.example.com/env"}
    assert "--registry registry.example.com/env " in _make("-n", "compile", env=env).stdout
    assert "--registry registry.example.com/cli " in _make("-n", "compile", "REGISTRY=registry.example.com/cli",
                                                            env=env).stdout
    assert "-t registry.example.com/env/ple-adatt-cpu:" in _make("-n", "images", env=env).stdout
    assert "--registry ghcr.io/ple-adatt " in _make("-n", "compile").stdout


def test_make_stage_forwards_only_what_was_given():
    plain = _make("-n", "stage", "STAGE=report", "RUN=runs/local/x").stdout
    assert "--data" not in plain and "--train-config" not in plain  # the run's own dataset and configs
    given = _make("-n", "stage", "STAGE=train-phase1", "RUN=runs/local/x", "DATA=d.parquet",
                  "DATA_CONFIG=dc.yaml", "TRAIN_CONFIG=tc.yaml").stdout
    assert "--data d.parquet" in given and "--data-config dc.yaml" in given and "--train-config tc.yaml" in given


def test_setup_on_a_disk_too_full_for_the_venv_says_so_before_installing(tmp_path):
    # a copy of the Makefile alone: with no .venv there, setup checks the free space first
    (tmp_path / "Makefile").write_text((ROOT / "Makefile").read_text())
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    r = subprocess.run(["make", "--no-print-directory", "setup", "SETUP_FREE_KB=999999999999"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert f"needs about 3.5 GB free on the disk of {tmp_path}" in r.stdout + r.stderr
    assert "MB are free" in r.stdout + r.stderr
    assert not (tmp_path / ".venv").exists()  # nothing half-installed
