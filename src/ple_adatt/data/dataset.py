"""The dataset contract in code: read Parquet lazily, split rows, fit and apply preprocessing.

A dataset is Parquet, one file or a directory of ``*.parquet`` files. Feature columns and one
column per task target; a null target means "not available for this row". Categorical
vocabularies and numeric normalisation statistics are fitted on the train split only and
saved as the ``preprocessing.json`` artifact that every later stage reuses.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import DataConfig, SplitConfig, TaskSpec

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
    import polars as pl
    import pyarrow.parquet as pq

    rows = 0
    first: tuple[Path, dict[str, Any]] | None = None
    for f in files:
        try:
            md = pq.ParquetFile(f).metadata
            dtypes = dict(pl.read_parquet_schema(f)) if len(files) > 1 else {}  # as polars will read them
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for broken files
            raise DataError(f"{f}: cannot read the Parquet footer ({_first_line(e)}); "
                            "the file is truncated or corrupt") from e
        if first is None:
            first = (f, dtypes)
        elif set(dtypes) != set(first[1]):
            diff = sorted(set(dtypes) ^ set(first[1]))
            raise DataError(
                f"{f}: its columns differ from {first[0]} (column `{diff[0]}`); "
                "every file of a dataset directory must have the same columns"
            )
        else:
            for c, dt in dtypes.items():
                if dt != first[1][c]:
                    raise DataError(
                        f"{f}: column `{c}` has dtype {dt}, but {first[1][c]} in {first[0]}; every file of a "
                        "dataset directory must have the same columns with the same dtypes (cast it when writing)"
                    )
        rows += md.num_rows
    if rows == 0:
        where = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
        raise DataError(f"{where}: the dataset is empty (0 rows); expected at least one row")
    return rows


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].rstrip(".") if text else type(e).__name__


def _unreadable_part(files: list[Path]) -> tuple[Path, int, str] | None:
    """The first (file, row group, reason) whose data pages cannot be decoded, if any.

    Only called after a read failed, to name the culprit: it decodes the files row group by
    row group (bounded memory), so it costs a full read only on that error path.
    """
    import pyarrow.parquet as pq

    for f in files:
        try:
            pf = pq.ParquetFile(f)
            groups = pf.metadata.num_row_groups
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for broken files
            return f, -1, _first_line(e)
        for i in range(groups):
            try:
                for _batch in pf.iter_batches(batch_size=65_536, row_groups=[i]):
                    pass
            except Exception as e:  # noqa: PERF203 - the error path, one try per row group
                return f, i, _first_line(e)
    return None


@contextlib.contextmanager
def read_errors(path: str | Path, files: list[Path] | None = None) -> Iterator[None]:
    """Turn a failure to read the dataset's data pages into a DataError naming the file.

    Polars and pyarrow report a corrupt page or a schema mismatch between files without
    saying which file; this finds it (row group by row group) and says what to do.
    """
    import polars as pl
    import pyarrow as pa

    try:
        yield
    except (pl.exceptions.ComputeError, pl.exceptions.SchemaError, pa.ArrowException, OSError) as e:
        found = _unreadable_part(files if files is not None else parquet_files(path))
        if found is None:
            raise DataError(f"{path}: cannot read the dataset ({_first_line(e)})") from e
        f, group, why = found
        where = "its footer" if group < 0 else f"row group {group}"
        raise DataError(f"{f}: cannot read {where} ({why}); the file is truncated or corrupt: "
                        "rewrite it from its source") from e


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


# ----------------------------------------------------------------------------- label domains


def domain_text(task: TaskSpec, *, bounds: bool = True) -> str:
    """The label domain of a task in words (used in messages, JSON and HTML)."""
    if task.type == "binary":
        return "{0, 1}"
    if task.type == "multiclass":
        return f"integers in [0, {task.num_classes})"
    if task.type == "retrieval":
        return f"item ids in [0, {task.vocab_size})"
    if bounds and task.bounds is not None:
        return f"finite values in [{task.bounds[0]:g}, {task.bounds[1]:g}]"
    return "finite values"


def domain_violation(task: TaskSpec, dtype: Any, *, bounds: bool = True) -> pl.Expr:
    """True where a non-null target is outside the task's label domain (null stays null).

    binary: 0 or 1; multiclass: an integer in [0, num_classes); retrieval: an integer in
    [0, vocab_size); regression: finite and, with ``bounds`` (unless ``bounds=False``:
    what training itself needs), within [low, high]. NaN is never in a domain (write
    missing targets as null). The one definition the validate stage and training share.
    """
    import polars as pl

    c = pl.col(task.column)
    if dtype == pl.Boolean or dtype == pl.Null:
        return c.is_null() & c.is_not_null()  # always in domain (null where null)
    is_float = dtype.is_float()
    x = c.cast(pl.Float64) if is_float else c  # integers compare as they are (no cast pass)
    if task.type == "regression":
        if not bounds or task.bounds is None:
            return ~x.is_finite() if is_float else c.is_null() & c.is_not_null()
        ok = (x >= task.bounds[0]) & (x <= task.bounds[1])
        return ~(ok & x.is_finite()) if is_float else ~ok
    high = 2 if task.type == "binary" else (task.num_classes if task.type == "multiclass" else task.vocab_size)
    ok = (x >= 0) & (x < high)
    if is_float:
        ok = ok & x.is_finite() & (x == x.floor())
    return ~ok


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
        return cls.from_dict(json.loads(p.read_text()), p)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path) -> Preprocessor:
        """From the parsed ``preprocessing.json`` of ``source`` (named in errors)."""
        v = d.get("schema_version")
        if v != PREPROCESSING_SCHEMA_VERSION:
            raise DataError(
                f"{source}: preprocessing schema_version {v!r} is not supported (this version reads "
                f"{PREPROCESSING_SCHEMA_VERSION})"
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


def _open_dataset(path: str | Path) -> tuple[list[Path], pl.LazyFrame, dict[str, Any]]:
    """Files, lazy frame and schema of a dataset, with the footer checks of the validate
    stage (readable, same columns and dtypes in every file, not empty)."""
    files = parquet_files(path)
    dataset_rows(files)
    lf = scan_dataset(path)
    return files, lf, read_schema(lf, path)


def _validate_hint(path: str | Path, config_src: str | Path | None) -> str:
    if config_src is None:
        return f"run `ple-adatt validate --data {path}` with its data config for the full report"
    return f"run `ple-adatt validate --data {path} --config {config_src}` for the full report"


def _examples(values: list[Any]) -> str:
    seen: dict[str, Any] = {}  # first distinct values, NaN included once
    for v in values:
        seen.setdefault(repr(v), v)
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in list(seen.values())[:5])


def check_trainable(
    lf: pl.LazyFrame,
    schema: dict[str, Any],
    cfg: DataConfig,
    tasks: list[TaskSpec],
    path: str | Path,
    *,
    splits: tuple[str, ...] = ("train", "val"),
    config_src: str | Path | None = None,
) -> None:
    """Refuse data that training cannot use, before any training starts: one lazy pass.

    Over the rows of ``splits``: every target of ``tasks`` is in its label domain
    (:func:`domain_violation` without regression bounds: binary {0, 1}, multiclass and
    retrieval integers in range, regression finite), each task has a target in the train
    split (when ``train`` is among ``splits``), and no float numeric feature holds an
    infinite value (null and NaN features are imputed, as the contract says). The validate
    stage checks all this and more; this makes a run without ``--validation`` stop with
    the same kind of one-line DataError instead of crashing in a loss or training on NaN.
    """
    import polars as pl

    if SPLIT_COLUMN not in schema:
        lf = lf.with_columns(split_expr(cfg.split, schema))
    rows = lf.filter(pl.col(SPLIT_COLUMN).is_in(list(splits)))
    is_train = pl.col(SPLIT_COLUMN) == "train"
    float_features = [f for f in cfg.numeric_features if schema[f].is_float()]
    aggs: list[pl.Expr] = [is_train.sum().alias("__train__")]
    for t in tasks:
        aggs += [domain_violation(t, schema[t.column], bounds=False).sum().alias(f"bad::{t.name}"),
                 (pl.col(t.column).is_not_null() & is_train).sum().alias(f"train::{t.name}")]
    aggs += [pl.col(f).is_infinite().sum().alias(f"inf::{f}") for f in float_features]
    g = rows.select(aggs).collect().row(0, named=True)

    where = " and ".join(splits) + (" rows" if len(splits) > 1 else " split")
    problems: list[tuple[str, str]] = []  # (column, message)
    for t in tasks:
        bad = int(g[f"bad::{t.name}"] or 0)
        if bad:
            vals = (rows.filter(domain_violation(t, schema[t.column], bounds=False).fill_null(False))
                    .select(pl.col(t.column)).head(1000).collect()[t.column].to_list())
            what = ("non-finite value(s)" if t.type == "regression"
                    else f"value(s) outside {domain_text(t, bounds=False)}")
            problems.append((t.column, (
                f"column `{t.column}` (target of {t.type} task '{t.name}') holds {bad:,} {what} in the {where} "
                f"(e.g. {_examples(vals)}); training cannot use them: fix the labels (write a missing target "
                "as null)")))
        elif "train" in splits and g["__train__"] and not g[f"train::{t.name}"]:
            problems.append((t.column, (
                f"column `{t.column}` (target of task '{t.name}') has no target in the {g['__train__']:,} "
                "train rows; the task cannot be trained: drop it from the data config or fill its targets")))
    for f in float_features:
        n_inf = int(g[f"inf::{f}"] or 0)
        if n_inf:
            vals = rows.filter(pl.col(f).is_infinite()).select(pl.col(f)).head(1000).collect()[f].to_list()
            problems.append((f, (
                f"column `{f}` (numeric feature) holds {n_inf:,} infinite value(s) in the {where} "
                f"(e.g. {_examples(vals)}); training cannot normalise them: write them as null (missing "
                "features are imputed)")))
    if problems:
        others = [c for c, _ in problems[1:]]
        more = f"; other columns with problems: {', '.join(f'`{c}`' for c in others)}" if others else ""
        raise DataError(f"{path}: {problems[0][1]}{more}; {_validate_hint(path, config_src)}")


def load_split(
    path: str | Path,
    cfg: DataConfig,
    pre: Preprocessor,
    split: str,
    task_names: list[str] | None = None,
    max_rows: int | None = None,
    *,
    check: bool = True,
    config_src: str | Path | None = None,
) -> TensorData:
    """Read one split into tensors, selecting only the needed columns.

    ``check``: first refuse data training cannot use in this split (:func:`check_trainable`).
    """
    import polars as pl
    import torch

    files, lf, schema = _open_dataset(path)
    check_columns(schema, cfg, path, str(config_src or "the data config"))
    tasks = [cfg.task(n) for n in (task_names or cfg.task_names)]
    with read_errors(path, files):
        if check:
            check_trainable(lf, schema, cfg, tasks, path, splits=(split,), config_src=config_src)
        lf = lf.with_columns(split_expr(cfg.split, schema)).filter(pl.col(SPLIT_COLUMN) == split)
        if max_rows is not None:
            lf = lf.head(max_rows)
        exprs = feature_exprs(cfg, pre)
        for t in tasks:
            exprs.append(pl.col(t.column).cast(pl.Float32).alias(f"y::{t.name}"))
        if cfg.cluster_column:
            cl = pl.col(cfg.cluster_column).cast(pl.Int64, strict=False)  # NaN and huge floats -> null
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
    *,
    config_src: str | Path | None = None,
) -> tuple[Preprocessor, TensorData, TensorData]:
    """Fit preprocessing on train, then load train and val tensors (the training entry point).

    Raises DataError, before anything is fitted, for unreadable files and for data training
    cannot use (:func:`check_trainable` over the train and val rows).
    """
    files, lf, schema = _open_dataset(path)
    check_columns(schema, cfg, path, str(config_src or "the data config"))
    tasks = [cfg.task(n) for n in (task_names or cfg.task_names)]
    with read_errors(path, files):
        check_trainable(lf, schema, cfg, tasks, path, config_src=config_src)
        pre = fit_preprocessor(lf.with_columns(split_expr(cfg.split, schema)), cfg)
    train = load_split(path, cfg, pre, "train", task_names, max_rows, check=False, config_src=config_src)
    val = load_split(path, cfg, pre, "val", task_names, None if max_rows is None else max(max_rows // 4, 1),
                     check=False, config_src=config_src)
    return pre, train, val
