"""report.json checked against the checkpoints it was built from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from rephelpers import THRESHOLD, Run

from ple_adatt.artifacts import path_sha256, read_manifest


def _m(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_output_files_and_manifest(run: Run) -> None:
    man = read_manifest(run.report_dir, "report", (1,))
    assert man["producer"]["stage"] == "report"
    for f in ("report.html", "report.md", "report.json"):
        assert man["files"][f] == path_sha256(run.report_dir / f)
    assert man["inputs"]["phase1"] == _m(run.phase1)["files"]["checkpoint.pt"]
    assert man["summary"] == run.report["summary"]
    assert not list(run.report_dir.parent.glob(".report.tmp-*"))  # written atomically, nothing left over


def test_json_is_strict(run: Run) -> None:
    def no_constants(name: str) -> None:
        raise AssertionError(f"report.json holds {name}")

    json.loads((run.report_dir / "report.json").read_text(), parse_constant=no_constants)


def test_affinity_is_the_checkpoint_buffer(run: Run, phase1_checkpoint) -> None:
    comp = phase1_checkpoint.system.transfer.affinity_computer
    buf = comp.affinity_matrix.double().numpy()
    ema = np.array(run.report["affinity"]["ema"])
    np.testing.assert_allclose(ema, buf, rtol=0, atol=1e-7)
    np.testing.assert_allclose(ema, ema.T, atol=1e-6)  # symmetric
    assert run.report["affinity"]["update_count"] == int(comp.update_count) > 0
    # What the buffer really is: its diagonal is the EMA mass of the measured updates, in (0, 1], not
    # necessarily 1; the cosine form the analysis uses has an exact unit diagonal.
    d = np.diag(buf)
    assert np.all(d > 0) and np.all(d <= 1 + 1e-6)
    cos = np.array(run.report["affinity"]["cosine"])
    np.testing.assert_allclose(np.diag(cos), 1.0)
    np.testing.assert_allclose(cos, cos.T, atol=1e-6)
    np.testing.assert_allclose(cos, np.clip(buf / np.sqrt(np.outer(d, d)), -1, 1) * (1 - np.eye(len(d))) + np.eye(len(d)),
                               atol=1e-9)


def test_prior_is_the_checkpoint_buffer(run: Run, phase1_checkpoint) -> None:
    prior = phase1_checkpoint.system.transfer.group_prior.double().numpy()
    np.testing.assert_allclose(np.array(run.report["prior"]["matrix"]), prior, atol=1e-7)
    order = run.report["run"]["order"]
    groups = [g for g in run.report["affinity"]["groups"] if g["name"] != "(ungrouped)"]
    assert order == [t for g in run.report["affinity"]["groups"] for t in g["members"]]
    assert [g["name"] for g in groups] == list(_m(run.phase1)["train_config"]["transfer"]["task_groups"])


def test_negative_pairs_equal_detect_negative_transfer(run: Run, phase1_checkpoint) -> None:
    detected = phase1_checkpoint.system.transfer.detect_negative_transfer()
    pairs = {frozenset((a, b)) for a, bs in detected.items() for b in bs}
    table = {frozenset((p["a"], p["b"])) for p in run.report["negative_transfer"]["blocked"]}
    assert pairs, "the fixture's threshold should block some pairs"
    assert table == pairs
    assert run.report["negative_transfer"]["detected"] == detected == _m(run.phase1)["negative_transfer"]
    assert run.report["negative_transfer"]["threshold"] == THRESHOLD
    assert run.report["summary"]["blocked_pairs"] == len(pairs)


def test_blocked_since_and_duration_follow_the_history(run: Run) -> None:
    tasks = run.report["run"]["tasks"]
    hist = _m(run.phase1)["affinity_history"]
    for p in run.report["negative_transfer"]["blocked"]:
        i, j = tasks.index(p["a"]), tasks.index(p["b"])
        below = [h["matrix"][i][j] < THRESHOLD for h in hist]
        since = next(k for k, h in enumerate(hist) if (h["phase"], h["epoch"]) == (p["since"]["phase"], p["since"]["epoch"]))
        assert all(below[since:]) and (since == 0 or not below[since - 1])
        assert p["epochs_below"] == len(hist) - since
        assert p["affinity"] == pytest.approx(hist[-1]["matrix"][i][j], abs=1e-7)
    for p in run.report["negative_transfer"]["recovered"]:
        i, j = tasks.index(p["a"]), tasks.index(p["b"])
        assert hist[-1]["matrix"][i][j] >= THRESHOLD and any(h["matrix"][i][j] < THRESHOLD for h in hist)


def test_gcd_is_one_minus_the_cosine(run: Run, phase1_checkpoint) -> None:
    buf = phase1_checkpoint.system.transfer.affinity_computer.affinity_matrix.double().numpy()
    tasks = run.report["run"]["tasks"]
    rows = run.report["gcd"]["pairs"]
    assert len(rows) == len(tasks) * (len(tasks) - 1) // 2
    for r in rows:
        i, j = tasks.index(r["a"]), tasks.index(r["b"])
        cos = buf[i, j] / math.sqrt(buf[i, i] * buf[j, j])
        assert r["cos"] == pytest.approx(cos, abs=1e-9)
        assert r["gcd"] == pytest.approx(1 - cos, abs=1e-9)
        assert r["conflict"] == (r["gcd"] > 1) == (buf[i, j] < 0)
        assert run.report["gcd"]["matrix"][i][j] == pytest.approx(r["gcd"])
    assert "MoCoGrad" in run.report["gcd"]["definition"] and "this project" in run.report["gcd"]["definition"].lower()
    assert run.report["tci"] is None  # no baselines given


def test_transfer_matrix_is_get_transfer_matrix(run: Run, phase1_checkpoint) -> None:
    tr = phase1_checkpoint.system.transfer
    tm = np.array(run.report["transfer"]["matrix"])
    np.testing.assert_allclose(tm, tr.get_transfer_matrix().double().numpy(), atol=1e-7)
    np.testing.assert_allclose(tm, np.array(_m(run.phase1)["transfer_matrix"]), atol=1e-7)
    assert np.all(np.diag(tm) == 0)
    tasks = run.report["run"]["tasks"]
    for p in run.report["negative_transfer"]["blocked"]:  # blocked pairs transfer nothing
        i, j = tasks.index(p["a"]), tasks.index(p["b"])
        assert tm[i, j] == 0 and tm[j, i] == 0
    for row in tm:
        assert row.sum() == pytest.approx(1.0, abs=1e-5) or row.sum() == 0


def test_transfer_shares_add_up_to_the_recorded_total(run: Run) -> None:
    hist = [h for h in _m(run.phase2)["history"] if h["phase"] == "phase1"]
    epochs = run.report["transfer"]["epochs"]
    assert len(epochs) == len(hist)
    for e, h in zip(epochs, hist):
        enh = h["task_losses"]
        total = sum(enh.values())
        from_transfer = sum(e["tasks"][t] * enh[t] for t in enh)
        assert from_transfer / total == pytest.approx(h["transfer_share"], abs=1e-4)
        if e["transfer_phase"] == "warmup":
            assert all(v == pytest.approx(0.0, abs=1e-6) for v in e["tasks"].values())
    cap = run.report["transfer"]["share_cap"]
    assert all(p["last"] <= cap + 1e-6 for p in run.report["transfer"]["per_task"])


def test_timeline_marks_every_phase_and_event(run: Run) -> None:
    tl = run.report["trajectories"]["timeline"]
    assert [b["kind"] for b in tl["bands"]] == ["warmup", "dynamic", "frozen", "phase2"]
    assert [(b["x0"], b["x1"]) for b in tl["bands"]] == [(0, 1), (1, 3), (3, 4), (4, 5)]
    names = {e["event"]: e["x"] for e in tl["events"]}
    assert names["adatt_freeze_epoch"] == names["cgc_frozen_epoch"] == 3  # end of epoch 2 (freeze_epoch)
    assert names["phase2_start"] == 4
    snaps = run.report["trajectories"]["snapshots"]
    assert [s["x"] for s in snaps] == [1, 2, 3, 4]
    pairs = run.report["trajectories"]["pairs"]
    assert 1 <= len(pairs) <= 10 and all(len(p["values"]) == len(snaps) for p in pairs)
    ranges = [p["range"] for p in pairs if p["reason"] == "most changing"]
    assert ranges == sorted(ranges, reverse=True)


def test_metrics_and_availability_come_from_the_inputs(run: Run) -> None:
    m1, m2 = _m(run.phase1)["metrics"], _m(run.phase2)["metrics"]
    avail = json.loads((run.validation / "availability.json").read_text())
    for row in run.report["metrics"]["tasks"]:
        t, key = row["task"], row["metric"]
        v1, v2 = m1["tasks"][t].get(key), m2["tasks"][t].get(key)
        assert row["phase1"] == (v1 if v1 == v1 else None) and row["phase2"] == (v2 if v2 == v2 else None)
        assert row["loss_phase2"] == pytest.approx(m2["tasks"][t]["loss"])
        for c, v in run.report["metrics"]["by_cluster"][t].items():
            raw = m2["tasks"][t]["by_cluster"][c][key]
            assert v["phase2"] == (raw if raw == raw else None)
    assert run.report["metrics"]["val_loss"] == {"phase1": m1["val_loss"], "phase2": m2["val_loss"]}
    for row in run.report["availability"]["tasks"]:
        assert row["rate"] == avail["tasks"][row["task"]]["rate"]
        assert row["available"] == avail["tasks"][row["task"]]["available"]


def test_html_shows_the_numbers_and_fetches_nothing(run: Run) -> None:
    html = (run.report_dir / "report.html").read_text()
    for anchor in ("affinity", "transfer", "negative", "trajectories", "conflict", "metrics", "availability"):
        assert f'id="{anchor}"' in html
    assert "<script" not in html and "<link" not in html and "@import" not in html and "url(" not in html
    assert html.replace('xmlns="http://www.w3.org/2000/svg"', "").count("http") == 0
    assert html.count("<svg") >= 5
    for p in run.report["negative_transfer"]["blocked"][:3]:
        assert f"{p['a']} &harr; {p['b']}" in html and f"{p['affinity']:.3f}" in html
    assert "following the MoCoGrad notes" in html
    md = (run.report_dir / "report.md").read_text()
    assert md.startswith("# Task affinity") and len(md.splitlines()) < 80
    assert f"| {run.report['summary']['blocked_pairs']} |" in md


def test_people_see_epochs_from_1_and_the_json_carries_both(run: Run) -> None:
    """The console prints `event: adatt_freeze_epoch (phase1, epoch 3)` for freeze_epoch 2 (the
    manifest's 0-based epoch 2); the page says the same, report.json keeps `epoch` 0-based."""
    events = json.loads((run.phase2 / "manifest.json").read_text())["events"]
    freeze = next(e for e in events if e["event"] == "adatt_freeze_epoch")
    assert freeze["epoch"] == 2  # the stored contract stays 0-based
    tl = run.report["trajectories"]["timeline"]
    for e in [*tl["events"], *tl["epochs"], *run.report["transfer"]["epochs"], *run.report["trajectories"]["snapshots"]]:
        assert e["epoch_1based"] == e["epoch"] + 1
    assert tl["freeze_epoch"] == 2 and tl["freeze_epoch_1based"] == 3
    html = (run.report_dir / "report.html").read_text()
    assert "adaTT freeze (phase1 epoch 3)" in html and "Phase 2 start (phase2 epoch 1)" in html
    assert "phase1 e1</th>" in html and "phase1 e0</th>" not in html
    for p in run.report["negative_transfer"]["blocked"]:
        if p.get("since"):
            assert f"{p['since']['phase']} epoch {p['since']['epoch'] + 1} (step {p['since']['step']})" in html


def test_the_page_shows_the_commit_with_its_dirty_mark(run: Run) -> None:
    from ple_adatt.reporting.html import _short_commit

    commit = run.report["run"]["phase1"]["git_commit"]  # trained in this checkout: a commit, maybe -dirty
    assert commit and f"commit {_short_commit(commit)}</p>" in (run.report_dir / "report.html").read_text()
    assert _short_commit("0123456789abcdef0123-dirty") == "0123456789ab-dirty"
    assert _short_commit("0123456789abcdef0123") == "0123456789ab" and _short_commit(None) == "n/a"
