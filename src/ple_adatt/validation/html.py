"""A self-contained HTML page of the availability report.

Only inline CSS: no script, no font, no stylesheet or image is fetched, so the page opens
offline (in MLflow's artifact viewer, from a KFP artifact, from a mail attachment).
Every number comes from the report dict that is also written as availability.json.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

CSS = """
body{font:14px/1.45 -apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1d2430;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde2ea;padding-bottom:4px}
table{border-collapse:collapse;margin:6px 0 12px}th,td{padding:4px 8px;border-bottom:1px solid #eef0f4;text-align:left;vertical-align:top}
th{background:#f5f7fa;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;color:#fff}
.ok{background:#2e7d32}.bad{background:#c62828}.warn{background:#ef6c00}.off{background:#6b7280}.info{background:#1565c0}
.bar{position:relative;width:140px;height:12px;background:#eef0f4;border-radius:3px;display:inline-block;vertical-align:middle}
.bar span{position:absolute;left:0;top:0;bottom:0;background:#4a78c2;border-radius:3px}
.bar i{position:absolute;top:-2px;bottom:-2px;width:2px;background:#c62828}
.muted{color:#6b7280}.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
ul.msgs li{margin:2px 0}details{margin:6px 0}summary{cursor:pointer;font-weight:600}
pre{background:#f5f7fa;padding:8px;overflow:auto;font-size:12px}
"""


def _pct(x: Any) -> str:
    return "n/a" if not isinstance(x, (int, float)) else f"{100 * x:.2f}%"


def _num(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return escape(str(x))
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.6g}"
    return escape(str(x))


def _bar(rate: Any, marker: Any = None) -> str:
    w = max(0.0, min(1.0, rate)) * 100 if isinstance(rate, (int, float)) else 0.0
    m = (f'<i style="left:{max(0.0, min(1.0, marker)) * 100:.1f}%" title="minimum {_pct(marker)}"></i>'
         if isinstance(marker, (int, float)) and marker > 0 else "")
    return f'<span class="bar"><span style="width:{w:.1f}%"></span>{m}</span>'


def _badge(text: str, cls: str) -> str:
    return f'<span class="badge {cls}">{escape(text)}</span>'


def _shade(rate: Any) -> str:
    if not isinstance(rate, (int, float)):
        return "background:#f5f7fa"
    light = 97 - 45 * max(0.0, min(1.0, rate))
    return f"background:hsl(215,60%,{light:.0f}%);color:{'#fff' if light < 65 else '#1d2430'}"


def render_html(r: dict[str, Any]) -> str:
    """The report page for the availability dict ``r`` (the content of availability.json)."""
    out: list[str] = []
    w = out.append
    status = _badge("PASSED", "ok") if r["passed"] else _badge("FAILED", "bad")
    w(f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Validation: "
      f"{escape(r['config']['name'])}</title><style>{CSS}</style></head><body>")
    w(f"<h1>Dataset validation {status}</h1>")
    ds, man = r["dataset"], r["manifest"]
    w(f"<p class=\"muted\">{escape(ds['path'])} &middot; {_num(r['rows'])} rows &middot; {ds['files']} file(s) &middot; "
      f"config {escape(r['config']['path'])} ({escape(r['config']['name'])}) &middot; created {escape(man['created'])} "
      f"&middot; ple-adatt {escape(str(man['producer']['component_version']))}</p>")
    cs = r["check_summary"]
    w(f"<p>Checks: {cs['passed']} of {cs['total']} passed, {cs['failed_critical']} critical failures, "
      f"{cs['failed_other']} warnings. Enabled tasks ({len(r['enabled_tasks'])}): "
      f"<b>{escape(', '.join(r['enabled_tasks']) or 'none')}</b>"
      + (f"; disabled: <b>{escape(', '.join(r['disabled_tasks']))}</b>" if r["disabled_tasks"] else "")
      + (f"; failed: <b>{escape(', '.join(r['failed_tasks']))}</b>" if r["failed_tasks"] else "") + ".</p>")
    if r["errors"]:
        w("<h2>Errors</h2><ul class=\"msgs\">" + "".join(f"<li>{escape(m)}</li>" for m in r["errors"]) + "</ul>")
    if r["warnings"]:
        w("<h2>Warnings</h2><ul class=\"msgs\">" + "".join(f"<li>{escape(m)}</li>" for m in r["warnings"]) + "</ul>")

    # tasks
    w("<h2>Tasks: target availability</h2><table><tr><th>task</th><th>type</th><th>column</th><th>label domain</th>"
      "<th>available</th><th>rate (red: minimum)</th><th>train</th><th>val</th><th>test</th>"
      "<th>out of domain</th><th>label range</th><th>decision</th></tr>")
    for name, t in r["tasks"].items():
        dec = {"enabled": "ok", "disabled": "off", "failed": "bad"}[t["decision"]]
        lab = t["label"]
        rng = "n/a" if lab["min"] is None else f"{_num(lab['min'])} .. {_num(lab['max'])}"
        ex = f" <span class=\"muted mono\">e.g. {escape(', '.join(map(str, lab['examples'])))}</span>" if lab["examples"] else ""
        sp = t["per_split"]
        w(f"<tr><td><b>{escape(name)}</b></td><td>{escape(t['type'])}</td><td class=\"mono\">{escape(t['column'])}</td>"
          f"<td>{escape(t['domain'])}</td><td class=\"n\">{_num(t['available'])} / {_num(t['rows'])}</td>"
          f"<td>{_bar(t['rate'], t['min_availability'])} {_pct(t['rate'])}"
          f" <span class=\"muted\">(min {_pct(t['min_availability'])}, {escape(t['on_low_availability'])})</span></td>"
          + "".join(f"<td class=\"n\">{_pct(sp[s]['rate'])}</td>" for s in ("train", "val", "test"))
          + f"<td class=\"n\">{_num(lab['out_of_domain'])}{ex}</td><td class=\"n\">{rng}</td>"
          f"<td>{_badge(t['decision'], dec)}</td></tr>")
    w("</table>")

    # per cluster
    cl = r.get("clusters")
    if cl:
        order = cl["order"]
        w(f"<h2>Availability per cluster (<span class=\"mono\">{escape(cl['column'])}</span>)</h2>"
          "<table><tr><th>task</th>" + "".join(f"<th>{escape(c)}</th>" for c in order) + "</tr>")
        w("<tr><td class=\"muted\">rows</td>" + "".join(f"<td class=\"n\">{_num(cl['rows'][c])}</td>" for c in order) + "</tr>")
        w("<tr><td class=\"muted\">train rows</td>"
          + "".join(f"<td class=\"n\">{_num(cl['train_rows'][c])}</td>" for c in order) + "</tr>")
        for name, t in r["tasks"].items():
            cells = []
            for c in order:
                v = t["per_cluster"].get(c, {})
                rate = v.get("rate")
                cells.append(f"<td class=\"n\" style=\"{_shade(rate)}\" title=\"{_num(v.get('available'))} of "
                             f"{_num(v.get('rows'))}\">{_pct(rate)}</td>")
            w(f"<tr><td>{escape(name)}</td>{''.join(cells)}</tr>")
        w(f"</table><p class=\"muted\">unknown (null) cluster: {_pct(cl['unknown_rate'])} of rows; "
          f"id outside [0, {cl['num_clusters']}): {_pct(cl['out_of_range_rate'])}; clusters without train rows: "
          f"{escape(', '.join(cl['missing_in_train']) or 'none')}.</p>")

    # splits
    sp = r["splits"]
    w("<h2>Splits</h2><table><tr><th>split</th><th>rows</th><th>share</th><th>configured</th></tr>")
    for s, n in sp["rows"].items():
        if s == "other" and not n:
            continue
        w(f"<tr><td>{escape(s)}</td><td class=\"n\">{_num(n)}</td><td class=\"n\">{_pct(sp['rates'][s])}</td>"
          f"<td class=\"n\">{_pct(sp['fractions'].get(s))}</td></tr>")
    how = f"hash of <span class=\"mono\">{escape(str(sp['key']))}</span>" if sp["method"] == "hash" else \
        f"column <span class=\"mono\">{escape(str(sp['column']))}</span>"
    w(f"</table><p class=\"muted\">split by {how}</p>")

    # features
    w("<h2>Features: null rates</h2><table><tr><th>feature</th><th>kind</th><th>dtype</th><th>null rate</th>"
      "<th>nulls</th><th>NaN</th><th>infinite</th></tr>")
    for f, v in r["features"].items():
        w(f"<tr><td class=\"mono\">{escape(f)}</td><td>{escape(v['kind'])}</td><td class=\"mono\">{escape(v['dtype'])}</td>"
          f"<td>{_bar(v['null_rate'])} {_pct(v['null_rate'])}</td><td class=\"n\">{_num(v['nulls'])}</td>"
          f"<td class=\"n\">{_num(v['nan'])}</td><td class=\"n\">{_num(v['infinite'])}</td></tr>")
    w("</table>")

    # checks
    g = r["gx"]
    smp = g["sample"]
    w(f"<h2>Checks</h2><p class=\"muted\">Great Expectations {escape(g['version'])}, suite "
      f"<span class=\"mono\">{escape(g['suite'])}</span> ({g['expectations']} expectations) ran on "
      f"{_num(smp['rows'])} rows ({escape(smp['method'])}, {smp['chunks']} chunk(s)). {escape(g['note'])}.</p>")
    checks = sorted(r["checks"], key=lambda c: (c["passed"], c["severity"] != "critical"))
    w("<table><tr><th>check</th><th>result</th><th>severity</th><th>observed</th><th>expected</th>"
      "<th>GX (sample)</th><th>message</th></tr>")
    for c in checks:
        res = _badge("pass", "ok") if c["passed"] else _badge("fail", "bad" if c["severity"] == "critical" else "warn")
        gxr = c.get("gx")
        if gxr:
            gx_txt = ("ok" if gxr["success"] else "fail") + (
                f", {_num(gxr['unexpected_count'])} unexpected" if gxr.get("unexpected_count") is not None else
                f", observed {_num(gxr.get('observed_value'))}" if gxr.get("observed_value") is not None else "")
            if gxr.get("exception"):
                gx_txt += f" (error: {escape(gxr['exception'])})"
        else:
            gx_txt = "<span class=\"muted\">-</span>"
        obs = c["observed"]
        obs_txt = _pct(obs) if c["id"].endswith(("min_availability", "not_all_null")) and isinstance(obs, float) \
            else escape(json.dumps(obs)) if isinstance(obs, (list, dict)) else _num(obs)
        w(f"<tr><td class=\"mono\">{escape(c['id'])}</td><td>{res}</td><td>{escape(c['severity'])}</td>"
          f"<td class=\"n\">{obs_txt}</td><td class=\"mono\">{escape(json.dumps(c['expected']))}</td>"
          f"<td>{gx_txt}</td><td>{escape(c['message'] or '')}</td></tr>")
    w("</table>")
    w("<details><summary>manifest</summary><pre>" + escape(json.dumps(r["manifest"], indent=1)) + "</pre></details>")
    w("</body></html>\n")
    return "".join(out)
