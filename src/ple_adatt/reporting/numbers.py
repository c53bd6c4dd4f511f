"""Build the report dict (``report.json``): every number the HTML and Markdown show.

The renderers read only this dict, so the JSON is the complete, machine-readable report.
Task matrices are in the checkpoint's task order (``tasks``); ``order`` is the display
order (by configured group). NaN and infinities become ``null``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import REPORT_SCHEMA_VERSION, analysis
from .inputs import ReportInputs

TRAJECTORY_PAIRS = 6

GCD_DEFINITION = ("GCD_ij = 1 - cos(g_i, g_j), the cosine taken from the EMA affinity in cosine form; "
                  "GCD > 1 (cos < 0) is a gradient conflict. This project's definition following the "
                  "MoCoGrad notes (seed 002).")
TCI_DEFINITION = ("TCI_k = (L_alone_k - L_joint_k) / L_alone_k, the relative change of task k's validation "
                  "loss when trained jointly instead of alone; negative = task conflict. This project's "
                  "definition following the MoCoGrad notes (seed 002).")


def clean(obj: Any) -> Any:
    """JSON-safe copy: NaN / inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _epoch_kind(h: dict[str, Any], warmup: int, freeze_at: int | None, strategy: str) -> str:
    """What transfer did during an epoch; derived from the schedule and the freeze event.

    (The history's ``transfer_phase`` is taken after ``on_epoch_end`` and so already says
    ``frozen`` for the epoch at whose end the weights froze.)
    """
    if h["phase"] != "phase1":
        return "phase2"
    if strategy != "adatt":
        return "measure only"
    if h["epoch"] < warmup:
        return "warmup"
    if freeze_at is not None and h["epoch"] > freeze_at:
        return "frozen"
    return "dynamic"


def _timeline(history: list[dict[str, Any]], events: list[dict[str, Any]], warmup: int,
              strategy: str) -> dict[str, Any]:
    """x axis in epochs completed: 0-based phase-1 epoch e (the console's epoch e+1) spans [e, e+1],
    phase-2 epoch e spans [E1+e, E1+e+1]; an event at the end of epoch e sits at x = e+1."""
    n1 = sum(1 for h in history if h["phase"] == "phase1")
    freeze_at = next((e["epoch"] for e in events if e["event"] == "adatt_freeze_epoch"), None)
    epochs = []
    for h in history:
        x0 = h["epoch"] + (n1 if h["phase"] == "phase2" else 0)
        epochs.append({**analysis.epoch_ref(h), "x0": x0, "x1": x0 + 1,
                       "kind": _epoch_kind(h, warmup, freeze_at, strategy),
                       "recorded_transfer_phase": h.get("transfer_phase")})
    bands: list[dict[str, Any]] = []
    for e in epochs:
        if bands and bands[-1]["kind"] == e["kind"]:
            bands[-1]["x1"] = e["x1"]
        else:
            bands.append({"kind": e["kind"], "x0": e["x0"], "x1": e["x1"]})
    marks = []
    for ev in events:
        if ev["phase"] == "phase2":
            x = n1 + (0 if ev["event"] in ("phase2_start", "cgc_frozen_epoch") and ev["epoch"] == 0
                      else ev["epoch"] + 1)
        else:
            x = ev["epoch"] + 1  # freezes and stops act at the end of the epoch
        marks.append({"event": ev["event"], **analysis.epoch_ref(ev), "x": x})
    return {"epochs": epochs, "bands": bands, "events": marks, "x_max": epochs[-1]["x1"] if epochs else 0,
            "freeze_epoch": freeze_at, "freeze_epoch_1based": analysis.epoch_1based(freeze_at)}


