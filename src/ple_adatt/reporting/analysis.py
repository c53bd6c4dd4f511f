"""The numbers behind the report: affinity structure, groups, blocking, conflict measures.

Pure numpy on plain lists and arrays (no torch), so every function is easy to test on a
hand-made matrix. Conventions:

* ``A`` is adaTT's EMA affinity buffer (seed section 2-3), in the checkpoint's task order.
  Its diagonal is *not* 1 in general: each update adds ``(1 - decay) * cos``, and the cosine
  of a task with no gradient in that update is 0 (the first update of a run whose heads
  start at zero observes all-zero gradients and is copied as is). The diagonal is thus the
  EMA mass of the updates in which the task had a gradient.
* ``C`` is the *cosine form* ``A_ij / sqrt(A_ii A_jj)`` (unit diagonal): the EMA-weighted
  mean gradient cosine over the updates in which both tasks were measured. It is what the
  clustering, the agreement score and GCD use. Blocking (seed section 7) compares the raw
  ``A`` with the threshold, exactly as :meth:`AdaptiveTaskTransfer.detect_negative_transfer`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "cosine_form",
    "group_assignment",
    "group_order",
    "agreement",
    "average_linkage",
    "suggest_regrouping",
    "silhouette",
    "epoch_1based",
    "epoch_ref",
    "negative_transfer_pairs",
    "changing_pairs",
    "transfer_shares",
    "gcd_pairs",
    "tci",
]


def cosine_form(a: np.ndarray, measured: Sequence[bool] | None = None) -> np.ndarray:
    """``A_ij / sqrt(A_ii A_jj)``, clipped to [-1, 1], unit diagonal; unmeasured rows are 0."""
    a = np.asarray(a, dtype=np.float64)
    d = np.diag(a).copy()
    ok = d > 1e-12 if measured is None else (d > 1e-12) & np.asarray(measured, dtype=bool)
    s = np.sqrt(np.where(ok, d, 1.0))
    c = a / np.outer(s, s)
    c[~ok, :] = 0.0
    c[:, ~ok] = 0.0
    c = np.clip(c, -1.0, 1.0)
    np.fill_diagonal(c, 1.0)
    return c


# ------------------------------------------------------------------------------- groups


def group_assignment(tasks: Sequence[str], task_groups: Mapping[str, Any]) -> dict[str, str | None]:
    """Each task's configured group (the last group that lists it, as the prior does), or None."""
    out: dict[str, str | None] = {t: None for t in tasks}
    for g, spec in task_groups.items():
        members = spec.get("members", []) if isinstance(spec, Mapping) else list(spec)
        for m in members:
            if m in out:
                out[m] = g
    return out


