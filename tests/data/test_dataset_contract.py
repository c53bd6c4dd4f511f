"""Dataset contract helpers (data.dataset) and the data-config consistency rules."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from ple_adatt.config import ConfigError, load_data_config
from ple_adatt.data.dataset import (
    DataError,
    check_columns,
    dataset_rows,
    parquet_files,
    read_schema,
    scan_dataset,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "data").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_data_config_loads(path: Path) -> None:
    cfg = load_data_config(path)
    assert cfg.tasks and (cfg.numeric_features or cfg.categorical_features)


def test_dataset_rows_sums_files_and_rejects_empty(tmp_path: Path) -> None:
    d = tmp_path / "parts"
    d.mkdir()
    pl.DataFrame({"a": [1, 2, 3]}).write_parquet(d / "x.parquet")
    pl.DataFrame({"a": [4]}).write_parquet(d / "y.parquet")
    assert dataset_rows(parquet_files(d)) == 4
    e = tmp_path / "e.parquet"
    pl.DataFrame({"a": []}, schema={"a": pl.Int64}).write_parquet(e)
    with pytest.raises(DataError, match=r"e\.parquet: the dataset is empty \(0 rows\)"):
        dataset_rows(parquet_files(e))


def test_read_schema_wraps_polars_errors(tmp_path: Path) -> None:
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"PAR1" + b"\0" * 64)
    with pytest.raises(DataError, match=r"bad\.parquet: cannot read the Parquet schema"):
        read_schema(scan_dataset(p), p)


def test_check_columns_accepts_integral_floats_and_rejects_strings(tmp_path: Path) -> None:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        "name: t\nnumeric_features: [x]\ncategorical_features: [c]\n"
        "split: {method: column, column: part}\n"
        "tasks:\n  - {name: y, column: y, type: multiclass, num_classes: 3}\n")
    cfg = load_data_config(cfg_path)
    ok = {"x": pl.Float32, "c": pl.Int32, "y": pl.Float64, "part": pl.Utf8}
    check_columns(ok, cfg, "d.parquet", str(cfg_path))
    with pytest.raises(DataError, match=r"column `part` \(split column\) has dtype Int64, expected strings"):
        check_columns({**ok, "part": pl.Int64}, cfg, "d.parquet", str(cfg_path))
    with pytest.raises(DataError, match=r"`y` \(target of task 'y'\) has dtype String, expected integer labels"):
        check_columns({**ok, "y": pl.Utf8}, cfg, "d.parquet", str(cfg_path))
    with pytest.raises(DataError, match=r"the column `x` \(numeric feature\) is missing in d\.parquet; declared in"):
        check_columns({k: v for k, v in ok.items() if k != "x"}, cfg, "d.parquet", str(cfg_path))


BASE = ("name: t\nnumeric_features: [x]\nsplit: {method: hash, key: id}\n"
        "tasks:\n  - {name: y, column: y, type: binary}\n")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (BASE + "num_clusters: 4\n", r"`num_clusters` is 4 but `cluster_column` is not set"),
        (BASE.replace("key: id}", "key: id, column: part}"), r"`split.column` is set but `split.method` is hash"),
        (BASE.replace("{method: hash, key: id}", "{method: column, column: p, key: id}"),
         r"`split.key` is set but `split.method` is column"),
        (BASE.replace("{method: hash, key: id}", "{method: column, column: p, fractions: {train: 0.5, val: 0.5}}"),
         r"`split.fractions` is set but `split.method` is column \(where `split.column` names each row's split"),
        (BASE.replace("key: id", "key: y"), r"`split.key` is `y`, the target of task 'y'; splitting on a label leaks"),
        (BASE.replace("key: id}", "key: id, fractions: {train: 0.0, val: 1.0}}"), r"`split.fractions.train` must be > 0"),
    ],
    ids=["clusters-without-column", "column-with-hash", "key-with-column", "fractions-with-column", "split-on-label",
         "no-train"],
)
def test_contradictory_data_configs_are_rejected(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_data_config(p)
    p.write_text(BASE)
    assert load_data_config(p).split.key == "id"
