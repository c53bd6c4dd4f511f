"""``report.html``: one self-contained page (inline CSS and SVG, no script, no fetch).

Rendered only from the report dict (``report.json``), so every number on the page is in
the JSON. Sections: summary, affinity and groups, transfer, negative transfer,
trajectories, conflict measures (GCD, TCI), validation metrics, target availability.
"""

from __future__ import annotations

from html import escape
from typing import Any

from . import svg

CSS = """
body{font:14px/1.45 -apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1d2430;background:#fff}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:23px;margin:0 0 4px}h2{font-size:18px;margin:34px 0 8px;border-bottom:1px solid #dde2ea;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px}th,td{padding:3px 8px;border-bottom:1px solid #eef0f4;text-align:left;vertical-align:top}
th{background:#f5f7fa;font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{border:1px solid #dde2ea;border-radius:6px;padding:8px 12px;min-width:150px}
.card b{display:block;font-size:20px}.card span{color:#6b7280;font-size:12px}
.badge{display:inline-block;padding:0 7px;border-radius:9px;font-size:12px;font-weight:600;color:#fff}
.ok{background:#2e7d32}.bad{background:#c62828}.warn{background:#ef6c00}.off{background:#6b7280}
.up{color:#2e7d32}.down{color:#c62828}.muted{color:#6b7280}.small{font-size:12px}
.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.chart .t{font-size:13px;font-weight:600;fill:#1d2430}.chart .l{font-size:11px;fill:#3c4654}
.chart .v{font-size:8.5px}
nav a{margin-right:12px;color:#1565c0;text-decoration:none}
.note{background:#f5f7fa;border-left:3px solid #9aa3ae;padding:6px 10px;margin:8px 0;font-size:13px}
.scroll{overflow-x:auto}
"""

TABLE_ROWS = 30  # longer pair tables are cut here (report.json has every row)

EVENT_LABELS = {
    "adatt_freeze_epoch": "adaTT freeze",
    "cgc_frozen_epoch": "CGC freeze",
    "phase2_start": "Phase 2 start",
    "early_stop": "early stop",
}



def _short_commit(commit: object) -> str:
    """The first 12 hex digits, keeping a ``-dirty`` suffix (a build from a modified tree)."""
    if not commit:
        return "n/a"
    sha, dirty, _ = str(commit).partition("-dirty")
    return sha[:12] + ("-dirty" if dirty else "")

def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return '<span class="muted">n/a</span>'
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return escape(str(x))


def _pct(x: Any, nd: int = 1) -> str:
    return '<span class="muted">n/a</span>' if x is None else f"{100 * x:.{nd}f}%"


def _signed(x: Any, good: bool | None, nd: int = 4) -> str:
    if x is None:
        return '<span class="muted">n/a</span>'
    if abs(x) < 0.5 * 10 ** -nd:
        return f'<span class="muted">&plusmn;{0:.{nd}f}</span>'
    cls = "" if good is None else ("up" if good else "down")
    return f'<span class="{cls}">{x:+.{nd}f}</span>'


def _badge(text: str, cls: str) -> str:
    return f'<span class="badge {cls}">{escape(text)}</span>'


def _offdiag_scale(matrix: list[list[Any]]) -> float:
    """Colour scale of an affinity-like matrix: its largest off-diagonal magnitude (at least 0.05),
    so weak structure stays visible; the diagonal saturates."""
    vals = [abs(v) for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j and v is not None]
    return min(1.0, max([0.05] + vals))


def _reorder(matrix: list[list[Any]], idx: list[int]) -> list[list[Any]]:
    return [[matrix[i][j] for j in idx] for i in idx]


def _epn(d: dict[str, Any]) -> str:
    """The epoch number people see: 1-based, as the training console prints it (report.json's
    ``epoch`` is the manifest's 0-based index, ``epoch_1based`` this number)."""
    return escape(str(d.get("epoch_1based", "n/a")))


def _ep(d: dict[str, Any] | None) -> str:
    if not d:
        return '<span class="muted">n/a</span>'
    return f"{escape(str(d['phase']))} epoch {_epn(d)} (step {d['step']})"