def _metrics(inp: ReportInputs) -> dict[str, Any]:
    from ..metrics import PRIMARY_METRIC

    kinds = {s["name"]: s["type"] for s in inp.phase1["task_specs"]}
    m1 = inp.phase1.get("metrics") or {}
    m2 = inp.phase2.get("metrics") or {}
    rows, clusters = [], []
    by_cluster: dict[str, dict[str, Any]] = {}
    for t in inp.phase1["tasks"]:
        key, higher = PRIMARY_METRIC[kinds[t]]
        a = (m1.get("tasks") or {}).get(t, {})
        b = (m2.get("tasks") or {}).get(t, {})
        v1, v2 = a.get(key), b.get(key)
        ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (v1, v2))
        delta = v2 - v1 if ok else None
        rows.append({
            "task": t, "type": kinds[t], "metric": key, "higher_is_better": higher, "n": b.get("n", a.get("n")),
            "phase1": v1, "phase2": v2, "delta": delta,
            "improved": None if delta is None or delta == 0 else (delta > 0) == higher,
            "loss_phase1": a.get("loss"), "loss_phase2": b.get("loss"),
        })
        per: dict[str, Any] = {}
        for c in sorted(set(a.get("by_cluster") or {}) | set(b.get("by_cluster") or {}),
                        key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s)):
            ca, cb = (a.get("by_cluster") or {}).get(c, {}), (b.get("by_cluster") or {}).get(c, {})
            per[c] = {"n": cb.get("n", ca.get("n")), "phase1": ca.get(key), "phase2": cb.get(key)}
            if c not in clusters:
                clusters.append(c)
        by_cluster[t] = per
    clusters.sort(key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    return {"tasks": rows, "val_loss": {"phase1": m1.get("val_loss"), "phase2": m2.get("val_loss")},
            "clusters": clusters, "by_cluster": by_cluster}


def _availability(inp: ReportInputs) -> dict[str, Any]:
    av = inp.availability
    rows = []
    for t, r in (av.get("tasks") or {}).items():
        rows.append({
            "task": t, "trained": t in inp.phase1["tasks"], "type": r.get("type"), "rows": r.get("rows"),
            "available": r.get("available"), "rate": r.get("rate"), "min_availability": r.get("min_availability"),
            "decision": r.get("decision"), "reasons": r.get("reasons") or [],
            "val_rate": ((r.get("per_split") or {}).get("val") or {}).get("rate"),
        })
    return {"rows": av.get("rows"), "passed": av.get("passed"), "enabled_tasks": av.get("enabled_tasks"),
            "disabled_tasks": av.get("disabled_tasks"), "tasks": rows}


def _tci(inp: ReportInputs) -> dict[str, Any] | None:
    if inp.baselines is None:
        return None
    rows = []
    for phase, alone in inp.baselines.val_loss.items():
        src = inp.phase1 if phase == "phase1" else inp.phase2
        joint = {t: m.get("loss") for t, m in ((src.get("metrics") or {}).get("tasks") or {}).items()}
        for r in analysis.tci(joint, alone):
            rows.append({**r, "phase": phase})
    return {"definition": TCI_DEFINITION, "sources": inp.baselines.sources, "tasks": rows,
            "conflicts": [r["task"] for r in rows if r["conflict"]],
            "checked": inp.baselines.checked, "warnings": list(inp.baselines.warnings)}


def build_report_data(inp: ReportInputs) -> dict[str, Any]:
    """The complete report dict for checked inputs (see :func:`.inputs.load_inputs`)."""
    m1, m2 = inp.phase1, inp.phase2
    tasks: list[str] = list(m1["tasks"])
    tcfg = m1["train_config"]
    strategy = m1.get("strategy", tcfg["transfer"]["strategy"])
    acfg = tcfg["transfer"]["adatt"]
    threshold = float(getattr(inp.transfer, "neg_threshold", acfg["negative_transfer_threshold"]))
    task_groups = tcfg["transfer"].get("task_groups") or {}
    warnings: list[str] = []

    comp = inp.transfer.affinity_computer
    a = comp.affinity_matrix.detach().cpu().double().numpy()
    update_count = int(comp.update_count)
    a2 = inp.transfer2.affinity_computer.affinity_matrix.detach().cpu().double().numpy()
    if not np.allclose(a, a2):
        warnings.append("the phase2 checkpoint's affinity buffer differs from phase1's; the report uses phase1's "
                        "(adaTT is off in Phase 2)")
    diag = np.diag(a)
    measured = [bool(update_count > 0 and d > 1e-12) for d in diag]
    c = analysis.cosine_form(a, measured)
    order, groups = analysis.group_order(tasks, task_groups)
    if hasattr(inp.transfer, "group_prior"):
        prior = inp.transfer.group_prior.detach().cpu().double().numpy()
    else:
        prior = np.zeros_like(a)
        warnings.append(f"strategy {strategy!r} has no group prior; the prior panel is empty")
    if update_count == 0:
        warnings.append("the affinity was never updated (update_count 0): the matrix is the identity it "
                        "starts from; no structure can be read from it")
    unmeasured = [t for t, ok in zip(tasks, measured) if not ok]
    if unmeasured and update_count > 0:
        warnings.append(f"tasks without any measured gradient (zero diagonal): {', '.join(unmeasured)}")

    agree = analysis.agreement(tasks, c, prior, groups, measured)
    regroup = analysis.suggest_regrouping(tasks, c, groups, measured)

    # negative transfer: the module's own verdict, plus since-when from the history
    history = m2.get("history") or m1.get("history") or []
    aff_hist = m1.get("affinity_history") or []
    if hasattr(inp.transfer, "detect_negative_transfer"):
        detected = inp.transfer.detect_negative_transfer()
        blocking = True
    else:
        detected = {t: [u for j, u in enumerate(tasks) if j != i and a[i, j] < threshold]
                    for i, t in enumerate(tasks)}
        detected = {t: v for t, v in detected.items() if v}
        blocking = False
    neg = analysis.negative_transfer_pairs(tasks, a, threshold, aff_hist)
    pair_set = {tuple(sorted((x, y), key=tasks.index)) for x, ys in detected.items() for y in ys}
    table_set = {(r["a"], r["b"]) for r in neg["blocked"]}
    if pair_set != table_set:  # pragma: no cover - same buffer, same rule
        warnings.append("the blocked pairs computed here differ from detect_negative_transfer(); "
                        "the table lists the computed pairs")

    # transfer weights and the share of each task's loss that came from transfer
    tm = inp.transfer.get_transfer_matrix().detach().cpu().double().numpy() \
        if hasattr(inp.transfer, "get_transfer_matrix") else None
    shares = analysis.transfer_shares(tasks, [h for h in history if h["phase"] == "phase1"], inp.loss_weights)
    last_used = next((h.get("transfer_matrix") for h in reversed(history)
                      if h["phase"] == "phase1" and h.get("transfer_matrix")), None)
    timeline = _timeline(history, m2.get("events") or m1.get("events") or [], int(acfg["warmup_epochs"]),
                         strategy)
    active = [s for s, e in zip(shares, timeline["epochs"]) if e["kind"] in ("dynamic", "frozen")]
    ratio = float(acfg["max_transfer_ratio"])
    cap = ratio / (1.0 + ratio) if ratio > 0 else None  # transfer <= r * L  =>  share <= r / (1 + r)
    per_task_share = []
    for t in tasks:
        vals = [s["tasks"][t] for s in active if s["tasks"][t] is not None]
        last = active[-1]["tasks"][t] if active else None
        per_task_share.append({
            "task": t,
            "last": last,
            "at_cap": None if cap is None or last is None else bool(last >= cap - 1e-4),
            "mean": float(np.mean(vals)) if vals else None,
            "max": float(np.max(vals)) if vals else None,
            "top_sources": _top_sources(tasks, tm, tasks.index(t)) if tm is not None else [],
        })

    # trajectories: the most changing pairs plus every blocked pair
    blocked_pairs = [(r["a"], r["b"]) for r in neg["blocked"]]
    traj = analysis.changing_pairs(tasks, aff_hist, TRAJECTORY_PAIRS, always=blocked_pairs[:4])
    snap_x = []
    for h in aff_hist:
        ep = next((e for e in timeline["epochs"] if e["phase"] == h["phase"] and e["epoch"] == h["epoch"]), None)
        snap_x.append(ep["x1"] if ep else None)

    gcd = analysis.gcd_pairs(tasks, c, measured)
    gcd_matrix = (1.0 - c).tolist()
    tci = _tci(inp)
    if tci:
        warnings += tci["warnings"]
    metrics = _metrics(inp)
    availability = _availability(inp)

    misplaced = [r for r in agree["tasks"] if r["misplaced"]]
    improved = [r["task"] for r in metrics["tasks"] if r["improved"]]
    worse = [r["task"] for r in metrics["tasks"] if r["improved"] is False]
    summary = {
        "tasks": len(tasks),
        "groups": len([g for g in groups if g["name"] != "(ungrouped)"]),
        "agreement_score": agree["score"],
        "groups_supported": [g["name"] for g in agree["groups"] if g["verdict"] == "supported"],
        "groups_weak": [g["name"] for g in agree["groups"] if g["verdict"] == "weak"],
        "groups_not_supported": [g["name"] for g in agree["groups"] if g["verdict"] == "not supported"],
        "misplaced_tasks": [{"task": r["task"], "group": r["group"], "closer_to": r["best_other_group"]}
                            for r in misplaced],
        "weakly_closer_tasks": [{"task": r["task"], "group": r["group"], "closer_to": r["best_other_group"]}
                                for r in agree["tasks"] if r["weakly_closer"]],
        "suggested_moves": len(regroup["moves"]),
        "regrouping_recommended": regroup["recommended"],
        "tasks_at_transfer_cap": [p["task"] for p in per_task_share if p["at_cap"]],
        "blocked_pairs": len(neg["blocked"]),
        "recovered_pairs": len(neg["recovered"]),
        "conflicting_pairs": sum(1 for r in gcd if r["conflict"]),
        "measured_pairs": len(gcd),
        "transfer_share_last_epoch": active[-1]["total"] if active else None,
        "phase2_improved": improved,
        "phase2_worse": worse,
        "val_loss_phase1": metrics["val_loss"]["phase1"],
        "val_loss_phase2": metrics["val_loss"]["phase2"],
        "tci_conflicts": tci["conflicts"] if tci else None,
    }
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "kind": "report",
        "run": {
            "tasks": tasks,
            "order": order,
            "strategy": strategy,
            "phase1": _ckpt_info(inp.phase1_dir, m1),
            "phase2": _ckpt_info(inp.phase2_dir, m2),
            "validation": {"path": str(inp.validation_dir), "created": inp.validation.get("created")},
            "data_hash": (m1.get("inputs") or {}).get("data"),
            "config_hash": m1.get("config_hash"),
        },
        "settings": {
            "negative_transfer_threshold": threshold,
            "ema_decay": acfg["ema_decay"],
            "warmup_epochs": acfg["warmup_epochs"],
            "freeze_epoch": acfg["freeze_epoch"],
            "transfer_lambda": acfg["transfer_lambda"],
            "max_transfer_ratio": acfg["max_transfer_ratio"],
            "prior_blend_start": acfg["prior_blend_start"],
            "prior_blend_end": acfg["prior_blend_end"],
            "grad_interval": tcfg["transfer"].get("grad_interval"),
            "loss_weighting": ("uncertainty" if tcfg["transfer"].get("strategy") == "uncertainty"
                               else tcfg["training"].get("loss_weighting")),
            "loss_weights": inp.loss_weights,
            "task_groups": task_groups,
        },
        "summary": summary,
        "affinity": {
            "ema": a.tolist(),
            "cosine": c.tolist(),
            "diagonal": diag.tolist(),
            "update_count": update_count,
            "measured": dict(zip(tasks, measured)),
            "groups": groups,
            "note": ("`ema` is adaTT's EMA buffer (what blocking and the transfer weights use); its diagonal is "
                     "the EMA mass of the updates in which the task had a gradient, 1 only after many "
                     "updates. `cosine` = ema_ij / sqrt(ema_ii ema_jj), unit diagonal, the mean gradient "
                     "cosine; it is what clustering, agreement and GCD use."),
        },
        "prior": {"matrix": prior.tolist(), "note": "row-normalised group prior (zero diagonal), seed section 5"},
        "agreement": agree,
        "regrouping": regroup,
        "transfer": {
            "available": tm is not None,
            "matrix": tm.tolist() if tm is not None else None,
            "last_used_matrix": last_used,
            "share_cap": cap,
            "per_task": per_task_share,
            "epochs": shares,
            "note": "row i = receiving task, column j = source task: loss_i += lambda * sum_j w_ij L_j "
                    "(capped at max_transfer_ratio * L_i)",
        },
        "negative_transfer": {
            "threshold": threshold,
            "blocking": blocking,
            "detected": detected,
            "blocked": neg["blocked"],
            "recovered": neg["recovered"],
        },
        "trajectories": {"snapshots": [{**analysis.epoch_ref(h), "x": x} for h, x in zip(aff_hist, snap_x)],
                         "pairs": traj, "timeline": timeline},
        "gcd": {"definition": GCD_DEFINITION, "pairs": gcd, "matrix": gcd_matrix},
        "tci": tci,
        "metrics": metrics,
        "availability": availability,
        "warnings": warnings,
    }
    return clean(report)


def _top_sources(tasks: list[str], tm: np.ndarray, i: int, k: int = 3) -> list[dict[str, Any]]:
    row = tm[i]
    idx = [j for j in np.argsort(-row, kind="stable") if j != i and row[j] > 0][:k]
    return [{"task": tasks[j], "weight": float(row[j])} for j in idx]


def _ckpt_info(path: Any, man: dict[str, Any]) -> dict[str, Any]:
    return {"path": str(path), "created": man.get("created"), "epochs": (man.get("epochs") or {}).get(man["phase"]),
            "stage": (man.get("producer") or {}).get("stage"),
            "git_commit": (man.get("producer") or {}).get("git_commit"),
            "checkpoint_sha256": (man.get("files") or {}).get("checkpoint.pt")}
