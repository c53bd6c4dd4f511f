"""What training refuses when it loads the data, with or without a validation artifact.

The training stages turn Parquet into tensors in ``data.dataset.prepare_splits`` /
``load_split``; data training cannot survive (labels outside their domain, non-finite
regression targets, a task without train targets, infinite features, unreadable pages,
files of a directory with different dtypes) must stop there with one line naming the file,
the column, the count and values, before anything is fitted or trained, and leave no
output directory behind.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch
from parquethelpers import zero_data_pages

from ple_adatt.cli import main
from ple_adatt.config import load_data_config
from ple_adatt.data.dataset import SPLIT_COLUMN, DataError, load_split, prepare_splits, split_expr
from ple_adatt.data.synthetic import write_parquet

ROOT = Path(__file__).resolve().parents[2]
DATA_CFG = ROOT / "configs/data/synthetic.yaml"
TRAIN_CFG = ROOT / "configs/train/cpu_small.yaml"
ROWS = 1500


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    path = write_parquet(tmp_path_factory.mktemp("clean") / "syn.parquet", rows=ROWS, seed=0)
    return pl.read_parquet(path)


def _every(k: int) -> pl.Expr:
    return pl.int_range(pl.len()) % k == 0


def _train_val_count(df: pl.DataFrame, mask: pl.Expr) -> int:
    """How many train / val rows ``mask`` selects, counted here from the split rule."""
    cfg = load_data_config(DATA_CFG)
    with_split = df.with_columns(mask.alias("__m__"), split_expr(cfg.split, dict(df.schema)))
    return with_split.filter(pl.col("__m__") & pl.col(SPLIT_COLUMN).is_in(["train", "val"])).height


def _run_cli(command: str, data: Path, out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([command, "--data", str(data), "--data-config", str(DATA_CFG), "--config", str(TRAIN_CFG),
               "--out", str(out), "--no-tracking", *extra])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line(err: str, command: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ple-adatt {command}: error: ") and "Traceback" not in err
    return lines[0]


BAD = {
    # id: (column, mask of rows to spoil, value written there, words and example in the message)
    "binary-3": ("y_ctr", _every(40), 3, ("outside {0, 1}", "e.g. 3")),
    "binary-fraction": ("y_ctr", _every(40), 0.5, ("outside {0, 1}", "e.g. 0.5")),
    "multiclass-out-of-range": ("y_life_stage", _every(7), 13, ("outside integers in [0, 5)", "e.g. 13")),
    "multiclass-negative": ("y_nba", _every(30), -1, ("outside integers in [0, 12)", "e.g. -1")),
    "retrieval-huge-id": ("y_brand_prediction", _every(50), 10**12, ("outside item ids in [0, 50000)",
                                                                     "e.g. 1000000000000")),
    "regression-nan": ("y_ltv", _every(25), float("nan"), ("non-finite value(s)", "e.g. nan")),
    "regression-inf": ("y_consumption_cycle", _every(25), float("-inf"), ("non-finite value(s)", "e.g. -inf")),
    "feature-inf": ("num_00", _every(20), float("inf"), ("(numeric feature)", "infinite value(s)", "e.g. inf")),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_train_phase1_without_validation_refuses_bad_values(
    case: str, clean: pl.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    column, mask, value, words = BAD[case]
    data = tmp_path / f"{case}.parquet"
    clean.with_columns(pl.when(mask).then(pl.lit(value)).otherwise(pl.col(column)).alias(column)).write_parquet(data)
    n_bad = _train_val_count(clean, mask)
    assert n_bad > 0
    out = tmp_path / "p1"
    rc, stdout, err = _run_cli("train-phase1", data, out, capsys)
    assert rc == 2, err
    line = _one_line(err, "train-phase1")
    for needle in (str(data), f"column `{column}`", f"holds {n_bad:,} ", *words, "in the train and val rows",
                   f"run `ple-adatt validate --data {data} --config {DATA_CFG}`"):
        assert needle in line, f"{needle!r} not in {line!r}"
    assert "epoch" not in stdout  # refused before training
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".p1")]


@pytest.mark.parametrize("dtype", [pl.Int64, pl.Null], ids=["int64-nulls", "null-dtype"])
def test_a_task_without_any_target_is_refused(
    dtype: type[pl.DataType], clean: pl.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "churn_null.parquet"
    clean.with_columns(pl.lit(None, dtype=dtype).alias("y_churn")).write_parquet(data)
    rc, _, err = _run_cli("train", data, tmp_path / "run", capsys)  # both phases, no --validation
    assert rc == 2, err
    line = _one_line(err, "train")
    assert f"{data}: column `y_churn` (target of task 'churn') has no target in the" in line
    assert "the task cannot be trained" in line and "ple-adatt validate" in line
    assert not (tmp_path / "run").exists()


def test_several_bad_columns_name_the_first_and_list_the_others(clean: pl.DataFrame, tmp_path: Path) -> None:
    data = tmp_path / "two.parquet"
    clean.with_columns(pl.when(_every(9)).then(7).otherwise(pl.col("y_ctr")).alias("y_ctr"),
                       pl.when(_every(9)).then(float("inf")).otherwise(pl.col("num_03")).alias("num_03")
                       ).write_parquet(data)
    with pytest.raises(DataError, match=r"column `y_ctr` .* other columns with problems: `num_03`; run"):
        prepare_splits(data, load_data_config(DATA_CFG))


def test_documented_tolerances_still_train(clean: pl.DataFrame, tmp_path: Path) -> None:
    """NaN / null features are imputed, null targets are missing, a NaN cluster uses the
    global head, regression bounds are the validate stage's business: none stops training."""
    cfg = load_data_config(DATA_CFG)
    data = tmp_path / "tolerated.parquet"
    clean.with_columns(
        pl.when(_every(5)).then(float("nan")).otherwise(pl.col("num_01")).alias("num_01"),
        pl.when(_every(6)).then(None).otherwise(pl.col("num_02")).alias("num_02"),
        pl.when(_every(4)).then(None).otherwise(pl.col("y_ctr")).alias("y_ctr"),
        pl.when(_every(3)).then(5000.0).otherwise(pl.col("y_ltv")).alias("y_ltv"),  # bounds [-10, 1000]
        pl.when(_every(8)).then(float("nan")).otherwise(pl.col("cluster").cast(pl.Float64)).alias("cluster"),
    ).write_parquet(data)
    pre, train, val = prepare_splits(data, cfg)
    assert len(train) + len(val) == _train_val_count(clean, pl.lit(True))
    assert torch.isfinite(train.x_num).all() and torch.isfinite(val.x_num).all()
    ctr = cfg.task_names.index("ctr")
    assert torch.isnan(train.y[:, ctr]).any() and set(train.y[:, ctr].nan_to_num(-1).unique().tolist()) == {-1, 0, 1}
    assert (train.y[:, cfg.task_names.index("ltv")] == 5000.0).any()
    assert ((train.cluster == cfg.num_clusters).sum() > 0) and train.cluster.max() == cfg.num_clusters