def render_html(r: dict[str, Any]) -> str:
    run, s = r["run"], r["summary"]
    tasks, order = run["tasks"], run["order"]
    idx = [tasks.index(t) for t in order]
    pos = {t: k for k, t in enumerate(order)}
    group_boxes = [(g["name"], pos[g["members"][0]], pos[g["members"][0]] + len(g["members"]))
                   for g in r["affinity"]["groups"] if g["name"] != "(ungrouped)"]
    out: list[str] = []
    w = out.append
    w('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
      '<meta name="viewport" content="width=device-width, initial-scale=1">'
      f"<title>Task affinity report: {escape(str(len(tasks)))} tasks</title><style>{CSS}</style></head><body><main>")
    w("<h1>Task affinity and negative-transfer report</h1>")
    p1, p2 = run["phase1"], run["phase2"]
    w(f'<p class="muted small">strategy <b>{escape(run["strategy"])}</b> &middot; {len(tasks)} tasks &middot; '
      f"Phase 1: {escape(p1['path'])} ({_f(p1['epochs'])} epochs, {escape(str(p1['created']))}) &middot; "
      f"Phase 2: {escape(p2['path'])} ({_f(p2['epochs'])} epochs) &middot; validation: "
      f"{escape(run['validation']['path'])} &middot; commit {escape(_short_commit(p1.get('git_commit')))}</p>")
    w('<nav class="small"><a href="#affinity">Affinity &amp; groups</a><a href="#transfer">Transfer</a>'
      '<a href="#negative">Negative transfer</a><a href="#trajectories">Trajectories</a>'
      '<a href="#conflict">GCD / TCI</a><a href="#metrics">Validation metrics</a>'
      '<a href="#availability">Availability</a></nav>')
    vl1, vl2 = s["val_loss_phase1"], s["val_loss_phase2"]
    cards = [
        (_f(s["agreement_score"], 2), "group agreement (0.5 = none, 1 = perfect)"),
        (f"{len(s['groups_supported'])} / {s['groups']}", "configured groups the data supports"
         + (f" ({len(s['groups_weak'])} weakly)" if s["groups_weak"] else "")),
        (str(len(s["misplaced_tasks"])), "tasks closer to another group (beyond noise)"
         + (f"; {len(s['weakly_closer_tasks'])} more weakly, within noise" if s.get("weakly_closer_tasks") else "")),
        (str(s["blocked_pairs"]), f"blocked pairs (affinity &lt; {r['negative_transfer']['threshold']:g})"),
        (f"{s['conflicting_pairs']} / {s['measured_pairs']}", "pairs in gradient conflict (GCD &gt; 1)"),
        (_pct(s["transfer_share_last_epoch"]), "of the loss from transfer (last adaTT epoch)"),
        (f"{_f(vl1)} &rarr; {_f(vl2)}", "weighted val loss, Phase 1 &rarr; Phase 2"),
    ]
    if s["tci_conflicts"] is not None:
        cards.append((str(len(s["tci_conflicts"])), "tasks with TCI &lt; 0 (worse jointly than alone)"))
    w('<div class="cards">' + "".join(f"<div class=\"card\"><b>{v}</b><span>{lab}</span></div>"
                                     for v, lab in cards) + "</div>")
    if r["warnings"]:
        w('<div class="note"><b>Notes</b><ul>' + "".join(f"<li>{escape(m)}</li>" for m in r["warnings"])
          + "</ul></div>")

    _affinity(w, r, order, idx, group_boxes)
    _transfer(w, r, order, idx, group_boxes)
    _negative(w, r)
    _trajectories(w, r)
    _conflict(w, r, order, idx, group_boxes)
    _metrics(w, r)
    _availability(w, r)
    w(f'<p class="muted small">report schema {r["schema_version"]} &middot; every number on this page is in '
      "report.json &middot; self-contained: no script, font or image is fetched.</p>")
    w("</main></body></html>")
    return "".join(out)


