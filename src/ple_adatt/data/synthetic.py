"""Synthetic 16-task recommender data with planted task structure.

The generator writes the columns that ``configs/data/synthetic.yaml`` declares. It plants
structure that tests and the report can check:

* **groups**: four latent factors, one per task group of the seed (engagement, lifecycle,
  value, consumption). Every task is driven by its group's factor along a direction shared
  by the group (plus a smaller private direction), so tasks of one group have aligned
  gradients on the shared experts and tasks of different groups much less so.
* **a conflicting pair**: ``ctr`` and ``churn``. churn's signal is the *negated* engagement
  score, and both targets share one unobserved shock ``eps`` with the *same* sign
  (``ctr = 1[s + eps > 0]``, ``churn = 1[-s + eps > 0]``: a month-end campaign raises clicks
  and cancellations alike). The towers learn opposite directions for ``s``, so the shared
  shock makes the two tasks' residual gradients point against each other on the shared
  experts: their measured affinity goes negative and adaTT blocks the pair. (Flipping a
  label alone would *not* conflict: the towers absorb the sign.)
* **per-task missing targets**: cvr only where ctr is 1, ltv on ~60% of rows, nba on ~80%,
  brand_prediction only where merchant_affinity is 1, a little random missingness elsewhere.
* **clusters**: a ``cluster`` column (8 clusters from the value factor, ~5% unknown) whose
  cluster changes some tasks' mapping (a cluster-specific permutation of spending_category,
  a cluster bias on nba and a cluster scale on ltv), so cluster heads have something to learn.

Everything is numpy; one seed gives one dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

NUM_NUMERIC = 36
CATEGORICAL = {"region": 12, "device": 6, "segment": 30, "channel_pref": 7}
NUM_CLUSTERS = 8
LATENT_DIM = 4
GROUPS = {
    "engagement": ["ctr", "cvr", "engagement"],
    "lifecycle": ["churn", "retention", "life_stage", "ltv"],
    "value": ["balance_util", "channel", "timing"],
    "consumption": ["nba", "spending_category", "consumption_cycle", "spending_bucket",
                    "merchant_affinity", "brand_prediction"],
}
TASKS = [t for members in GROUPS.values() for t in members]
CONFLICT_PAIR = ("ctr", "churn")
GROUP_SHOCK = 1.5  # weight of the unobserved group shock in every task score
CONFLICT_SHOCK = 2.0  # std of the shock shared by the conflicting pair
REGRESSION_TASKS = {"ltv", "balance_util", "consumption_cycle"}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def generate(rows: int, seed: int = 0, brand_vocab: int = 50_000) -> dict[str, np.ndarray]:
    """Generate the columns as numpy arrays (float targets with NaN for missing)."""
    rng = np.random.default_rng(seed)
    n = rows
    # one latent factor per group, (n, LATENT_DIM) each
    z = {g: rng.standard_normal((n, LATENT_DIM)) for g in GROUPS}
    # task scores: shared group direction + smaller private direction, unit variance
    score: dict[str, np.ndarray] = {}
    for g, members in GROUPS.items():
        common = rng.standard_normal(LATENT_DIM)
        for t in members:
            d = common + 0.45 * rng.standard_normal(LATENT_DIM)
            d /= np.linalg.norm(d)
            score[t] = z[g] @ d
    # unobserved per-row group shocks: tasks of one group share them, so their residuals (and
    # hence their gradients on the shared experts) stay correlated after the observable part is fit
    eta = {g: rng.standard_normal(n) for g in GROUPS}
    observed = dict(score)  # the parts the features explain
    for g, members in GROUPS.items():
        for t in members:
            score[t] = score[t] + GROUP_SHOCK * eta[g]
    eps = rng.standard_normal(n) * CONFLICT_SHOCK  # the shared shock of the conflicting pair
    # clusters from the value factor (nearest of NUM_CLUSTERS random centres), ~5% unknown
    centres = rng.standard_normal((NUM_CLUSTERS, LATENT_DIM)) * 1.5
    d2 = ((z["value"][:, None, :] - centres[None]) ** 2).sum(-1)
    cluster = d2.argmin(1).astype(np.float64)
    cluster[rng.random(n) < 0.05] = np.nan

    cols: dict[str, np.ndarray] = {"user_id": np.arange(n, dtype=np.int64)}
    # numeric features: noisy linear mixes of all latent factors
    zall = np.concatenate([z[g] for g in GROUPS], axis=1)  # (n, 16)
    mix = rng.standard_normal((zall.shape[1], NUM_NUMERIC)) / np.sqrt(zall.shape[1])
    xnum = zall @ mix + 0.35 * rng.standard_normal((n, NUM_NUMERIC))
    xnum[rng.random(xnum.shape) < 0.01] = np.nan  # a few missing feature values
    for i in range(NUM_NUMERIC):
        cols[f"num_{i:02d}"] = xnum[:, i].astype(np.float32)
    # categorical features: quantised projections, as strings
    for name, card in CATEGORICAL.items():
        proj = zall @ rng.standard_normal(zall.shape[1]) + 0.5 * rng.standard_normal(n)
        edges = np.quantile(proj, np.linspace(0, 1, card + 1)[1:-1])
        codes = np.searchsorted(edges, proj)
        cols[name] = np.array([f"{name}_{k}" for k in range(card)], dtype=object)[codes]

    y: dict[str, np.ndarray] = {}

    def binary(s: np.ndarray, noise: float = 0.6) -> np.ndarray:
        return (s + noise * rng.standard_normal(n) > 0).astype(np.float64)

    def classes(k: int, s: np.ndarray, group: str, bias: np.ndarray | None = None) -> np.ndarray:
        w = rng.standard_normal((LATENT_DIM, k))
        logits = 1.5 * (z[group] @ w) + 0.8 * s[:, None] * np.linspace(-1, 1, k)[None]
        if bias is not None:
            logits = logits + bias
        g = rng.gumbel(size=(n, k))
        return (logits + g).argmax(1).astype(np.float64)

    cl_idx = np.nan_to_num(cluster, nan=0).astype(int)
    known = ~np.isnan(cluster)
    # engagement group; ctr is one side of the planted conflict
    y["ctr"] = (score["ctr"] + eps > 0).astype(np.float64)
    y["cvr"] = binary(score["cvr"] - 0.3)
    y["cvr"][y["ctr"] == 0] = np.nan  # conversion is observed only after a click
    y["engagement"] = binary(score["engagement"])
    # lifecycle group; churn = the negated engagement score + its own factor + the same shock
    y["churn"] = (-observed["ctr"] + 0.5 * score["churn"] + eps > 0).astype(np.float64)
    y["retention"] = binary(score["retention"] + 0.5)
    y["life_stage"] = classes(5, score["life_stage"], "lifecycle")
    ltv_scale = np.where(known, 1.0 + 0.6 * (cl_idx % 3), 1.0)  # clusters change the mapping
    y["ltv"] = np.exp(0.6 * score["ltv"]) * ltv_scale + 0.2 * rng.standard_normal(n)
    y["ltv"][rng.random(n) > 0.6] = np.nan
    # value group
    y["balance_util"] = _sigmoid(1.5 * score["balance_util"] + 0.3 * rng.standard_normal(n))
    y["channel"] = classes(4, score["channel"], "value")
    y["timing"] = classes(6, score["timing"], "value")
    # consumption group; clusters shift nba and permute spending_category
    nba_bias = np.where(known[:, None], rng.standard_normal((NUM_CLUSTERS, 12))[cl_idx] * 1.5, 0.0)
    y["nba"] = classes(12, score["nba"], "consumption", nba_bias)
    y["nba"][rng.random(n) > 0.8] = np.nan
    sc = classes(12, score["spending_category"], "consumption")
    perms = np.stack([rng.permutation(12) for _ in range(NUM_CLUSTERS)])
    y["spending_category"] = np.where(known, perms[cl_idx, sc.astype(int)], sc).astype(np.float64)
    y["consumption_cycle"] = 30.0 + 8.0 * score["consumption_cycle"] + 2.0 * rng.standard_normal(n)
    qs = np.quantile(score["spending_bucket"], [0.2, 0.4, 0.6, 0.8])
    y["spending_bucket"] = np.searchsorted(qs, score["spending_bucket"] + 0.3 * rng.standard_normal(n)).astype(np.float64)
    y["merchant_affinity"] = binary(score["merchant_affinity"])
    # brand: a 2-d grid cell of two consumption projections, so the id is learnable
    side = int(np.sqrt(brand_vocab))
    u1 = _sigmoid(1.7 * score["brand_prediction"] + 0.1 * rng.standard_normal(n))
    u2 = _sigmoid(1.7 * (z["consumption"] @ rng.standard_normal(LATENT_DIM) / 2.0))
    brand = np.minimum((u1 * side).astype(int), side - 1) * side + np.minimum((u2 * side).astype(int), side - 1)
    y["brand_prediction"] = brand.astype(np.float64)
    y["brand_prediction"][y["merchant_affinity"] == 0] = np.nan
    # a little random missingness everywhere
    for t in TASKS:
        y[t][rng.random(n) < 0.02] = np.nan
    for t in TASKS:
        cols[f"y_{t}"] = y[t]
    cols["cluster"] = cluster
    return cols


def to_arrow(cols: dict[str, np.ndarray]) -> pa.Table:
    """Columns from :func:`generate` as an Arrow table: integer targets and cluster with nulls."""
    import pyarrow as pa

    arrays = {}
    for k, v in cols.items():
        if k.startswith("y_") or k == "cluster":
            mask = np.isnan(v)
            if k == "cluster" or k[2:] not in REGRESSION_TASKS:
                arrays[k] = pa.array(np.nan_to_num(v).astype(np.int64), mask=mask)
            else:
                arrays[k] = pa.array(v.astype(np.float32), mask=mask)
        elif v.dtype == object:
            arrays[k] = pa.array(v, type=pa.string())
        else:
            arrays[k] = pa.array(v, mask=np.isnan(v) if v.dtype.kind == "f" else None)
    return pa.table(arrays)


def write_parquet(out: str | Path, rows: int, seed: int = 0, brand_vocab: int = 50_000) -> Path:
    """Generate and write one Parquet file atomically (temp file, then rename).

    ``out`` is checked before generating (a directory, a parent that is a file); nothing is
    left behind when writing fails.
    """
    from .files import check_parquet_out, write_table_atomic

    out = check_parquet_out(out, require_suffix=False)
    table = to_arrow(generate(rows, seed=seed, brand_vocab=brand_vocab))
    return write_table_atomic(table, out, row_group_size=256 * 1024)