def test_phase2_loading_checks_its_split(clean: pl.DataFrame, tmp_path: Path) -> None:
    cfg = load_data_config(DATA_CFG)
    good = tmp_path / "good.parquet"
    clean.write_parquet(good)
    pre, _, _ = prepare_splits(good, cfg)
    bad = tmp_path / "bad.parquet"
    clean.with_columns(pl.when(_every(10)).then(2).otherwise(pl.col("y_churn")).alias("y_churn")).write_parquet(bad)
    with pytest.raises(DataError, match=r"bad\.parquet: column `y_churn` .* outside \{0, 1\} in the train split"):
        load_split(bad, cfg, pre, "train", config_src=DATA_CFG)
    assert len(load_split(bad, cfg, pre, "train", ["ctr"])) > 0  # churn not asked for: not checked


def test_corrupt_data_pages_name_the_file(clean: pl.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.parquet"
    clean.write_parquet(good)
    d = tmp_path / "parts"
    d.mkdir()
    clean.head(700).write_parquet(d / "a.parquet")
    zero_data_pages(good, d / "b.parquet")
    with pytest.raises(DataError, match=r"parts/b\.parquet: cannot read row group 0 \(.+\); the file is truncated "
                                        r"or corrupt"):
        prepare_splits(d, load_data_config(DATA_CFG))
    rc, _, err = _run_cli("train-phase1", d, tmp_path / "p1", capsys)
    assert rc == 2 and f"{d / 'b.parquet'}: cannot read row group 0" in _one_line(err, "train-phase1")
    assert not (tmp_path / "p1").exists()


def test_files_with_different_dtypes_name_file_and_column(clean: pl.DataFrame, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "mixed"
    d.mkdir()
    clean.write_parquet(d / "a.parquet")
    clean.with_columns(pl.col("y_ctr").cast(pl.Float64)).write_parquet(d / "b.parquet")
    rc, _, err = _run_cli("train-phase1", d, tmp_path / "p1", capsys)
    assert rc == 2
    line = _one_line(err, "train-phase1")
    assert f"{d / 'b.parquet'}: column `y_ctr` has dtype Float64, but Int64 in {d / 'a.parquet'}" in line
    assert not (tmp_path / "p1").exists()


def test_unusable_out_fails_before_training(clean: pl.DataFrame, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "good.parquet"
    clean.write_parquet(data)
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    rc, stdout, err = _run_cli("train-phase1", data, afile / "p1", capsys)
    assert rc == 2
    assert _one_line(err, "train-phase1").endswith(f"--out {afile / 'p1'}: cannot create it: {afile} is a file, "
                                                   "not a directory")
    assert "epoch" not in stdout and "loading" not in stdout  # nothing was read or trained
    rc, _, err = _run_cli("train-phase1", data, afile, capsys)
    assert rc == 2 and f"--out {afile}: exists and is not a directory" in _one_line(err, "train-phase1")
    assert afile.read_text() == "keep me"
