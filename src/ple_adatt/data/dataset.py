"""The dataset contract in code: read Parquet lazily, split rows, fit and apply preprocessing.

A dataset is Parquet, one file or a directory of ``*.parquet`` files. Feature columns and one
column per task target; a null target means "not available for this row". Categorical
vocabularies and numeric normalisation statistics are fitted on the train split only and
saved as the ``preprocessing.json`` artifact that every later stage reuses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import DataConfig, SplitConfig

if TYPE_CHECKING:  # polars is imported lazily: the training core must import without it
    import polars as pl
    import torch

PREPROCESSING_SCHEMA_VERSION = 1
SPLIT_COLUMN = "__split__"
OOV_INDEX = 0  # vocabulary index for unseen or null categorical values


class DataError(ValueError):
    """The dataset does not satisfy its contract; the message names the file and column."""


def parquet_files(path: str | Path) -> list[Path]:
    """The Parquet files of a dataset path (a file or a directory), with clear errors."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: dataset path not found; expected a Parquet file or a directory of *.parquet files")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.parquet") if f.is_file())
        if not files:
            raise DataError(f"{p}: directory holds no *.parquet files; expected a Parquet dataset")
    else:
        files = [p]
    for f in files:
        with open(f, "rb") as fh:
            head = fh.read(4)
            if head != b"PAR1":
                raise DataError(f"{f}: not a Parquet file (expected the PAR1 magic bytes)")
    return files


def dataset_rows(files: list[Path]) -> int:
    """Row count of a dataset from the Parquet footers (reads no data pages).

    Raises DataError naming the file when a footer is unreadable (a truncated or corrupt
    file) and when the files disagree on their columns, and when there are no rows at all.
    """
    import pyarrow.parquet as pq

    rows = 0
    first: tuple[Path, list[str]] | None = None
    for f in files:
        try:
            md = pq.ParquetFile(f).metadata
            names = md.schema.to_arrow_schema().names
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for broken files
            raise DataError(f"{f}: cannot read the Parquet footer ({e}); the file is truncated or corrupt") from e
        if first is None:
            first = (f, names)
        elif set(names) != set(first[1]):
            diff = sorted(set(names) ^ set(first[1]))
            raise DataError(
                f"{f}: its columns differ from {first[0]} (column `{diff[0]}`); "
                "every file of a dataset directory must have the same columns"
            )
        rows += md.num_rows
    if rows == 0:
        where = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
        raise DataError(f"{where}: the dataset is empty (0 rows); expected at least one row")
    return rows


def scan_dataset(path: str | Path) -> pl.LazyFrame:
    """A lazy frame over the dataset; nothing is read until collected."""
    import polars as pl

    files = parquet_files(path)
    try:
        return pl.scan_parquet([str(f) for f in files])
    except Exception as e:  # pragma: no cover - polars raises many types here
        raise DataError(f"{path}: cannot read as Parquet: {e}") from e


def read_schema(lf: pl.LazyFrame, path: str | Path) -> dict[str, Any]:
    """The column -> polars dtype schema of a scanned dataset, as a DataError on failure."""
    try:
        return dict(lf.collect_schema())
    except Exception as e:  # polars raises ComputeError / SchemaError for broken inputs
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: cannot read the Parquet schema ({first})") from e