def _affinity(w: Any, r: dict[str, Any], order: list[str], idx: list[int], boxes: list[Any]) -> None:
    aff, agree, reg = r["affinity"], r["agreement"], r["regrouping"]
    tasks = r["run"]["tasks"]
    thr = r["negative_transfer"]["threshold"]
    pos = {t: k for k, t in enumerate(order)}
    marked = {(pos[p["a"]], pos[p["b"]]) for p in r["negative_transfer"]["blocked"]}
    marked |= {(j, i) for i, j in marked}
    w('<h2 id="affinity">Learned affinity and the group prior</h2>')
    w(f'<p>Left: adaTT\'s EMA gradient-cosine affinity at the end of training ({aff["update_count"]} updates), '
      "tasks ordered by configured group (boxes). Dashed cells are blocked pairs "
      f"(affinity &lt; {thr:g}). Right: the group prior adaTT blends in (row-normalised).</p>")
    ema = _reorder(aff["ema"], idx)
    vmax = _offdiag_scale(ema)
    w('<div class="row scroll">')
    w(svg.heatmap(ema, order, title=f"EMA affinity (what adaTT uses; colour scale ±{vmax:.2f})", vmax=vmax,
                  groups=boxes, marked=marked))
    w(svg.heatmap(_reorder(r["prior"]["matrix"], idx), order, title="Group prior", scale="sequential",
                  groups=boxes, show_labels=False, cell=22))
    w("</div>")
    diag = aff["diagonal"]
    if min(diag) < 0.9995:
        w(f'<div class="note">The diagonal of the EMA buffer is {_f(min(diag))}&ndash;{_f(max(diag))}, not 1: it is '
          "the EMA mass of the updates in which a task had a gradient (a zero observation, e.g. the first step of "
          "a model whose heads start at zero, adds 0), and the off-diagonal values are damped alike. Structure is "
          "therefore read from the <b>cosine form</b> A<sub>ij</sub>/&radic;(A<sub>ii</sub>A<sub>jj</sub>) (unit "
          "diagonal), the mean gradient cosine; blocking uses the raw buffer, as adaTT does.</div>")
    else:
        w('<p class="small muted">The EMA has converged (diagonal 1), so the buffer equals its cosine form, '
          "which the grouping analysis and GCD use.</p>")
    w("<h3>Do the configured groups match the data?</h3>")
    w(f"<p>Agreement score <b>{_f(agree['score'], 3)}</b>: the probability that a within-group pair is more affine "
      f"than a cross-group pair ({agree['pairs_within']} within, {agree['pairs_cross']} cross pairs; mean "
      f"{_f(agree['within_mean'])} vs {_f(agree['cross_mean'])}). Rank correlation with the prior: "
      f"{_f(agree['spearman'])}. Mean silhouette of the configured groups: {_f(agree['silhouette'])}.</p>")
    w('<table><tr><th>group</th><th>members</th><th class="n">within</th><th class="n">to others</th>'
      '<th class="n">margin</th><th class="n">score</th><th class="n">silhouette</th><th>verdict</th></tr>')
    badge = {"supported": "ok", "weak": "warn", "not supported": "bad", "single task": "off"}
    for g in agree["groups"]:
        verdict = _badge(g["verdict"], badge[g["verdict"]])
        w(f"<tr><td><b>{escape(g['name'])}</b></td><td>{escape(', '.join(g['members']))}</td>"
          f'<td class="n">{_f(g["within_mean"])}</td><td class="n">{_f(g["cross_mean"])}</td>'
          f'<td class="n">{_f(g["margin"])}</td><td class="n">{_f(g["score"], 2)}</td>'
          f'<td class="n">{_f(g["silhouette"], 2)}</td><td>{verdict}</td></tr>')
    w("</table>")
    w('<p class="small">A group is <i>supported</i> when its members are more affine to each other than to the '
      "other tasks (margin &gt; 0) for most pairs (score &ge; 0.6), <i>weak</i> when only on average. A task is "
      "flagged <i>wrong group?</i> only when its mean affinity to another group exceeds that to its own by more "
      f"than {agree.get('misplaced_z', 2.5):g}&times; the noise of that difference (noise = sd &times; "
      "&radic;(1/n<sub>own</sub> + 1/n<sub>other</sub>), sd the spread of the cross-group pairs not involving "
      "the task); a smaller positive gap is <i>weakly closer (within noise)</i>. Sorted: flagged first, by how "
      "much closer, then within noise.</p>")
    w('<table><tr><th>task</th><th>group</th><th class="n">mean affinity to own group</th>'
      '<th>closest other group</th><th class="n">its mean</th><th class="n">closer by</th>'
      '<th class="n">noise limit</th><th class="n">silhouette</th><th></th></tr>')

    def rank(x: dict[str, Any]) -> tuple[int, float]:
        if x["misplaced"]:
            return 0, -(x["gap"] or 0)
        return (1, -(x["gap"] or 0)) if x.get("weakly_closer") else (2, pos[x["task"]])

    for t in sorted(agree["tasks"], key=rank):
        closer = t["misplaced"] or t.get("weakly_closer")
        flag = (_badge("wrong group?", "warn") if t["misplaced"] else
                _badge("weakly closer (within noise)", "off") if t.get("weakly_closer") else "")
        w(f"<tr><td>{escape(t['task'])}</td><td>{escape(str(t['group']))}</td><td class=\"n\">{_f(t['own_mean'])}</td>"
          f"<td>{escape(str(t['best_other_group'] or '-'))}</td><td class=\"n\">{_f(t['best_other_mean'])}</td>"
          f'<td class="n">{_f(t["gap"]) if closer else ""}</td>'
          f'<td class="n">{_f(t.get("min_gap")) if closer else ""}</td>'
          f'<td class="n">{_f(t["silhouette"], 2)}</td><td>{flag}</td></tr>')
    w("</table>")
    w(f"<h3>Suggested regrouping (average-linkage clustering of 1 &minus; cosine affinity, k = {reg['k']})</h3>")
    if reg["groups"]:
        w("<table><tr><th>suggested group</th><th>members</th></tr>")
        for g in reg["groups"]:
            w(f"<tr><td><b>{escape(g['name'])}</b></td><td>{escape(', '.join(g['members']))}</td></tr>")
        w("</table>")
        moves = ", ".join(f"{escape(m['task'])}: {escape(str(m['from']))} &rarr; {escape(m['to'])}"
                          for m in reg["moves"])
        w(f"<p>Moves: {moves or 'none (the clustering reproduces the configured groups)'}. Mean silhouette "
          f"configured {_f(reg['silhouette_configured'])} vs suggested {_f(reg['silhouette_suggested'])}: "
          f"<b>{escape(reg['structure'])}</b> cluster structure.</p>")
        if reg["recommended"]:
            w(f"<p>{_badge('regrouping suggested', 'warn')} the suggested groups fit the affinity better than the "
              "configured ones. Check it over seeds before editing <code>transfer.task_groups</code>.</p>")
        else:
            w(f"<p>{_badge('keep the configured groups', 'off')} the affinity has no cluster structure clear "
              "enough (mean silhouette &le; 0.25, or not better than the configured groups) to recommend a "
              "change from this run.</p>")
    else:
        w('<p class="muted">Not enough measured tasks to cluster.</p>')
    del tasks


