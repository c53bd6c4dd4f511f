"""The validate stage on the generated 16-task synthetic dataset and its shipped contract."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from vhelpers import one_error_line

from ple_adatt.cli import main
from ple_adatt.config import load_data_config
from ple_adatt.data.synthetic import TASKS, write_parquet

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "data" / "synthetic.yaml"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_parquet(tmp_path_factory.mktemp("synthetic") / "synthetic.parquet", rows=6000, seed=1)


def test_synthetic_dataset_passes(synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "validate"
    rc = main(["validate", "--data", str(synthetic), "--config", str(CONFIG), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    r = json.loads((out / "availability.json").read_text())
    assert r["enabled_tasks"] == TASKS
    assert len(r["features"]) == 40 and r["rows"] == 6000
    df = pl.read_parquet(synthetic)
    # the planted missingness shows up exactly
    assert r["tasks"]["cvr"]["available"] == df["y_cvr"].is_not_null().sum()
    assert r["tasks"]["cvr"]["available"] <= (df["y_ctr"] == 1).sum()
    assert 0.5 < r["tasks"]["ltv"]["rate"] < 0.7
    assert r["tasks"]["brand_prediction"]["available"] == df["y_brand_prediction"].is_not_null().sum()
    assert r["clusters"]["rows"]["unknown"] == df["cluster"].is_null().sum()
    assert r["features"]["num_00"]["nulls"] == df["num_00"].is_null().sum() > 0
    assert r["check_summary"]["failed_critical"] == 0


def test_synthetic_policy_disable_and_fail(synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = CONFIG.read_text()
    strict = "vocab_size: 50000, min_availability: 0.3, on_low_availability: disable"
    assert strict in text
    cfg = tmp_path / "strict.yaml"
    cfg.write_text(text.replace(strict, "vocab_size: 50000, min_availability: 0.9, on_low_availability: disable"))
    out = tmp_path / "validate"
    rc = main(["validate", "--data", str(synthetic), "--config", str(cfg), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "warning: task 'brand_prediction'" in captured.out
    r = json.loads((out / "availability.json").read_text())
    assert "brand_prediction" not in r["enabled_tasks"] and r["disabled_tasks"] == ["brand_prediction"]
    assert len(r["enabled_tasks"]) == 15
    cfg.write_text(text.replace(strict, "vocab_size: 50000, min_availability: 0.9, on_low_availability: fail"))
    out2 = tmp_path / "validate2"
    rc = main(["validate", "--data", str(synthetic), "--config", str(cfg), "--out", str(out2)])
    assert rc == 2
    assert "task 'brand_prediction': availability" in one_error_line(capsys.readouterr().err)
    assert not out2.exists()


def test_synthetic_contract_is_what_the_trainer_loads(synthetic: Path) -> None:
    from ple_adatt.data.dataset import prepare_splits

    cfg = load_data_config(CONFIG)
    pre, train, val = prepare_splits(synthetic, cfg, max_rows=500)
    assert len(train) == 500 and train.y.shape[1] == 16
