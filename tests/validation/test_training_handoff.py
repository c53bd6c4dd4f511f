"""The validation artifact as the training stages read it: same data, same data contract.

A validation result says which tasks can train *under the contract it checked*; training
under another data config (other classes, bounds, split) must refuse it, naming both files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from vhelpers import SMALL_YAML, Env

from ple_adatt.artifacts import path_sha256
from ple_adatt.cli import main
from ple_adatt.config import load_data_config
from ple_adatt.data.synthetic import write_parquet
from ple_adatt.errors import StageError
from ple_adatt.stages.train_common import enabled_tasks_from_validation

ROOT = Path(__file__).resolve().parents[2]


def test_same_contract_from_another_path_is_accepted(env: Env) -> None:
    rc, _, err = env.run()
    assert rc == 0, err
    copy = env.tmp / "copy_of_small.yaml"
    shutil.copy(env.config, copy)
    tasks = enabled_tasks_from_validation(env.out, load_data_config(copy), path_sha256(env.data), data_config=copy)
    assert tasks == ["click", "kind", "value", "item"]


def test_validation_under_another_data_config_is_refused(env: Env) -> None:
    loose = env.tmp / "loose.yaml"
    loose.write_text(SMALL_YAML.replace("num_classes: 4", "num_classes: 40"))
    rc, _, err = env.run(config=loose)
    assert rc == 0, err
    with pytest.raises(StageError) as e:
        enabled_tasks_from_validation(env.out, load_data_config(env.config), path_sha256(env.data),
                                      data_config=env.config)
    msg = str(e.value)
    assert f"computed under data config {loose} (hash " in msg
    assert f"differs from {env.config} (hash " in msg
    assert "first at key `tasks[1].num_classes`" in msg and "rerun `ple-adatt validate --config" in msg


def test_validation_with_overrides_is_refused_naming_them(env: Env) -> None:
    rc, _, err = env.run("--set", "split.seed=7")
    assert rc == 0, err
    with pytest.raises(StageError, match=r"under data config .*small\.yaml with --set split\.seed=7 .*"
                                         r"first at key `split\.seed`"):
        enabled_tasks_from_validation(env.out, load_data_config(env.config), path_sha256(env.data),
                                      data_config=env.config)


def test_train_phase1_refuses_it_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The reviewer's case: labels 10..14 of a 5-class task pass a validation run with
    num_classes 20; training under the 5-class contract must not take that as a pass."""
    import polars as pl

    stock = ROOT / "configs/data/synthetic.yaml"
    loose = tmp_path / "d_loose.yaml"
    loose.write_text(stock.read_text().replace("num_classes: 5, min_availability: 0.9}",
                                               "num_classes: 20, min_availability: 0.9}"))
    data = tmp_path / "life_oor.parquet"
    df = pl.read_parquet(write_parquet(tmp_path / "syn.parquet", rows=1500, seed=0))
    df.with_columns(pl.col("y_life_stage") + (pl.int_range(pl.len()) % 7 == 0).cast(pl.Int64) * 10).write_parquet(data)
    assert main(["validate", "--data", str(data), "--config", str(loose), "--out", str(tmp_path / "v"),
                 "--no-tracking"]) == 0
    capsys.readouterr()
    rc = main(["train-phase1", "--data", str(data), "--data-config", str(stock), "--config",
               str(ROOT / "configs/train/cpu_small.yaml"), "--validation", str(tmp_path / "v"),
               "--out", str(tmp_path / "p1"), "--no-tracking"])
    cap = capsys.readouterr()
    assert rc == 2
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ple-adatt train-phase1: error: ")
    assert str(loose) in lines[0] and str(stock) in lines[0] and "tasks[5].num_classes" in lines[0]
    assert "epoch" not in cap.out and not (tmp_path / "p1").exists()
