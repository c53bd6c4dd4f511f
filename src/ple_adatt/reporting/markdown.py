"""``report.md``: the short summary the KFP UI shows (an ``Output[Markdown]`` artifact)."""

from __future__ import annotations

from typing import Any


def _f(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def render_markdown(r: dict[str, Any], max_rows: int = 8) -> str:
    s, run = r["summary"], r["run"]
    misplaced = ", ".join(f"{m['task']} ({m['group']} -> {m['closer_to']})" for m in s["misplaced_tasks"])
    weak = ", ".join(f"{m['task']} ({m['group']} -> {m['closer_to']})" for m in s.get("weakly_closer_tasks") or [])
    nt = r["negative_transfer"]
    lines = [
        "# Task affinity and negative-transfer report",
        "",
        f"{s['tasks']} tasks, strategy `{run['strategy']}`, Phase 1 {_f(run['phase1']['epochs'])} epochs, "
        f"Phase 2 {_f(run['phase2']['epochs'])} epochs. Full report: `report.html`; every number: `report.json`.",
        "",
        "| | |",
        "| --- | --- |",
        f"| group agreement (0.5 none, 1 perfect) | {_f(s['agreement_score'], 2)} |",
        f"| groups the data supports | {', '.join(s['groups_supported']) or 'none'} |",
        f"| groups supported only weakly | {', '.join(s['groups_weak']) or 'none'} |",
        f"| groups not supported | {', '.join(s['groups_not_supported']) or 'none'} |",
        f"| tasks closer to another group (beyond noise) | {misplaced or 'none'} |",
        f"| weakly closer to another group (within noise) | {weak or 'none'} |",
        f"| blocked pairs (affinity < {nt['threshold']:g}) | {s['blocked_pairs']} |",
        f"| pairs in gradient conflict (GCD > 1) | {s['conflicting_pairs']} of {s['measured_pairs']} |",
        f"| loss share from transfer (last adaTT epoch) | {_pct(s['transfer_share_last_epoch'])} |",
        f"| weighted val loss Phase 1 -> Phase 2 | {_f(s['val_loss_phase1'], 4)} -> {_f(s['val_loss_phase2'], 4)} |",
    ]
    if s["tci_conflicts"] is not None:
        lines.append(f"| tasks with TCI < 0 (worse jointly) | {', '.join(s['tci_conflicts']) or 'none'} |")
    if nt["blocked"]:
        lines += ["", "## Blocked pairs", "", "| pair | affinity | below since | epochs below |",
                  "| --- | ---: | --- | ---: |"]
        for p in nt["blocked"][:max_rows]:
            since = p.get("since")
            since_s = f"{since['phase']} epoch {since['epoch_1based']}" if since else "n/a"
            lines.append(f"| {p['a']} / {p['b']} | {p['affinity']:.3f} | {since_s} | {_f(p.get('epochs_below'))} |")
        if len(nt["blocked"]) > max_rows:
            lines.append(f"| ... {len(nt['blocked']) - max_rows} more | | | |")
    moves = r["regrouping"]["moves"]
    if moves and r["regrouping"]["recommended"]:
        lines += ["", "Suggested regrouping (clustering of the affinity): "
                  + ", ".join(f"{m['task']}: {m['from']} -> {m['to']}" for m in moves) + "."]
    lines += ["", "## Validation metrics", "", "| task | metric | Phase 1 | Phase 2 | change |",
              "| --- | --- | ---: | ---: | ---: |"]
    for t in r["metrics"]["tasks"]:
        d = "n/a" if t["delta"] is None else f"{t['delta']:+.4f}" + (" ✓" if t["improved"] else "")
        lines.append(f"| {t['task']} | {t['metric']} | {_f(t['phase1'], 4)} | {_f(t['phase2'], 4)} | {d} |")
    lines += ["", "GCD and TCI are this project's definitions following the MoCoGrad notes.", ""]
    for w in r["warnings"]:
        lines.append(f"> note: {w}")
    return "\n".join(lines).rstrip() + "\n"
