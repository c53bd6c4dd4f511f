"""Validation metrics per task: AUC and log-loss, accuracy, RMSE, recall@k."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["auc", "task_metrics", "PRIMARY_METRIC"]

#: the metric a task is judged by, and whether higher is better
PRIMARY_METRIC = {
    "binary": ("auc", True),
    "multiclass": ("accuracy", True),
    "regression": ("rmse", False),
    "retrieval": ("recall@10", True),
}


def auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties given their average rank."""
    s = scores.double().flatten()
    y = labels.flatten() > 0.5
    n_pos = int(y.sum())
    n_neg = int(y.numel() - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    uniq, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg_rank = ends - (counts.double() - 1) / 2  # 1-based average rank of each unique score
    ranks = avg_rank[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _recall_at_k(query: Tensor, items: Tensor, target: Tensor, k: int, chunk: int = 4096) -> float:
    q = torch.nn.functional.normalize(query.float(), dim=-1)
    v = torch.nn.functional.normalize(items.float(), dim=-1)
    hits = 0
    for i in range(0, len(q), chunk):
        scores = q[i:i + chunk] @ v.t()
        top = scores.topk(min(k, v.shape[0]), dim=-1).indices
        hits += int((top == target[i:i + chunk].long().view(-1, 1)).any(-1).sum())
    return hits / max(len(q), 1)


def task_metrics(kind: str, pred: Tensor, target: Tensor, *, items: Tensor | None = None) -> dict[str, float]:
    """Metrics of one task on the rows that have a target. ``pred`` is in user units."""
    mask = ~torch.isnan(target)
    n = int(mask.sum())
    if n == 0:
        return {"n": 0}
    p, t = pred[mask], target[mask]
    if kind == "binary":
        pc = p.double().clamp(1e-7, 1 - 1e-7)
        logloss = float(-(t * pc.log() + (1 - t) * (1 - pc).log()).mean())
        return {"n": n, "auc": auc(p, t), "logloss": logloss, "positive_rate": float(t.mean())}
    if kind == "multiclass":
        acc = float((p.argmax(-1) == t.long()).double().mean())
        nll = float(-torch.log(p.double().gather(1, t.long().view(-1, 1)).clamp_min(1e-12)).mean())
        return {"n": n, "accuracy": acc, "logloss": nll}
    if kind == "regression":
        err = (p.double() - t.double())
        return {"n": n, "rmse": math.sqrt(float(err.pow(2).mean())), "mae": float(err.abs().mean())}
    if kind == "retrieval":
        if items is None:
            raise ValueError("retrieval metrics need the item embedding table")
        return {"n": n, "recall@10": _recall_at_k(p, items, t, 10)}
    raise ValueError(f"unknown task type {kind!r}")
