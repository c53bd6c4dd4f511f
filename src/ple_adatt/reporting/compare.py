"""The strategy comparison: numbers (``compare.json``), Markdown and a self-contained HTML page.

Inputs are checkpoint manifests only (no torch): one Phase 2 checkpoint per strategy and,
optionally, one single-task checkpoint per task. What it computes:

* per-task primary metric (``ple_adatt.metrics.PRIMARY_METRIC``) of every strategy and of
  the single-task baselines;
* ``delta_m`` (Maninis et al., CVPR 2019; Vandenhende et al. 2021): the mean relative gain
  over single-task, ``100/T * sum_t (-1)^{l_t} (M_t - B_t) / B_t`` with ``l_t = 1`` where
  lower is better, so positive = better than training each task alone;
* the Pareto front over the task metrics: a strategy is on it when no other strategy (or
  the single-task set) is at least as good on every task and better on one;
* training cost: Phase 1 seconds (the strategy runs in Phase 1 only), optimizer steps and
  steps per second, plus the wall time of the whole run when the stage measured it;
* TCI per task (``analysis.tci``): (L_alone - L_joint) / L_alone of the validation loss;
  negative = the task does worse jointly than alone (conflict).
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import Any

from ..artifacts import ArtifactError, read_manifest
from ..metrics import PRIMARY_METRIC
from .analysis import tci

__all__ = ["COMPARE_SCHEMA_VERSION", "compare_numbers", "delta_m", "pareto_front", "render_markdown",
           "render_html", "read_run"]

COMPARE_SCHEMA_VERSION = 1
SINGLE = "single-task"
DELTA_M_DEFINITION = ("delta-m = 100/T * sum_t s_t (M_t - B_t) / B_t over the tasks with a single-task "
                      "baseline B_t, s_t = +1 where higher is better, -1 where lower is better "
                      "(Maninis et al. 2019); positive = better than single-task")
TCI_DEFINITION = "TCI_t = (L_alone - L_joint) / L_alone of the validation loss; negative = conflict"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_run(path: str | Path) -> dict[str, Any]:
    """The manifest of a run's final checkpoint: ``path`` is a checkpoint dir or a run dir
    holding ``phase2`` (preferred) or ``phase1``."""
    p = Path(path)
    for cand in (p / "phase2", p / "phase1", p):
        if (cand / "manifest.json").exists():
            man = read_manifest(cand, "checkpoint", (1,))
            man["_dir"] = str(cand)
            timing = cand.parent / "timing.json"
            if timing.exists():
                man["_timing"] = json.loads(timing.read_text())
            return man
    raise ArtifactError(f"{p}: holds no checkpoint (manifest.json, phase2/ or phase1/); pass the output "
                        "directory of `ple-adatt train` or of one compare run")


def _kinds(man: dict[str, Any]) -> dict[str, str]:
    return {s["name"]: s["type"] for s in man.get("task_specs", [])}


def _cost(man: dict[str, Any]) -> dict[str, Any]:
    p1 = [h for h in man.get("history", []) if h.get("phase") == "phase1"]
    seconds = sum(float(h.get("seconds", 0.0)) for h in p1)
    steps = int(p1[-1]["step"]) if p1 else 0
    timing = man.get("_timing") or {}
    return {"phase1_seconds": seconds, "phase1_epochs": len(p1), "phase1_steps": steps,
            "steps_per_second": steps / seconds if seconds > 0 else None,
            "wall_seconds": timing.get("wall_seconds")}


def _negative_pairs(man: dict[str, Any]) -> list[str]:
    """Task pairs whose last measured affinity is below adaTT's negative-transfer threshold
    (measured the same way for every strategy)."""
    hist = man.get("affinity_history") or []
    if not hist:
        return []
    A = hist[-1]["matrix"]
    thr = ((man.get("train_config") or {}).get("transfer") or {}).get("adatt", {}).get(
        "negative_transfer_threshold", -0.1)
    names = man["tasks"]
    return [f"{names[i]}<->{names[j]}" for i in range(len(names)) for j in range(i + 1, len(names))
            if _finite(A[i][j]) and A[i][j] < thr]


def delta_m(metrics: dict[str, float | None], baseline: dict[str, float | None],
            higher_better: dict[str, bool]) -> float | None:
    """Mean relative gain over the baseline in percent (see the module docstring)."""
    terms = []
    for t, b in baseline.items():
        m = metrics.get(t)
        if not (_finite(m) and _finite(b)) or b == 0:
            continue
        sign = 1.0 if higher_better[t] else -1.0
        terms.append(sign * (m - b) / abs(b))
    return 100.0 * sum(terms) / len(terms) if terms else None


def pareto_front(points: dict[str, dict[str, float | None]], higher_better: dict[str, bool]) -> list[str]:
    """Names of the non-dominated points over the tasks every point has a value for."""
    tasks = [t for t in higher_better if all(_finite(p.get(t)) for p in points.values())]

    def better_eq(a: dict[str, Any], b: dict[str, Any], t: str) -> bool:
        return a[t] >= b[t] if higher_better[t] else a[t] <= b[t]

    def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return all(better_eq(a, b, t) for t in tasks) and any(a[t] != b[t] for t in tasks)

    return [n for n, p in points.items() if not any(dominates(q, p) for m, q in points.items() if m != n)]


def compare_numbers(runs: dict[str, dict[str, Any]], singles: dict[str, dict[str, Any]] | None = None,
                    *, data: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Everything the comparison shows. ``runs``: strategy -> checkpoint manifest;
    ``singles``: task -> single-task checkpoint manifest (may be empty)."""
    if not runs:
        raise ArtifactError("nothing to compare: no strategy run was given")
    first = next(iter(runs.values()))
    tasks = list(first["tasks"])
    for name, man in runs.items():
        if list(man["tasks"]) != tasks:
            raise ArtifactError(f"run {name!r} trains tasks {man['tasks']}, the others {tasks}; compare runs of "
                                "the same data and tasks")
    kinds = _kinds(first)
    metric = {t: PRIMARY_METRIC[kinds[t]][0] for t in tasks}
    higher = {t: PRIMARY_METRIC[kinds[t]][1] for t in tasks}
    table: dict[str, dict[str, float | None]] = {}
    losses: dict[str, dict[str, float | None]] = {}
    for name, man in runs.items():
        mt = man["metrics"]["tasks"]
        table[name] = {t: mt.get(t, {}).get(metric[t]) for t in tasks}
        losses[name] = {t: mt.get(t, {}).get("loss") for t in tasks}
    base: dict[str, float | None] = {}
    base_loss: dict[str, float] = {}
    single_cost: dict[str, Any] = {}
    for t, man in (singles or {}).items():
        m = man["metrics"]["tasks"].get(t, {})
        base[t] = m.get(metric[t])
        if _finite(m.get("loss")) and m["loss"] > 0:
            base_loss[t] = float(m["loss"])
        single_cost[t] = _cost(man)
    points = dict(table)
    if base and all(_finite(base.get(t)) for t in tasks):
        points[SINGLE] = {t: base[t] for t in tasks}
    front = pareto_front(points, higher)
    strategies = []
    for name, man in runs.items():
        rows = tci(losses[name], base_loss) if base_loss else []
        strategies.append({
            "name": name,
            "strategy": man.get("strategy"),
            "checkpoint": man.get("_dir"),
            "metrics": table[name],
            "val_loss": losses[name],
            "delta_m": delta_m(table[name], base, higher) if base else None,
            "wins_vs_single": sum(1 for t in tasks if _finite(table[name][t]) and _finite(base.get(t)) and (
                table[name][t] > base[t] if higher[t] else table[name][t] < base[t])) if base else None,
            "pareto": name in front,
            "cost": _cost(man),
            "tci": rows,
            "tci_conflicts": [r["task"] for r in rows if r["conflict"]],
            "negative_transfer_pairs": _negative_pairs(man),
        })
    best = {}
    for t in tasks:
        vals = [(s["metrics"][t], s["name"]) for s in strategies if _finite(s["metrics"][t])]
        if vals:
            best[t] = (max(vals) if higher[t] else min(vals))[1]
    ranked = sorted((s for s in strategies if s["delta_m"] is not None), key=lambda s: -s["delta_m"])
    return {
        "kind": "strategy_comparison",
        "schema_version": COMPARE_SCHEMA_VERSION,
        "data": data,
        "command": command,
        "tasks": [{"name": t, "type": kinds[t], "metric": metric[t], "higher_is_better": higher[t],
                   "single_task": base.get(t), "single_task_loss": base_loss.get(t), "best_strategy": best.get(t)}
                  for t in tasks],
        "strategies": strategies,
        "single_task": {"present": bool(base), "cost": single_cost,
                        "on_pareto_front": SINGLE in front} if base else None,
        "pareto_front": front,
        "ranking_by_delta_m": [s["name"] for s in ranked],
        "definitions": {"delta_m": DELTA_M_DEFINITION, "tci": TCI_DEFINITION,
                        "pareto": "non-dominated over every task's primary metric (direction-aware)",
                        "cost": "Phase 1 seconds summed over epochs (training + validation); steps/s = Phase 1 "
                                "optimizer steps / those seconds; wall = the whole run (both phases, data loading)"},
    }