def _transfer(w: Any, r: dict[str, Any], order: list[str], idx: list[int], boxes: list[Any]) -> None:
    tr = r["transfer"]
    st = r["settings"]
    w('<h2 id="transfer">Transfer weights and how much loss came from transfer</h2>')
    if not tr["available"]:
        w(f'<p class="muted">Strategy {escape(r["run"]["strategy"])} transfers nothing.</p>')
        return
    w(f"<p>The transfer matrix adaTT applies (<code>get_transfer_matrix</code>, every task present): row = receiving "
      f"task, column = source; loss<sub>i</sub> += &lambda;&middot;&Sigma;<sub>j</sub> w<sub>ij</sub>L<sub>j</sub> "
      f"with &lambda; = {st['transfer_lambda']:g}, capped at {st['max_transfer_ratio']:g}&middot;L<sub>i</sub>. "
      "Blocked pairs have weight 0. Right: the share of each task's (transfer-enhanced) training loss that came "
      "from transfer in the last adaTT epoch.</p>")
    tm = _reorder(tr["matrix"], idx)
    off = [v for i, row in enumerate(tm) for j, v in enumerate(row) if v is not None and i != j and v > 0]
    vmax = max(off, default=1.0) or 1.0
    vmin = min(off, default=0.0) * 0.9
    per = {p["task"]: p for p in tr["per_task"]}
    w('<div class="row scroll">')
    w(svg.heatmap(tm, order, title="Transfer weights w_ij (row receives from column)", scale="sequential",
                  vmax=vmax, vmin=vmin, groups=boxes, fmt="{:.3f}" if vmax - vmin < 0.05 else "{:.2f}"))
    cap = tr["share_cap"]
    w(svg.hbars([(t, per[t]["last"]) for t in order], title="Share of loss from transfer (last adaTT epoch)",
                vmax=max([cap or 0.0] + [per[t]["last"] or 0.0 for t in order]) or 1.0,
                marker=(cap, f"cap {cap:.1%}") if cap else None))
    w("</div>")
    at_cap = [t for t in order if per[t]["at_cap"]]
    if cap and at_cap:
        w(f'<p class="small">Dashed line: the cap. transfer &le; {st["max_transfer_ratio"]:g}&middot;L<sub>i</sub> '
          f"means at most {cap:.1%} of a task's enhanced loss comes from transfer; {len(at_cap)} task(s) sit at "
          f"the cap ({escape(', '.join(at_cap))}): their partners' losses are large next to their own.</p>")
    w('<table><tr><th>task</th><th class="n">share, last epoch</th><th class="n">mean</th><th class="n">max</th>'
      "<th>at cap</th><th>largest sources (weight)</th></tr>")
    for t in order:
        p = per[t]
        src = ", ".join(f"{escape(x['task'])} ({x['weight']:.3f})" for x in p["top_sources"]) or "-"
        w(f"<tr><td>{escape(t)}</td><td class=\"n\">{_pct(p['last'])}</td><td class=\"n\">{_pct(p['mean'])}</td>"
          f'<td class="n">{_pct(p["max"])}</td><td>{_f(p["at_cap"])}</td><td>{src}</td></tr>')
    w("</table>")
    if st["loss_weights"] is None:
        w('<p class="muted small">Uncertainty weighting: per-task shares are not recoverable from the history '
          "(the weights moved during training); the totals below are.</p>")
    w('<table><tr><th>phase</th><th class="n">epoch</th><th>transfer</th><th class="n">share of total loss</th></tr>')
    kinds = {(e["phase"], e["epoch"]): e["kind"] for e in r["trajectories"]["timeline"]["epochs"]}
    for e in tr["epochs"]:
        w(f"<tr><td>{escape(str(e['phase']))}</td><td class=\"n\">{_epn(e)}</td>"
          f"<td>{escape(kinds.get((e['phase'], e['epoch']), str(e['transfer_phase'])))}</td>"
          f'<td class="n">{_pct(e["total"])}</td></tr>')
    w("</table>")


