"""Exact counts over every row of the dataset, computed by lazy polars queries.

Two scans, whatever the dataset size:

1. a plain aggregation over the target, feature and cluster columns: per task the number
   of targets outside the label domain and the label range, per numeric feature the null
   count and a sum (a non-finite sum flags the rare feature that needs an exact count of
   NaN / infinite values in a third, targeted query);
2. a group-by over (split code, cluster bucket, availability bit mask) that yields row
   counts: from it availability overall, per split and per cluster follow for every task
   without a group-by per task.

The label-domain rules (:func:`domain_violation`, :func:`domain_text`) live in
``ple_adatt.data.dataset`` so that these counts, the examples of bad values, the docs and
the checks training makes when it loads the data agree on one definition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import DataConfig
from ..data.dataset import domain_violation, split_expr

if TYPE_CHECKING:
    import polars as pl

SPLITS = ("train", "val", "test")
OTHER_SPLIT = "other"  # split column values outside train / val / test (method: column)
UNKNOWN_CLUSTER = "unknown"  # null cluster id
OUT_OF_RANGE_CLUSTER = "out_of_range"  # cluster id outside [0, num_clusters)
MAX_EXAMPLES = 5


@dataclass
class TaskCounts:
    """Exact counts of one task target over all rows."""

    rows: int
    available: int
    out_of_domain: int
    label_min: float | None
    label_max: float | None
    by_split: dict[str, dict[str, int]]  # split -> {"rows", "available"}
    by_cluster: dict[str, dict[str, int]]  # cluster label -> {"rows", "available"}
    train_by_cluster: dict[str, dict[str, int]]  # the same, train split only
    examples: list[Any] = field(default_factory=list)  # out-of-domain values (only when any)


@dataclass
class FeatureCounts:
    kind: str  # numeric | categorical
    nulls: int
    nan: int
    infinite: int


@dataclass
class DatasetCounts:
    rows: int
    split_rows: dict[str, int]
    cluster_rows: dict[str, int]  # cluster label -> rows (all splits)
    train_cluster_rows: dict[str, int]
    tasks: dict[str, TaskCounts]
    features: dict[str, FeatureCounts]


def _cluster_labels(cfg: DataConfig) -> list[str]:
    if not cfg.cluster_column:
        return []
    return [str(i) for i in range(cfg.num_clusters)] + [UNKNOWN_CLUSTER, OUT_OF_RANGE_CLUSTER]


def _split_code(cfg: DataConfig, schema: dict[str, Any]) -> pl.Expr:
    import polars as pl

    s = split_expr(cfg.split, schema)
    return (
        pl.when(s == "train").then(0).when(s == "val").then(1).when(s == "test").then(2)
        .otherwise(3).cast(pl.UInt8).alias("__split_code__")
    )


def _cluster_code(cfg: DataConfig) -> pl.Expr:
    """0..C-1 for known clusters, C for null, C+1 for ids outside [0, C); 0 without clusters."""
    import polars as pl

    if not cfg.cluster_column:
        return pl.lit(0, dtype=pl.UInt32).alias("__cluster_code__")
    c_num = cfg.num_clusters
    x = pl.col(cfg.cluster_column).cast(pl.Float64)
    return (
        pl.when(x.is_null()).then(c_num)
        .when(~((x >= 0) & (x < c_num))).then(c_num + 1)
        .otherwise(x.cast(pl.Int64)).cast(pl.UInt32).alias("__cluster_code__")
    )


def count_dataset(
    lf: pl.LazyFrame,
    schema: dict[str, Any],
    cfg: DataConfig,
    rows: int,
    log: Callable[[str], None] = print,
) -> DatasetCounts:
    """Every number of the availability report, exact over all ``rows`` rows."""
    import polars as pl

    log(f"counting availability over {rows:,} rows ({len(cfg.tasks)} tasks, "
        f"{len(cfg.numeric_features) + len(cfg.categorical_features)} features) ...")
    # --- scan 1: label domains, label ranges, feature nulls
    aggs: list[pl.Expr] = [pl.len().alias("__rows__")]
    for t in cfg.tasks:
        c = pl.col(t.column)
        aggs += [
            domain_violation(t, schema[t.column]).sum().alias(f"bad::{t.name}"),
            c.min().cast(pl.Float64).alias(f"min::{t.name}"),
            c.max().cast(pl.Float64).alias(f"max::{t.name}"),
        ]
    for f in cfg.numeric_features:
        aggs.append(pl.col(f).null_count().alias(f"null::{f}"))
        if schema[f].is_float():
            aggs.append(pl.col(f).sum().alias(f"sum::{f}"))
    for f in cfg.categorical_features:
        aggs.append(pl.col(f).null_count().alias(f"null::{f}"))
    g = lf.select(aggs).collect().row(0, named=True)

    # NaN / inf in float features: exact counts only for the features whose sum is not finite
    suspects = [f for f in cfg.numeric_features if f"sum::{f}" in g and g[f"sum::{f}"] is not None
                and not np.isfinite(g[f"sum::{f}"])]
    nonfinite: dict[str, tuple[int, int]] = {}
    if suspects:
        log(f"counting NaN / infinite values of {len(suspects)} feature(s) ...")
        r = lf.select(
            [pl.col(f).is_nan().sum().alias(f"nan::{f}") for f in suspects]
            + [pl.col(f).is_infinite().sum().alias(f"inf::{f}") for f in suspects]
        ).collect().row(0, named=True)
        nonfinite = {f: (int(r[f"nan::{f}"] or 0), int(r[f"inf::{f}"] or 0)) for f in suspects}
    features: dict[str, FeatureCounts] = {}
    for f in cfg.numeric_features:
        nan, inf = nonfinite.get(f, (0, 0))
        features[f] = FeatureCounts("numeric", int(g[f"null::{f}"]), nan, inf)
    for f in cfg.categorical_features:
        features[f] = FeatureCounts("categorical", int(g[f"null::{f}"]), 0, 0)

    # --- scan 2: rows per (split, cluster, which targets are present)
    n_words = (len(cfg.tasks) + 63) // 64
    masks = []
    for w in range(n_words):
        bits = [
            pl.col(t.column).is_not_null().cast(pl.UInt64) * pl.lit(1 << (i - 64 * w), dtype=pl.UInt64)
            for i, t in enumerate(cfg.tasks) if i // 64 == w
        ]
        masks.append(pl.sum_horizontal(bits).alias(f"__mask{w}__"))
    keys = [_split_code(cfg, schema), _cluster_code(cfg), *masks]
    grouped = lf.select(keys).group_by([k.meta.output_name() for k in keys]).len().collect()
    split_code = grouped["__split_code__"].to_numpy().astype(np.int64)
    cluster_code = grouped["__cluster_code__"].to_numpy().astype(np.int64)
    n = grouped["len"].to_numpy().astype(np.int64)
    mask_words = [grouped[f"__mask{w}__"].to_numpy().astype(np.uint64) for w in range(n_words)]

    split_names = [*SPLITS, OTHER_SPLIT]
    cl_labels = _cluster_labels(cfg) or ["all"]
    n_cl = len(cl_labels)

    def table(weights: np.ndarray, sel: np.ndarray | None = None) -> np.ndarray:
        """(split, cluster) sums of ``weights`` over the grouped rows (optionally selected)."""
        w = weights if sel is None else weights * sel
        flat = np.bincount(split_code * n_cl + cluster_code, weights=w, minlength=4 * n_cl)
        return flat.reshape(4, n_cl).round().astype(np.int64)

    rows_tab = table(n.astype(np.float64))
    total = int(rows_tab.sum())
    split_rows = {s: int(rows_tab[i].sum()) for i, s in enumerate(split_names)}
    cluster_rows = {c: int(rows_tab[:, j].sum()) for j, c in enumerate(cl_labels)} if cfg.cluster_column else {}
    train_cluster_rows = {c: int(rows_tab[0, j]) for j, c in enumerate(cl_labels)} if cfg.cluster_column else {}

    tasks: dict[str, TaskCounts] = {}
    for i, t in enumerate(cfg.tasks):
        bit = (mask_words[i // 64] >> np.uint64(i % 64)) & np.uint64(1)
        av = table(n.astype(np.float64), bit.astype(np.float64))
        by_split = {s: {"rows": split_rows[s], "available": int(av[k].sum())} for k, s in enumerate(split_names)}
        by_cluster: dict[str, dict[str, int]] = {}
        train_by_cluster: dict[str, dict[str, int]] = {}
        if cfg.cluster_column:
            by_cluster = {c: {"rows": cluster_rows[c], "available": int(av[:, j].sum())} for j, c in enumerate(cl_labels)}
            train_by_cluster = {c: {"rows": train_cluster_rows[c], "available": int(av[0, j])}
                                for j, c in enumerate(cl_labels)}
        lo, hi = g[f"min::{t.name}"], g[f"max::{t.name}"]
        tasks[t.name] = TaskCounts(
            rows=total,
            available=int(av.sum()),
            out_of_domain=int(g[f"bad::{t.name}"] or 0),
            label_min=None if lo is None else float(lo),
            label_max=None if hi is None else float(hi),
            by_split=by_split,
            by_cluster=by_cluster,
            train_by_cluster=train_by_cluster,
        )

    # examples of out-of-domain labels: a small targeted query per failing task
    for t in cfg.tasks:
        tc = tasks[t.name]
        if tc.out_of_domain:
            vals = (
                lf.filter(domain_violation(t, schema[t.column]).fill_null(False))
                .select(pl.col(t.column)).head(1000).collect()[t.column].to_list()
            )
            seen: dict[str, Any] = {}  # first distinct values, NaN included once
            for v in vals:
                seen.setdefault(repr(v), v)
                if len(seen) == MAX_EXAMPLES:
                    break
            tc.examples = list(seen.values())
    return DatasetCounts(total, split_rows, cluster_rows, train_cluster_rows, tasks, features)