# ------------------------------------------------------------------------------ rendering


def _num(x: Any, nd: int = 4) -> str:
    return f"{x:.{nd}f}" if _finite(x) else "-"


def _signed_pct(x: Any) -> str:
    return f"{x:+.2f}%" if _finite(x) else "-"


def render_markdown(r: dict[str, Any]) -> str:
    tasks = r["tasks"]
    lines = ["# Strategy comparison", ""]
    if r.get("command"):
        lines += [f"Command: `{r['command']}`", ""]
    head = "| strategy | " + " | ".join(f"{t['name']} {t['metric']}{'↑' if t['higher_is_better'] else '↓'}"
                                         for t in tasks) + " | Δm % vs single | Pareto | phase-1 s | steps/s |"
    lines += [head, "|" + "---|" * (len(tasks) + 5)]
    for s in r["strategies"]:
        cells = []
        for t in tasks:
            v = _num(s["metrics"][t["name"]])
            cells.append(f"**{v}**" if t.get("best_strategy") == s["name"] else v)
        c = s["cost"]
        lines.append(f"| {s['name']} | " + " | ".join(cells) + f" | {_signed_pct(s['delta_m'])} | "
                     f"{'yes' if s['pareto'] else ''} | {_num(c['phase1_seconds'], 1)} | "
                     f"{_num(c['steps_per_second'], 1)} |")
    if r.get("single_task"):
        lines.append("| single-task | " + " | ".join(_num(t["single_task"]) for t in tasks) + " | 0 (reference) | "
                     f"{'yes' if r['single_task']['on_pareto_front'] else ''} | | |")
    lines += ["", f"Best per task in bold. {r['definitions']['delta_m']}.", ""]
    lines.append("Pareto front: " + ", ".join(r["pareto_front"]))
    if r["ranking_by_delta_m"]:
        lines.append("Ranking by Δm: " + " > ".join(r["ranking_by_delta_m"]))
    if r.get("single_task"):
        lines += ["", "## TCI per task (validation loss, joint vs alone; negative = conflict)", "",
                  "| strategy | " + " | ".join(t["name"] for t in tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
        for s in r["strategies"]:
            by = {row["task"]: row["tci"] for row in s["tci"]}
            lines.append(f"| {s['name']} | " + " | ".join(f"{by[t['name']]:+.3f}" if _finite(by.get(t["name"]))
                                                          else "-" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;
color:#1d2430;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #dde1e8;padding:4px 8px;text-align:right}th{background:#f4f6f9}
td.l,th.l{text-align:left}.best{font-weight:700;background:#e6f0fb}.pos{color:#1b5e20}.neg{color:#b71c1c}
.muted{color:#667}.note{background:#f7f7fa;border-left:3px solid #9aa;padding:6px 10px;margin:8px 0}
code{background:#f2f3f6;padding:1px 4px}.chart text.t{font-weight:600;font-size:13px}.chart text.l{font-size:12px}
"""


def _dm_chart(r: dict[str, Any]) -> str:
    rows = [(s["name"], s["delta_m"]) for s in r["strategies"]]
    vals = [abs(v) for _, v in rows if _finite(v)]
    vm = max(vals) if vals and max(vals) > 0 else 1.0
    left, bar_h, gap, top, width = 130, 16, 6, 28, 620
    half = (width - left - 80) / 2
    zero = left + half
    height = top + len(rows) * (bar_h + gap) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" aria-label="delta-m per strategy" '
           f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
           f'<text x="{left}" y="16" class="t">Δm % vs single-task (right = better than alone)</text>']
    for k, (name, v) in enumerate(rows):
        y = top + k * (bar_h + gap)
        out.append(f'<text x="{left - 6}" y="{y + bar_h - 4}" class="l" text-anchor="end">{escape(name)}</text>')
        if _finite(v):
            w = half * abs(v) / vm
            x = zero if v >= 0 else zero - w
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                       f'fill="{"#2e7d32" if v >= 0 else "#c62828"}"/>')
            out.append(f'<text x="{zero + half + 8:.1f}" y="{y + bar_h - 4}" class="l">{v:+.2f}%</text>')
    out.append(f'<line x1="{zero:.1f}" x2="{zero:.1f}" y1="{top - 4}" y2="{height - 4}" stroke="#333"/>')
    out.append("</svg>")
    return "".join(out)


def render_html(r: dict[str, Any]) -> str:
    tasks = r["tasks"]
    w = ['<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Strategy comparison</title>',
         f"<style>{_CSS}</style></head><body><h1>Strategy comparison</h1>"]
    if r.get("command"):
        w.append(f'<p class="muted">Made by <code>{escape(r["command"])}</code></p>')
    w.append("<h2>Per-task validation metrics (Phase 2 checkpoints)</h2><table><tr><th class=l>strategy</th>")
    w += [f"<th>{escape(t['name'])}<br><span class=muted>{escape(t['metric'])} "
          f"{'↑' if t['higher_is_better'] else '↓'}</span></th>" for t in tasks]
    w.append("<th>Δm %</th><th>Pareto</th></tr>")
    for s in r["strategies"]:
        w.append(f"<tr><td class=l>{escape(s['name'])}</td>")
        for t in tasks:
            v = s["metrics"][t["name"]]
            base = t.get("single_task")
            cls = "best" if t.get("best_strategy") == s["name"] else ""
            if _finite(v) and _finite(base):
                good = v > base if t["higher_is_better"] else v < base
                cls += " pos" if good else " neg"
            w.append(f'<td class="{cls.strip()}">{_num(v)}</td>')
        dm = s["delta_m"]
        w.append(f'<td class="{"pos" if _finite(dm) and dm >= 0 else "neg"}">{_signed_pct(dm)}</td>'
                 f"<td>{'●' if s['pareto'] else ''}</td></tr>")
    if r.get("single_task"):
        w.append("<tr><td class=l><i>single-task</i></td>" + "".join(f"<td>{_num(t['single_task'])}</td>"
                                                                    for t in tasks)
                 + f"<td>reference</td><td>{'●' if r['single_task']['on_pareto_front'] else ''}</td></tr>")
    w.append("</table><p class=muted>Bold: best strategy on the task. Green / red: better / worse than the "
             "task trained alone.</p>")
    if any(_finite(s["delta_m"]) for s in r["strategies"]):
        w.append(_dm_chart(r))
    w.append(f'<div class="note">{escape(r["definitions"]["delta_m"])}</div>')
    w.append("<h2>Pareto front</h2><p>" + ", ".join(f"<b>{escape(n)}</b>" for n in r["pareto_front"])
             + f'</p><p class="muted">{escape(r["definitions"]["pareto"])}</p>')
    w.append("<h2>Training cost</h2><table><tr><th class=l>strategy</th><th>phase-1 s</th><th>epochs</th>"
             "<th>steps</th><th>steps/s</th><th>wall s (both phases)</th></tr>")
    for s in r["strategies"]:
        c = s["cost"]
        w.append(f"<tr><td class=l>{escape(s['name'])}</td><td>{_num(c['phase1_seconds'], 1)}</td>"
                 f"<td>{c['phase1_epochs']}</td><td>{c['phase1_steps']}</td><td>{_num(c['steps_per_second'], 1)}</td>"
                 f"<td>{_num(c['wall_seconds'], 1)}</td></tr>")
    w.append(f'</table><p class="muted">{escape(r["definitions"]["cost"])}</p>')
    if r.get("single_task"):
        w.append("<h2>TCI per task</h2><table><tr><th class=l>strategy</th>"
                 + "".join(f"<th>{escape(t['name'])}</th>" for t in tasks) + "</tr>")
        for s in r["strategies"]:
            by = {row["task"]: row["tci"] for row in s["tci"]}
            w.append(f"<tr><td class=l>{escape(s['name'])}</td>")
            for t in tasks:
                v = by.get(t["name"])
                w.append(f'<td class="{"neg" if _finite(v) and v < 0 else "pos"}">'
                         f'{f"{v:+.3f}" if _finite(v) else "-"}</td>')
            w.append("</tr>")
        w.append(f'</table><div class="note">{escape(r["definitions"]["tci"])}</div>')
    w.append("<h2>Negative-transfer pairs (affinity below the threshold)</h2><table>"
             "<tr><th class=l>strategy</th><th class=l>pairs</th></tr>")
    for s in r["strategies"]:
        w.append(f"<tr><td class=l>{escape(s['name'])}</td><td class=l>"
                 f"{escape(', '.join(s['negative_transfer_pairs']) or 'none')}</td></tr>")
    w.append("</table></body></html>\n")
    return "".join(w)