def _negative(w: Any, r: dict[str, Any]) -> None:
    nt = r["negative_transfer"]
    w('<h2 id="negative">Negative transfer</h2>')
    verb = "blocked" if nt["blocking"] else "below the threshold (this strategy does not block)"
    w(f"<p>Pairs whose EMA affinity is below {nt['threshold']:g} at the end of training are {verb}: neither "
      "task transfers loss to the other. <i>Since</i> is the first epoch-end snapshot of the pair's final run "
      "below the threshold; the affinity history has one snapshot per epoch, so durations are in epochs (and at "
      "most the steps between the snapshots).</p>")
    if nt["blocked"]:
        w('<table><tr><th>pair</th><th class="n">affinity</th><th class="n">cosine</th><th>below since</th>'
          '<th class="n">epochs below</th><th class="n">steps (at most)</th><th class="n">lowest</th>'
          "<th>first below</th></tr>")
        for p in nt["blocked"][:TABLE_ROWS]:
            w(f"<tr><td>{escape(p['a'])} &harr; {escape(p['b'])}</td><td class=\"n\">{_f(p['affinity'])}</td>"
              f"<td class=\"n\">{_f(p['cosine'])}</td><td>{_ep(p.get('since'))}</td>"
              f"<td class=\"n\">{_f(p.get('epochs_below'))}</td><td class=\"n\">{_f(p.get('steps_below_at_most'))}</td>"
              f"<td class=\"n\">{_f(p['min_affinity'])}</td><td>{_ep(p.get('first_below'))}</td></tr>")
        _more(w, len(nt["blocked"]), TABLE_ROWS, 8)
        w("</table>")
    else:
        w(f"<p>{_badge('none', 'ok')} no pair is {verb.split(' (')[0]} at the end of training.</p>")
    if nt["recovered"]:
        w("<h3>Below the threshold earlier, recovered by the end</h3>")
        w('<table><tr><th>pair</th><th class="n">final affinity</th><th class="n">lowest</th>'
          '<th class="n">epochs below</th><th>first below</th></tr>')
        for p in nt["recovered"][:TABLE_ROWS // 2]:
            w(f"<tr><td>{escape(p['a'])} &harr; {escape(p['b'])}</td><td class=\"n\">{_f(p['affinity'])}</td>"
              f"<td class=\"n\">{_f(p['min_affinity'])}</td><td class=\"n\">{p['epochs_ever_below']}</td>"
              f"<td>{_ep(p.get('first_below'))}</td></tr>")
        _more(w, len(nt["recovered"]), TABLE_ROWS // 2, 5)
        w("</table>")


def _more(w: Any, total: int, shown: int, cols: int) -> None:
    if total > shown:
        w(f'<tr><td colspan="{cols}" class="muted">... {total - shown} more in report.json</td></tr>')


def _trajectories(w: Any, r: dict[str, Any]) -> None:
    tj = r["trajectories"]
    tl = tj["timeline"]
    w('<h2 id="trajectories">Affinity over training</h2>')
    w("<p>The pairs whose EMA affinity moved most (max &minus; min over the epoch-end snapshots), plus blocked "
      "pairs; shaded: the transfer schedule (warmup &rarr; dynamic &rarr; frozen, then Phase 2 where adaTT is "
      "off and the affinity no longer changes); dotted lines: adaTT freeze, CGC freeze, Phase 2 start, early "
      "stop.</p>")
    if not tj["pairs"]:
        w('<p class="muted">No affinity snapshots in the history.</p>')
        return
    xs = [sn["x"] for sn in tj["snapshots"]]
    series = [{"label": f"{p['a']}–{p['b']}", "values": p["values"]} for p in tj["pairs"]]
    events = [{"x": e["x"], "label": EVENT_LABELS.get(e["event"], e["event"])} for e in tl["events"]]
    thr = r["negative_transfer"]["threshold"]
    w('<div class="scroll">')
    w(svg.line_chart(xs, series, title="EMA affinity of the most changing pairs", bands=tl["bands"], events=events,
                     hline=(thr, f"blocking threshold {thr:g}"), x_max=tl["x_max"], y_label="affinity"))
    w("</div>")
    head = "".join(f'<th class="n">{escape(sn["phase"])} e{_epn(sn)}</th>' for sn in tj["snapshots"])
    w(f'<div class="scroll"><table><tr><th>pair</th><th>why</th>{head}<th class="n">range</th></tr>')
    for p in tj["pairs"]:
        cells = "".join(f'<td class="n">{_f(v)}</td>' for v in p["values"])
        w(f"<tr><td>{escape(p['a'])} &harr; {escape(p['b'])}</td><td>{escape(p['reason'])}</td>{cells}"
          f'<td class="n">{_f(p["range"])}</td></tr>')
    w("</table></div>")
    ev = ", ".join(f"{escape(EVENT_LABELS.get(e['event'], e['event']))} ({escape(e['phase'])} epoch {_epn(e)})"
                   for e in tl["events"])
    w(f'<p class="small">Events: {ev or "none"}. Epochs are numbered from 1 as the training console prints '
      "them; a snapshot (column) is taken at the end of its epoch, and the x axis counts epochs completed.</p>")


def _conflict(w: Any, r: dict[str, Any], order: list[str], idx: list[int], boxes: list[Any]) -> None:
    g = r["gcd"]
    w('<h2 id="conflict">Conflict measures: GCD and TCI</h2>')
    w(f'<div class="note"><b>GCD</b>: {escape(g["definition"])}</div>')
    w('<div class="row scroll">')
    w(_gcd_heatmap(g["matrix"], idx, order, boxes))
    conflicts = [p for p in g["pairs"] if p["conflict"]]
    rows = conflicts[:12] if conflicts else g["pairs"][:5]
    cap = "Conflicting pairs (GCD &gt; 1)" if conflicts else "No pair in conflict; the highest GCD"
    tbl = [f"<div><h3>{cap}</h3>",
           '<table><tr><th>pair</th><th class="n">cos</th><th class="n">GCD</th></tr>']
    tbl += [f"<tr><td>{escape(p['a'])} &harr; {escape(p['b'])}</td><td class=\"n\">{_f(p['cos'])}</td>"
            f'<td class="n">{_f(p["gcd"])}</td></tr>' for p in rows]
    if len(conflicts) > len(rows):
        tbl.append(f'<tr><td colspan="3" class="muted">... {len(conflicts) - len(rows)} more in report.json</td></tr>')
    tbl.append("</table></div>")
    w("".join(tbl))
    w("</div>")
    tci = r["tci"]
    w("<h3>TCI: task conflict intensity</h3>")
    if tci is None:
        w('<p class="muted">No single-task baselines given. Pass <code>--baselines</code> (a JSON of per-task '
          "validation losses trained alone, or a directory of single-task checkpoints; see docs/report.md) to "
          "see TCI.</p>")
        return
    w(f'<div class="note"><b>TCI</b>: {escape(tci["definition"])}</div>')
    w('<table><tr><th>task</th><th>phase</th><th class="n">val loss alone</th><th class="n">val loss jointly</th>'
      '<th class="n">TCI</th><th></th></tr>')
    for t in tci["tasks"]:
        flag = _badge("conflict", "bad") if t["conflict"] else (_badge("helped", "ok") if t["conflict"] is False
                                                                 else "")
        w(f"<tr><td>{escape(t['task'])}</td><td>{escape(t['phase'])}</td><td class=\"n\">{_f(t['alone_loss'], 4)}</td>"
          f"<td class=\"n\">{_f(t['joint_loss'], 4)}</td><td class=\"n\">{_signed(t['tci'], None if t['tci'] is None else t['tci'] >= 0, 3)}</td>"
          f"<td>{flag}</td></tr>")
    w("</table>")
    w(f'<p class="muted small">Baselines from: {escape(", ".join(tci["sources"]))}</p>')
    checked = sorted({k for per in (tci.get("checked") or {}).values() for keys in per.values() for k in keys})
    n_checked = sum(len(per) for per in (tci.get("checked") or {}).values())
    if checked:
        w(f'<p class="small">Checked equal to the joint run for {n_checked} of {len(tci["tasks"])} baseline(s): '
          f"{escape(', '.join(checked))}.</p>")
    if tci.get("warnings"):
        w('<div class="note"><b>Baselines</b><ul>' + "".join(f"<li>{escape(m)}</li>" for m in tci["warnings"])
          + "</ul></div>")


def _gcd_heatmap(matrix: list[list[Any]], idx: list[int], order: list[str], boxes: list[Any]) -> str:
    """Cells show GCD; the colour is centred at the conflict boundary GCD = 1 (red above)."""
    gcd = _reorder(matrix, idx)
    cos = [[None if v is None else 1.0 - v for v in row] for row in gcd]
    vm = _offdiag_scale(cos)
    return svg.heatmap(gcd, order, title="GCD = 1 − cos; red cells: GCD > 1 (conflict)", vmax=vm,
                       groups=boxes, cell=24, colour_by=cos,
                       legend_ends=(f"GCD {1 + vm:.2f} (conflict)", f"GCD {1 - vm:.2f} (aligned)"))


def _metrics(w: Any, r: dict[str, Any]) -> None:
    m = r["metrics"]
    w('<h2 id="metrics">Validation metrics after Phase 1 and Phase 2</h2>')
    w("<p>Each task's primary metric (AUC, accuracy, RMSE, recall@10) on the validation split: Phase 1 with the "
      "global heads, Phase 2 with the fine-tuned cluster heads. Green: better after Phase 2.</p>")
    w('<table><tr><th>task</th><th>metric</th><th class="n">n</th><th class="n">Phase 1</th>'
      '<th class="n">Phase 2</th><th class="n">change</th><th class="n">val loss P1</th>'
      '<th class="n">val loss P2</th></tr>')
    for t in m["tasks"]:
        arrow = "" if t["higher_is_better"] else ' <span class="muted small">(lower is better)</span>'
        w(f"<tr><td>{escape(t['task'])}</td><td>{escape(t['metric'])}{arrow}</td><td class=\"n\">{_f(t['n'])}</td>"
          f"<td class=\"n\">{_f(t['phase1'], 4)}</td><td class=\"n\">{_f(t['phase2'], 4)}</td>"
          f"<td class=\"n\">{_signed(t['delta'], t['improved'])}</td><td class=\"n\">{_f(t['loss_phase1'], 4)}</td>"
          f'<td class="n">{_f(t["loss_phase2"], 4)}</td></tr>')
    w(f"<tr><td><b>weighted total</b></td><td>val loss</td><td></td><td class=\"n\">{_f(m['val_loss']['phase1'], 4)}</td>"
      f"<td class=\"n\">{_f(m['val_loss']['phase2'], 4)}</td><td></td><td></td><td></td></tr></table>")
    if not m["clusters"]:
        return
    w("<h3>Per cluster: Phase 2 value (change from Phase 1)</h3>")
    head = "".join(f'<th class="n">{escape(c)}</th>' for c in m["clusters"])
    w(f'<div class="scroll"><table class="small"><tr><th>task</th><th>metric</th>{head}</tr>')
    for t in m["tasks"]:
        per = m["by_cluster"].get(t["task"], {})
        cells = []
        for c in m["clusters"]:
            v = per.get(c)
            if not v or v.get("phase2") is None:
                cells.append('<td class="n muted">n/a</td>')
                continue
            d = None if v.get("phase1") is None else v["phase2"] - v["phase1"]
            good = None if not d else (d > 0) == t["higher_is_better"]
            cells.append(f'<td class="n" title="n={v.get("n")}">{v["phase2"]:.3f}<br>{_signed(d, good, 3)}</td>')
        w(f"<tr><td>{escape(t['task'])}</td><td>{escape(t['metric'])}</td>{''.join(cells)}</tr>")
    w("</table></div>")
    w('<p class="muted small">Clusters with few validation rows give noisy values; n per cell is in report.json '
      "(and in the cell's tooltip).</p>")


def _availability(w: Any, r: dict[str, Any]) -> None:
    av = r["availability"]
    w('<h2 id="availability">Target availability (validate stage)</h2>')
    w(f"<p>{_f(av['rows'])} rows; {len(av['enabled_tasks'] or [])} tasks enabled"
      + (f", disabled: {escape(', '.join(av['disabled_tasks']))}" if av["disabled_tasks"] else "") + ".</p>")
    w('<table><tr><th>task</th><th>type</th><th class="n">available</th><th class="n">rate</th>'
      '<th class="n">val split rate</th><th class="n">minimum</th><th>decision</th><th>trained</th></tr>')
    for t in av["tasks"]:
        dec = t["decision"] or "n/a"
        cls = "ok" if dec == "enabled" else ("warn" if dec == "disabled" else "bad")
        w(f"<tr><td>{escape(t['task'])}</td><td>{escape(str(t['type']))}</td><td class=\"n\">{_f(t['available'])}</td>"
          f"<td class=\"n\">{_pct(t['rate'])}</td><td class=\"n\">{_pct(t['val_rate'])}</td>"
          f"<td class=\"n\">{_pct(t['min_availability'], 0)}</td><td>{_badge(dec, cls)}</td>"
          f"<td>{'yes' if t['trained'] else 'no'}</td></tr>")
    w("</table>")