def group_order(tasks: Sequence[str], task_groups: Mapping[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """Tasks ordered by group (config order, then task order), and the groups as present."""
    assign = group_assignment(tasks, task_groups)
    groups: list[dict[str, Any]] = []
    order: list[str] = []
    for g in task_groups:
        members = [t for t in tasks if assign[t] == g]
        if members:
            groups.append({"name": g, "members": members})
            order += members
    rest = [t for t in tasks if assign[t] is None]
    if rest:
        groups.append({"name": "(ungrouped)", "members": rest})
        order += rest
    return order, groups


def _upper(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, k=1)


def _rank_auc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """P(a random ``pos`` value > a random ``neg`` value), ties count half."""
    if len(pos) == 0 or len(neg) == 0:
        return None
    gt = (pos[:, None] > neg[None, :]).sum()
    eq = (pos[:, None] == neg[None, :]).sum()
    return float((gt + 0.5 * eq) / (len(pos) * len(neg)))


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for val in np.unique(v):  # average ranks of ties
            idx = v == val
            r[idx] = r[idx].mean()
        return r

    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def silhouette(dist: np.ndarray, labels: Sequence[Any]) -> list[float | None]:
    """Per-item silhouette (b - a) / max(a, b); None for an item alone in its cluster."""
    labels = list(labels)
    n = len(labels)
    uniq = list(dict.fromkeys(labels))
    out: list[float | None] = []
    for i in range(n):
        own = [j for j in range(n) if labels[j] == labels[i] and j != i]
        if not own or len(uniq) < 2:
            out.append(None)
            continue
        a = float(np.mean(dist[i, own]))
        b = min(float(np.mean(dist[i, [j for j in range(n) if labels[j] == g]])) for g in uniq if g != labels[i])
        out.append(0.0 if max(a, b) == 0 else (b - a) / max(a, b))
    return out


def _mean(xs: Sequence[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return float(np.mean(v)) if v else None


def agreement(tasks: Sequence[str], c: np.ndarray, prior: np.ndarray, groups: list[dict[str, Any]],
              measured: Sequence[bool]) -> dict[str, Any]:
    """How well the configured groups match the learned affinity (cosine form ``c``).

    * ``score``: probability that a random within-group pair has a higher affinity than a
      random cross-group pair (0.5 = the groups explain nothing, 1 = perfectly).
    * ``spearman``: rank correlation of the affinity with the symmetrised prior.
    * per group: mean within / cross affinity and that group's own score; a group is
      ``supported`` when its members are more affine to each other than to the rest.
    * per task: silhouette of its configured group under the distance ``1 - c``, and the gap
      between its mean affinity to the closest other group and to its own. A task is
      ``misplaced`` (closer to another group) only when the gap exceeds ``MISPLACED_Z`` times
      its noise (see ``MISPLACED_RULE``); a positive gap within the noise is ``weakly_closer``.
    """
    idx = {t: i for i, t in enumerate(tasks)}
    label = {t: g["name"] for g in groups for t in g["members"]}
    real = [g for g in groups if g["name"] != "(ungrouped)"]
    ok = np.asarray(measured, dtype=bool)
    iu, ju = _upper(len(tasks))
    keep = ok[iu] & ok[ju]
    iu, ju = iu[keep], ju[keep]
    same = np.array([label[tasks[i]] == label[tasks[j]] and label[tasks[i]] != "(ungrouped)"
                     for i, j in zip(iu, ju)], dtype=bool)
    vals = c[iu, ju]
    psym = (prior + prior.T) / 2
    out: dict[str, Any] = {
        "score": _rank_auc(vals[same], vals[~same]),
        "spearman": _spearman(vals, psym[iu, ju]),
        "within_mean": float(vals[same].mean()) if same.any() else None,
        "cross_mean": float(vals[~same].mean()) if (~same).any() else None,
        "pairs_within": int(same.sum()),
        "pairs_cross": int((~same).sum()),
    }
    dist = 1.0 - c
    sil = silhouette(dist, [label[t] for t in tasks])
    group_rows = []
    for g in real:
        mem = [idx[t] for t in g["members"] if ok[idx[t]]]
        rest = [i for i in range(len(tasks)) if tasks[i] not in g["members"] and ok[i]]
        w = [c[i, j] for a, i in enumerate(mem) for j in mem[a + 1:]]
        x = [c[i, j] for i in mem for j in rest]
        wm = float(np.mean(w)) if w else None
        xm = float(np.mean(x)) if x else None
        margin = None if wm is None or xm is None else wm - xm
        score = _rank_auc(np.array(w), np.array(x))
        group_rows.append({
            "name": g["name"], "members": list(g["members"]), "within_mean": wm, "cross_mean": xm,
            "margin": margin, "score": score,
            "silhouette": _mean([sil[idx[t]] for t in g["members"]]),
            "verdict": _verdict(margin, score),
            "supported": None if margin is None else _verdict(margin, score) == "supported",
        })
    out["groups"] = group_rows
    task_rows = []
    cross_i, cross_j, cross_v = iu[~same], ju[~same], vals[~same]
    for t in tasks:
        i = idx[t]
        g = label[t]
        means, sizes = {}, {}
        for h in groups:
            others = [idx[m] for m in h["members"] if m != t and ok[idx[m]]]
            if others and h["name"] != "(ungrouped)":
                means[h["name"]] = float(np.mean(c[i, others]))
                sizes[h["name"]] = len(others)
        own = means.get(g)
        best = max((h for h in means if h != g), key=lambda h: means[h], default=None)
        gap = (means[best] - own) if best is not None and own is not None else None
        # the noise of the gap: the spread of the cross-group pairs not involving this task (pairs
        # the configured groups call unrelated), as the standard error of a difference of two means
        rest = cross_v[(cross_i != i) & (cross_j != i)]
        sd = float(np.std(rest, ddof=1)) if len(rest) >= MIN_NOISE_PAIRS else None
        noise = None if sd is None or gap is None else sd * math.sqrt(1 / sizes[g] + 1 / sizes[best])
        closer = bool(ok[i] and best is not None and g != "(ungrouped)" and (own is None or means[best] > own))
        beyond = closer and (own is None or (noise is not None and gap > MISPLACED_Z * noise))
        task_rows.append({
            "task": t, "group": g, "measured": bool(ok[i]), "own_mean": own,
            "best_other_group": best, "best_other_mean": means.get(best) if best else None,
            "silhouette": sil[i] if ok[i] else None,
            "gap": gap,
            "noise": noise,
            "min_gap": None if noise is None else MISPLACED_Z * noise,
            "z": None if noise is None or gap is None or noise == 0 else gap / noise,
            "misplaced": beyond,
            "weakly_closer": closer and not beyond,
        })
    out["tasks"] = task_rows
    out["misplaced_rule"] = MISPLACED_RULE
    out["misplaced_z"] = MISPLACED_Z
    out["silhouette"] = _mean([r["silhouette"] for r in task_rows])
    return out


#: a task is flagged as closer to another group only when its gap exceeds this many noise units
MISPLACED_Z = 2.5
#: fewer cross-group pairs than this give no noise estimate (the task is then never flagged)
MIN_NOISE_PAIRS = 3
MISPLACED_RULE = (
    f"closer to another group when gap = (mean affinity to that group) - (mean affinity to its own group) "
    f"> {MISPLACED_Z:g} x noise, noise = sd x sqrt(1/n_own + 1/n_other) with sd the standard deviation of the "
    "cosine affinity over the cross-group pairs not involving the task (pairs the configured groups call "
    "unrelated) and n_own, n_other the members the two means average; a positive gap within that is "
    "'weakly closer (within noise)'"
)


SUPPORT_SCORE = 0.6


def _verdict(margin: float | None, score: float | None) -> str:
    """``supported``: members more affine to each other than to the rest (margin > 0) for
    most pairs (score >= 0.6); ``weak``: on average only; ``not supported``: not even that."""
    if margin is None or score is None:
        return "single task"
    if margin > 0 and score >= SUPPORT_SCORE:
        return "supported"
    return "weak" if margin > 0 else "not supported"


def structure_strength(sil: float | None) -> str:
    """Kaufman & Rousseeuw's reading of a mean silhouette."""
    if sil is None:
        return "n/a"
    if sil > 0.5:
        return "strong"
    if sil > 0.25:
        return "reasonable"
    return "weak"


# --------------------------------------------------------------------------- clustering


def average_linkage(dist: np.ndarray, k: int) -> list[int]:
    """Agglomerative clustering (UPGMA) of a distance matrix into ``k`` clusters.

    Deterministic: ties merge the lowest indices first. Labels are numbered by the order
    of each cluster's first member.
    """
    n = dist.shape[0]
    k = max(1, min(k, n))
    clusters: list[list[int]] = [[i] for i in range(n)]
    while len(clusters) > k:
        best, pair = math.inf, (0, 1)
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                d = float(dist[np.ix_(clusters[a], clusters[b])].mean())
                if d < best - 1e-12:
                    best, pair = d, (a, b)
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    clusters.sort(key=min)
    labels = [0] * n
    for li, members in enumerate(clusters):
        for i in members:
            labels[i] = li
    return labels


def suggest_regrouping(tasks: Sequence[str], c: np.ndarray, groups: list[dict[str, Any]],
                       measured: Sequence[bool]) -> dict[str, Any]:
    """Cluster the measured tasks by affinity into as many groups as configured.

    Each cluster takes the name of the configured group it overlaps most (greedy, largest
    overlap first); clusters left without a name become ``new-1``, ``new-2``, ... Moves
    list the tasks whose suggested group differs from the configured one.
    """
    ok = [i for i, m in enumerate(measured) if m]
    real = [g for g in groups if g["name"] != "(ungrouped)"]
    k = max(len(real), 1)
    if len(ok) < 2:
        return {"k": k, "groups": [], "moves": [], "silhouette_configured": None, "silhouette_suggested": None,
                "structure": "n/a", "recommended": False}
    sub_tasks = [tasks[i] for i in ok]
    dist = 1.0 - c[np.ix_(ok, ok)]
    labels = average_linkage(dist, k)
    configured = {t: g["name"] for g in groups for t in g["members"]}
    overlaps = sorted(
        ((sum(1 for t, lab in zip(sub_tasks, labels) if lab == li and configured.get(t) == g["name"]), -li, g["name"])
         for li in set(labels) for g in real),
        reverse=True,
    )
    names: dict[int, str] = {}
    used: set[str] = set()
    for n_common, neg_li, gname in overlaps:
        li = -neg_li
        if n_common > 0 and li not in names and gname not in used:
            names[li] = gname
            used.add(gname)
    fresh = 0
    for li in sorted(set(labels)):
        if li not in names:
            fresh += 1
            names[li] = f"new-{fresh}"
    suggested = [{"name": names[li], "members": [t for t, lab in zip(sub_tasks, labels) if lab == li]}
                 for li in sorted(set(labels))]
    moves = [{"task": t, "from": configured.get(t), "to": names[lab]}
             for t, lab in zip(sub_tasks, labels) if configured.get(t) != names[lab]]
    sil_cfg = _mean(silhouette(dist, [configured.get(t) for t in sub_tasks]))
    sil_new = _mean(silhouette(dist, [names[lab] for lab in labels]))
    strength = structure_strength(sil_new)
    recommended = bool(moves) and strength != "weak" and (sil_cfg is None or (sil_new or 0) > sil_cfg)
    return {
        "k": k,
        "method": "average-linkage clustering of the distance 1 - cosine affinity, cut at k",
        "groups": suggested,
        "moves": moves,
        "silhouette_configured": sil_cfg,
        "silhouette_suggested": sil_new,
        "structure": strength,
        "recommended": recommended,
    }


# ---------------------------------------------------------------------- negative transfer


def epoch_1based(epoch: Any) -> int | None:
    """The number people see for a manifest's 0-based ``epoch`` (the console's "epoch 5/6")."""
    return None if epoch is None else int(epoch) + 1


def epoch_ref(h: Mapping[str, Any]) -> dict[str, Any]:
    """Where in training a history entry or event sits: ``epoch`` 0-based as in the checkpoint
    manifest, ``epoch_1based`` as the console prints it and the report shows it."""
    return {"phase": h.get("phase"), "epoch": h.get("epoch"), "epoch_1based": epoch_1based(h.get("epoch")),
            "step": h.get("step")}


def negative_transfer_pairs(tasks: Sequence[str], a: np.ndarray, threshold: float,
                            history: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Blocked pairs of the final matrix, and pairs that were below the threshold and recovered.

    ``history`` is the manifest's ``affinity_history`` (one snapshot per epoch end, in
    order). For a blocked pair: the snapshot where its final run below the threshold
    started (``since_*``), how many snapshots that run lasted and the steps it spans
    (from the snapshot before the run to the last snapshot).
    """
    mats = [np.asarray(h["matrix"], dtype=np.float64) for h in history]
    c = cosine_form(a)
    blocked, recovered = [], []
    n = len(tasks)
    for i in range(n):
        for j in range(i + 1, n):
            below = [bool(m[i, j] < threshold) for m in mats]
            now = bool(a[i, j] < threshold)
            if not now and not any(below):
                continue
            row: dict[str, Any] = {
                "a": tasks[i], "b": tasks[j], "affinity": float(a[i, j]), "cosine": float(c[i, j]),
                "min_affinity": float(min([m[i, j] for m in mats] + [a[i, j]])),
                "epochs_ever_below": int(sum(below)),
            }
            if any(below):
                first = below.index(True)
                row["first_below"] = epoch_ref(history[first])
            if now:
                s = len(below)
                while s > 0 and below[s - 1]:
                    s -= 1
                if s < len(below):
                    prev_step = history[s - 1]["step"] if s > 0 else 0
                    row["since"] = epoch_ref(history[s])
                    row["epochs_below"] = len(below) - s
                    row["steps_below_at_most"] = int(history[-1]["step"] - prev_step)
                else:  # the final buffer is below but no snapshot shows it
                    row["since"] = None
                    row["epochs_below"] = 0
                    row["steps_below_at_most"] = None
                blocked.append(row)
            else:
                recovered.append(row)
    blocked.sort(key=lambda r: r["affinity"])
    recovered.sort(key=lambda r: r["min_affinity"])
    return {"blocked": blocked, "recovered": recovered}


def changing_pairs(tasks: Sequence[str], history: Sequence[Mapping[str, Any]], top: int = 6,
                   always: Sequence[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    """The pairs whose affinity moved most over the snapshots (range), plus ``always``."""
    if not history:
        return []
    mats = np.stack([np.asarray(h["matrix"], dtype=np.float64) for h in history])  # (S, T, T)
    n = len(tasks)
    rows = []
    for i in range(n):
        for j in range(i + 1, n):
            v = mats[:, i, j]
            rows.append({"a": tasks[i], "b": tasks[j], "values": [float(x) for x in v],
                         "range": float(v.max() - v.min()), "change": float(v[-1] - v[0])})
    rows.sort(key=lambda r: (-r["range"], r["a"], r["b"]))
    chosen = rows[:top]
    keys = {(r["a"], r["b"]) for r in chosen}
    for a_, b_ in always:
        key = (a_, b_) if tasks.index(a_) < tasks.index(b_) else (b_, a_)
        if key not in keys:
            chosen += [r for r in rows if (r["a"], r["b"]) == key]
            keys.add(key)
    for r in chosen:
        r["reason"] = "blocked" if (r["a"], r["b"]) in {tuple(sorted(p, key=tasks.index)) for p in always} \
            else "most changing"
    return chosen


# ------------------------------------------------------------------------ transfer share


def transfer_shares(tasks: Sequence[str], history: Sequence[Mapping[str, Any]],
                    weights: Sequence[float] | None) -> list[dict[str, Any]]:
    """Per epoch and task: the share of the transfer-enhanced loss that came from transfer.

    ``task_losses`` are epoch means of ``w_i L_i + transfer_i``, ``raw_losses`` epoch
    means of ``L_i`` over the same batches, so ``transfer_i = task_loss_i - w_i raw_i``.
    With uncertainty weighting ``w`` changes during training and is not recorded per
    epoch: ``weights`` is None and only the total share (from the history) is given.
    """
    out = []
    for h in history:
        enh, raw = h.get("task_losses") or {}, h.get("raw_losses") or {}
        per: dict[str, float | None] = {}
        for i, t in enumerate(tasks):
            if weights is None or t not in enh or t not in raw or not enh[t] > 0:
                per[t] = None
                continue
            per[t] = max(float(enh[t]) - float(weights[i]) * float(raw[t]), 0.0) / float(enh[t])
        out.append({**epoch_ref(h), "transfer_phase": h.get("transfer_phase"), "total": h.get("transfer_share"),
                    "tasks": per})
    return out


# ------------------------------------------------------------------ MoCoGrad measures


def gcd_pairs(tasks: Sequence[str], c: np.ndarray, measured: Sequence[bool]) -> list[dict[str, Any]]:
    """GCD_ij = 1 - cos(g_i, g_j) per measured pair, in [0, 2]; conflict when GCD > 1."""
    rows = []
    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            if not (measured[i] and measured[j]):
                continue
            g = 1.0 - float(c[i, j])
            rows.append({"a": tasks[i], "b": tasks[j], "cos": float(c[i, j]), "gcd": g, "conflict": g > 1.0})
    rows.sort(key=lambda r: -r["gcd"])
    return rows


def tci(joint: Mapping[str, float], alone: Mapping[str, float]) -> list[dict[str, Any]]:
    """TCI_k = (L_alone - L_joint) / L_alone per task with both losses; negative = conflict."""
    rows = []
    for t, la in alone.items():
        lj = joint.get(t)
        if lj is None or not math.isfinite(lj) or not la > 0:
            rows.append({"task": t, "alone_loss": la, "joint_loss": lj, "tci": None, "conflict": None})
            continue
        v = (la - lj) / la
        rows.append({"task": t, "alone_loss": la, "joint_loss": lj, "tci": v, "conflict": v < 0})
    return rows