def check_columns(schema: dict[str, Any], cfg: DataConfig, path: str | Path, config_src: str = "the data config") -> None:
    """Every declared column exists with a usable dtype; raises DataError naming the column.

    Numeric features: any integer, float or boolean dtype. Categorical features: strings,
    categoricals, integers or booleans (values are mapped to strings). Targets of binary,
    multiclass and retrieval tasks: integers, booleans or floats (which the validate stage
    checks are integral); regression targets: numeric. The cluster column: integer or
    float ids; a split column: strings. A column that holds only nulls has dtype Null and
    passes here; the validate stage reports it.
    """
    import polars as pl

    def need(col: str, role: str, ok: tuple[Any, ...] | None, expected: str) -> None:
        if col not in schema:
            raise DataError(f"the column `{col}` ({role}) is missing in {path}; declared in {config_src}")
        if ok is not None:
            dt = schema[col]
            if not any(dt == t or (isinstance(t, type) and isinstance(dt, t)) for t in ok):
                raise DataError(
                    f"{path}: column `{col}` ({role}) has dtype {dt}, expected {expected}; declared in {config_src}"
                )

    ints = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)
    floats = (pl.Float32, pl.Float64)
    numeric = (*ints, *floats, pl.Boolean, pl.Null)
    labels = (*ints, *floats, pl.Boolean, pl.Null)
    categorical = (pl.Utf8, pl.Categorical, pl.Enum, *ints, pl.Boolean, pl.Null)
    strings = (pl.Utf8, pl.Categorical, pl.Enum)
    for c in cfg.numeric_features:
        need(c, "numeric feature", numeric, "a numeric dtype (integer, float or boolean)")
    for c in cfg.categorical_features:
        need(c, "categorical feature", categorical, "a string, categorical, integer or boolean dtype")
    for t in cfg.tasks:
        if t.type == "regression":
            need(t.column, f"target of task {t.name!r}", numeric, "a numeric dtype")
        else:
            need(t.column, f"target of task {t.name!r}", labels,
                 f"integer labels (an integer, boolean or integral float dtype) for a {t.type} task")
    if cfg.cluster_column:
        need(cfg.cluster_column, "cluster column", (*ints, *floats, pl.Null), "integer cluster ids")
    if cfg.split.method == "hash":
        need(cfg.split.key, "split key", None, "any dtype")
    else:
        need(cfg.split.column, "split column", strings, "strings train/val/test")


