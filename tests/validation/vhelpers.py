"""Helpers of the validation tests: a small 4-task contract, its data, the stage in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ple_adatt.cli import main

SMALL_YAML = """\
name: small
numeric_features: [f_num, f_num32]
categorical_features: [f_cat]
cluster_column: cl
num_clusters: 3
split: {method: hash, key: uid, fractions: {train: 0.8, val: 0.1, test: 0.1}}
tasks:
  - {name: click, column: y_click, type: binary, min_availability: 0.5}
  - {name: kind, column: y_kind, type: multiclass, num_classes: 4, min_availability: 0.5}
  - {name: value, column: y_value, type: regression, bounds: [0.0, 100.0], min_availability: 0.3}
  - {name: item, column: y_item, type: retrieval, vocab_size: 1000, min_availability: 0.2, on_low_availability: disable}
"""


def small_frame(n: int = 2000, seed: int = 0) -> pl.DataFrame:
    """Clean data for SMALL_YAML: availability click 90%, kind 80%, value 60%, item 50%."""
    rng = np.random.default_rng(seed)

    def holes(values: np.ndarray, keep: float) -> list:
        mask = rng.random(n) < keep
        return [v if m else None for v, m in zip(values.tolist(), mask, strict=True)]

    cl = rng.integers(0, 3, n)
    return pl.DataFrame({
        "uid": np.arange(n, dtype=np.int64),
        "f_num": rng.standard_normal(n),
        "f_num32": rng.standard_normal(n).astype(np.float32),
        "f_cat": [f"c{k}" for k in rng.integers(0, 5, n)],
        "cl": pl.Series(holes(cl, 0.95), dtype=pl.Int64),
        "y_click": pl.Series(holes(rng.integers(0, 2, n), 0.9), dtype=pl.Int64),
        "y_kind": pl.Series(holes(rng.integers(0, 4, n), 0.8), dtype=pl.Int64),
        "y_value": pl.Series(holes(rng.uniform(0, 100, n), 0.6), dtype=pl.Float64),
        "y_item": pl.Series(holes(rng.integers(0, 1000, n), 0.5), dtype=pl.Int64),
    })


class Env:
    """A tmp dir with a config and a dataset, and a way to run the stage in-process."""

    def __init__(self, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.tmp = tmp
        self.capsys = capsys
        self.config = tmp / "small.yaml"
        self.config.write_text(SMALL_YAML)
        self.data = tmp / "data.parquet"
        self.out = tmp / "out"
        self.write(small_frame())

    def write(self, df: pl.DataFrame) -> Path:
        df.write_parquet(self.data)
        return self.data

    def set_config(self, text: str) -> Path:
        self.config.write_text(text)
        return self.config

    def run(self, *extra: str, data: Path | None = None, config: Path | None = None) -> tuple[int, str, str]:
        self.capsys.readouterr()
        rc = main(["validate", "--data", str(data or self.data), "--config", str(config or self.config),
                   "--out", str(self.out), *extra])
        cap = self.capsys.readouterr()
        return rc, cap.out, cap.err

    def report(self) -> dict:
        return json.loads((self.out / "availability.json").read_text())

    def check(self, cid: str) -> dict:
        return next(c for c in self.report()["checks"] if c["id"] == cid)


def one_error_line(err: str) -> str:
    """The stage's stderr must be exactly one line starting with the command name."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith("ple-adatt validate: error: ")
    assert "Traceback" not in err
    return lines[0]