def _splitmix64(x: pl.Expr) -> pl.Expr:
    """A stable 64-bit mix (splitmix64) written with wrapping UInt64 polars arithmetic."""
    import polars as pl

    def u(v: int) -> pl.Expr:
        return pl.lit(v, dtype=pl.UInt64)

    z = x + u(0x9E3779B97F4A7C15)
    z = z.xor(z // u(1 << 30)) * u(0xBF58476D1CE4E5B9)
    z = z.xor(z // u(1 << 27)) * u(0x94D049BB133111EB)
    return z.xor(z // u(1 << 31))


def split_expr(split: SplitConfig, schema: dict[str, Any]) -> pl.Expr:
    """An expression giving each row's split name (train / val / test)."""
    import polars as pl

    if split.method == "column":
        return pl.col(split.column).cast(pl.Utf8).alias(SPLIT_COLUMN)
    key = pl.col(split.key)
    dt = schema[split.key]
    if dt.is_integer():
        h = _splitmix64(key.cast(pl.Int64).cast(pl.UInt64, wrap_numerical=True) + pl.lit(split.seed, dtype=pl.UInt64))
    else:  # strings and others: polars' own hash (stable for the pinned polars version)
        h = key.cast(pl.Utf8).hash(seed=split.seed)
    u = (h // pl.lit(1 << 11, dtype=pl.UInt64)).cast(pl.Float64) / float(1 << 53)  # in [0, 1)
    cut_train = split.fractions.get("train", 0.0)
    cut_val = cut_train + split.fractions.get("val", 0.0)
    return (
        pl.when(u < cut_train).then(pl.lit("train"))
        .when(u < cut_val).then(pl.lit("val"))
        .otherwise(pl.lit("test"))
        .alias(SPLIT_COLUMN)
    )


# ----------------------------------------------------------------------------- preprocessing


@dataclass
class Preprocessor:
    """Vocabularies and normalisation statistics fitted on the train split."""

    vocabularies: dict[str, list[str]]  # index i+1 <-> value; 0 is out-of-vocabulary / null
    numeric_mean: dict[str, float]
    numeric_std: dict[str, float]
    train_rows: int
    data_config_name: str

    def cardinalities(self, cfg: DataConfig) -> list[int]:
        return [len(self.vocabularies[c]) + 1 for c in cfg.categorical_features]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": PREPROCESSING_SCHEMA_VERSION,
            "data_config": self.data_config_name,
            "train_rows": self.train_rows,
            "oov_index": OOV_INDEX,
            "vocabularies": self.vocabularies,
            "numeric": {c: {"mean": self.numeric_mean[c], "std": self.numeric_std[c]} for c in self.numeric_mean},
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Preprocessor:
        p = Path(path)
        if not p.exists():
            raise DataError(f"{p}: preprocessing artifact not found")
        d = json.loads(p.read_text())
        v = d.get("schema_version")
        if v != PREPROCESSING_SCHEMA_VERSION:
            raise DataError(
                f"{p}: preprocessing schema_version {v!r} is not supported (this version reads {PREPROCESSING_SCHEMA_VERSION})"
            )
        return cls(
            vocabularies={k: list(vs) for k, vs in d["vocabularies"].items()},
            numeric_mean={k: float(s["mean"]) for k, s in d["numeric"].items()},
            numeric_std={k: float(s["std"]) for k, s in d["numeric"].items()},
            train_rows=int(d["train_rows"]),
            data_config_name=str(d["data_config"]),
        )


def fit_preprocessor(lf: pl.LazyFrame, cfg: DataConfig) -> Preprocessor:
    """Fit vocabularies (by frequency, ties by value) and mean/std on the train split only."""
    import polars as pl

    train = lf.filter(pl.col(SPLIT_COLUMN) == "train")
    vocabs: dict[str, list[str]] = {}
    for c in cfg.categorical_features:
        counts = (
            train.select(pl.col(c).cast(pl.Utf8).drop_nulls().value_counts(sort=False))
            .unnest(c)
            .sort(["count", c], descending=[True, False])
            .collect()
        )
        vocabs[c] = counts[c].to_list()
    mean, std = {}, {}
    if cfg.numeric_features:
        exprs = []
        for c in cfg.numeric_features:
            col = pl.col(c).cast(pl.Float64)
            exprs += [col.mean().alias(f"{c}__mean"), col.std().alias(f"{c}__std")]
        stats = train.select(exprs).collect().row(0, named=True)
        for c in cfg.numeric_features:
            m = stats[f"{c}__mean"]
            s = stats[f"{c}__std"]
            mean[c] = float(m) if m is not None else 0.0
            std[c] = float(s) if s is not None and s > 1e-12 else 1.0
    n_train = train.select(pl.len()).collect().item()
    if n_train == 0:
        raise DataError("the train split is empty; check `split` in the data config")
    return Preprocessor(vocabs, mean, std, int(n_train), cfg.name)


# ----------------------------------------------------------------------------------- tensors


@dataclass
class TensorData:
    """A split as dense tensors, ready to live on the training device.

    ``y`` holds every task target as float32 with NaN where the target is missing
    (multiclass labels and retrieval ids are exact in float32 below 2**24). ``cluster``
    holds ids in [0, C) and C for rows whose cluster is unknown (they use the global head).
    """

    x_num: torch.Tensor  # (N, n_num) float32, normalised, nulls -> 0
    x_cat: torch.Tensor  # (N, n_cat) int64, 0 = out of vocabulary
    y: torch.Tensor  # (N, T) float32, NaN = missing
    cluster: torch.Tensor  # (N,) int64 in [0, C]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str) -> TensorData:
        return TensorData(*(t.to(device) for t in (self.x_num, self.x_cat, self.y, self.cluster)))

    def subset(self, index: torch.Tensor) -> TensorData:
        return TensorData(self.x_num[index], self.x_cat[index], self.y[index], self.cluster[index])


def feature_exprs(cfg: DataConfig, pre: Preprocessor) -> list[pl.Expr]:
    """Normalised numeric (``n::<col>``) and vocabulary-indexed categorical (``c::<col>``)
    feature columns: the one encoding training, evaluation and serving share."""
    import polars as pl

    exprs: list[pl.Expr] = []
    for c in cfg.numeric_features:
        exprs.append(((pl.col(c).cast(pl.Float64) - pre.numeric_mean[c]) / pre.numeric_std[c])
                     .fill_null(0.0).fill_nan(0.0).cast(pl.Float32).alias(f"n::{c}"))
    for c in cfg.categorical_features:
        vocab = pre.vocabularies[c]
        mapping = pl.DataFrame({"v": vocab, "i": np.arange(1, len(vocab) + 1, dtype=np.int64)})
        exprs.append(pl.col(c).cast(pl.Utf8).replace_strict(mapping["v"], mapping["i"], default=OOV_INDEX,
                                                             return_dtype=pl.Int64).alias(f"c::{c}"))
    return exprs


def load_split(
    path: str | Path,
    cfg: DataConfig,
    pre: Preprocessor,
    split: str,
    task_names: list[str] | None = None,
    max_rows: int | None = None,
) -> TensorData:
    """Read one split into tensors, selecting only the needed columns."""
    import polars as pl
    import torch

    lf = scan_dataset(path)
    schema = lf.collect_schema()
    check_columns(dict(schema), cfg, path)
    tasks = [cfg.task(n) for n in (task_names or cfg.task_names)]
    lf = lf.with_columns(split_expr(cfg.split, dict(schema))).filter(pl.col(SPLIT_COLUMN) == split)
    if max_rows is not None:
        lf = lf.head(max_rows)
    exprs = feature_exprs(cfg, pre)
    for t in tasks:
        exprs.append(pl.col(t.column).cast(pl.Float32).alias(f"y::{t.name}"))
    if cfg.cluster_column:
        cl = pl.col(cfg.cluster_column).cast(pl.Int64)
        exprs.append(
            pl.when(cl.is_null() | (cl < 0) | (cl >= cfg.num_clusters)).then(cfg.num_clusters)
            .otherwise(cl).alias("cluster")
        )
    df = lf.select(exprs).collect()
    n = df.height

    def block(prefix: str, names: list[str], dtype: Any) -> np.ndarray:
        cols = [f"{prefix}::{c}" for c in names]
        if not cols:
            return np.zeros((n, 0), dtype=dtype)
        return df.select(cols).to_numpy().astype(dtype, copy=False)

    x_num = block("n", list(cfg.numeric_features), np.float32)
    x_cat = block("c", list(cfg.categorical_features), np.int64)
    y = block("y", [t.name for t in tasks], np.float32)
    cluster = df["cluster"].to_numpy().astype(np.int64) if cfg.cluster_column else np.zeros(n, dtype=np.int64)
    return TensorData(
        torch.from_numpy(np.ascontiguousarray(x_num)),
        torch.from_numpy(np.ascontiguousarray(x_cat)),
        torch.from_numpy(np.ascontiguousarray(y)),
        torch.from_numpy(np.ascontiguousarray(cluster)),
    )


def prepare_splits(
    path: str | Path,
    cfg: DataConfig,
    task_names: list[str] | None = None,
    max_rows: int | None = None,
) -> tuple[Preprocessor, TensorData, TensorData]:
    """Fit preprocessing on train, then load train and val tensors (the training entry point)."""
    lf = scan_dataset(path)
    schema = dict(lf.collect_schema())
    check_columns(schema, cfg, path)
    pre = fit_preprocessor(lf.with_columns(split_expr(cfg.split, schema)), cfg)
    train = load_split(path, cfg, pre, "train", task_names, max_rows)
    val = load_split(path, cfg, pre, "val", task_names, None if max_rows is None else max(max_rows // 4, 1))
    return pre, train, val
