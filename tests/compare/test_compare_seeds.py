"""`ple-adatt compare --seeds`: several seeds per strategy, mean ± sd, paired intervals, the
single-seed caveat, warm-up before the timed runs, and the gate-freeze statement."""

from __future__ import annotations

import contextlib
import io
import json
import math
import statistics
from pathlib import Path

import pytest

from ple_adatt.cli import main
from ple_adatt.data.synthetic import write_parquet
from ple_adatt.reporting.compare import (
    COMPARE_SCHEMA_VERSION,
    compare_numbers,
    delta_m,
    paired_difference,
    render_html,
    render_markdown,
    t_quantile_975,
)
from ple_adatt.stages.compare import parse_seeds

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs/train/compare_tiny.yaml"


# ------------------------------------------------------------------ the statistics


def test_paired_difference_by_hand():
    # d = [1.0, 1.5, 2.0]: mean 1.5, sd 0.5, half-width t(0.975, 2) * 0.5 / sqrt(3) = 4.303 * 0.288675
    r = paired_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.5, 2: 1.0})
    assert r["n"] == 3 and r["mean"] == pytest.approx(1.5) and r["sd"] == pytest.approx(0.5)
    assert r["ci95"] == pytest.approx([1.5 - 4.303 * 0.5 / math.sqrt(3), 1.5 + 4.303 * 0.5 / math.sqrt(3)])
    assert r["verdict"] == "better"
    assert paired_difference({0: 0.0, 1: 0.5, 2: 1.0}, {0: 1.0, 1: 2.0, 2: 3.0})["verdict"] == "worse"
    # a mean difference of +1 with differences spread over both signs: within noise
    noisy = paired_difference({0: 3.0, 1: -1.0, 2: 1.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert noisy["mean"] == pytest.approx(1.0) and noisy["ci95"][0] < 0 < noisy["ci95"][1]
    assert noisy["verdict"] == "within noise"
    # only the seeds both ran pair; one pair is no interval
    one = paired_difference({0: 2.0, 5: 9.0}, {0: 1.0, 1: 4.0})
    assert one["seeds"] == [0] and one["ci95"] is None and one["verdict"] == "one seed"


def test_t_quantiles():
    assert t_quantile_975(1) == pytest.approx(12.706) and t_quantile_975(2) == pytest.approx(4.303)
    assert t_quantile_975(30) == pytest.approx(2.042)
    stats = pytest.importorskip("scipy.stats")
    for df in (31, 40, 60, 120, 1000):
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_parse_seeds():
    assert parse_seeds(None, 4) is None
    assert parse_seeds("3", 4) == [4, 5, 6]  # a count starts at the config's seed
    assert parse_seeds("0,7,2", 4) == [0, 7, 2]
    assert parse_seeds("9,", 0) == [9]
    for bad, why in (("0", "a count must be 1..100"), ("0,0", "names a seed twice"), ("a,b", "expected a count"),
                     ("-1,2", "outside [0, 2**32 - 1]"), (",", "no seed given")):
        with pytest.raises(Exception, match=why.replace("[", r"\[").replace("*", r"\*").replace(".", r"\.")):
            parse_seeds(bad, 0)


def test_a_bad_seeds_option_is_one_line_and_exit_2(tmp_path, capsys):
    rc = main(["compare", "--no-tracking", "--data", "d", "--data-config", "c", "--config", "c",
               "--out", str(tmp_path / "x"), "--seeds", "0,0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--seeds '0,0': names a seed twice" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    rc = main(["compare", "--out", str(tmp_path / "x"), "--runs", "adatt=a", "--seeds", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "--seeds 3: trains new runs; with --runs the seeds are read from the runs' manifests" in err


# -------------------------------------------------- the report from constructed manifests


def _man(tasks: list[str], seed: int, auc: dict[str, float], loss: float = 0.5, strategy: str = "equal",
         epochs: list[tuple[float, int, bool]] = ((1.0, 10, False), (0.5, 20, False))) -> dict:
    """A checkpoint manifest as `read_run` returns it: binary tasks, Phase 1 history of
    (seconds, cumulative steps, cgc_frozen) per epoch."""
    return {"tasks": tasks, "strategy": strategy, "_dir": f"/runs/{strategy}/seed-{seed}",
            "task_specs": [{"name": t, "type": "binary"} for t in tasks],
            "train_config": {"seed": seed, "device": "cpu"},
            "metrics": {"tasks": {t: {"auc": auc[t], "loss": loss} for t in tasks}},
            "history": [{"phase": "phase1", "epoch": k, "seconds": s, "step": st, "cgc_frozen": fr}
                        for k, (s, st, fr) in enumerate(epochs)],
            "_timing": {"wall_seconds": sum(e[0] for e in epochs) + 1.0}}


def test_compare_numbers_over_seeds_pairs_each_seed_with_its_baselines():
    tasks = ["a", "b"]
    higher = {"a": True, "b": True}
    base = {0: {"a": 0.60, "b": 0.70}, 1: {"a": 0.62, "b": 0.68}, 2: {"a": 0.58, "b": 0.71}}
    # adatt is clearly better than equal in every seed; pcgrad is not separable from adatt
    adatt = {0: {"a": 0.66, "b": 0.72}, 1: {"a": 0.67, "b": 0.70}, 2: {"a": 0.64, "b": 0.73}}
    equal = {0: {"a": 0.60, "b": 0.69}, 1: {"a": 0.61, "b": 0.67}, 2: {"a": 0.59, "b": 0.70}}
    pcgrad = {0: {"a": 0.68, "b": 0.72}, 1: {"a": 0.65, "b": 0.70}, 2: {"a": 0.66, "b": 0.73}}
    frozen = ((1.0, 10, False), (0.5, 20, True))
    runs = {"adatt": [_man(tasks, s, adatt[s], strategy="adatt", epochs=frozen) for s in (0, 1, 2)],
            "pcgrad": [_man(tasks, s, pcgrad[s], strategy="pcgrad",
                            epochs=((2.0, 10, False), (0.5 * (s + 1), 20, False))) for s in (2, 0, 1)],
            "equal": [_man(tasks, s, equal[s]) for s in (0, 1, 2)]}
    singles = {t: [_man([t], s, {t: base[s][t]}, loss=0.4 + s / 10) for s in (0, 1, 2)] for t in tasks}
    r = compare_numbers(runs, singles, machine={"cpus": 2})
    assert r["schema_version"] == COMPARE_SCHEMA_VERSION == 3
    assert r["seeds"] == [0, 1, 2] and r["n_seeds"] == 3 and r["baselines_paired"] and r["single_seed_caveat"] is None
    by = {s["name"]: s for s in r["strategies"]}
    for name, table in (("adatt", adatt), ("pcgrad", pcgrad), ("equal", equal)):
        dms = [delta_m(table[s], base[s], higher) for s in (0, 1, 2)]
        s = by[name]
        assert [p["seed"] for p in s["seeds"]] == [0, 1, 2]
        assert [p["delta_m"] for p in s["seeds"]] == pytest.approx(dms)  # seed s against the baseline of seed s
        assert s["delta_m"] == pytest.approx(statistics.mean(dms)) and s["delta_m_sd"] == pytest.approx(statistics.stdev(dms))
        assert s["metrics"]["a"] == pytest.approx(statistics.mean(table[k]["a"] for k in (0, 1, 2)))
        assert s["metrics_sd"]["a"] == pytest.approx(statistics.stdev(table[k]["a"] for k in (0, 1, 2)))
    # the baseline row is the mean over seeds; TCI is the mean of the per-seed TCIs
    assert r["tasks"][0]["single_task"] == pytest.approx(0.60) and r["tasks"][0]["single_task_sd"] == pytest.approx(0.02)
    assert by["equal"]["tci"][0]["tci"] == pytest.approx(statistics.mean((0.4 + s / 10 - 0.5) / (0.4 + s / 10)
                                                                         for s in (0, 1, 2)))
    comps = {c["other"]: c for c in r["paired_vs_reference"]["comparisons"]}
    assert r["paired_vs_reference"]["reference"] == "adatt" and set(comps) == {"pcgrad", "equal"}
    assert comps["equal"]["verdict"] == "better" and comps["pcgrad"]["verdict"] == "within noise"
    d = [by["adatt"]["seeds"][k]["delta_m"] - by["equal"]["seeds"][k]["delta_m"] for k in range(3)]
    assert comps["equal"]["mean"] == pytest.approx(statistics.mean(d))
    # the order by mean, each with adatt's verdict against it (the paired table's verdicts)
    assert r["ranking_by_delta_m"] == ["pcgrad", "adatt", "equal"]
    assert [(e["name"], e["vs_reference"]) for e in r["ranking"]] == [
        ("pcgrad", "within noise"), ("adatt", "reference"), ("equal", "better")]
    assert r["ranking_text"] == (f"pcgrad {by['pcgrad']['delta_m']:+.2f}% (within noise), "
                                 f"adatt {by['adatt']['delta_m']:+.2f}% (reference), "
                                 f"equal {by['equal']['delta_m']:+.2f}% (adatt better)")
    # three seeds: no few-seeds warning; two comparisons: the chance note says 2/20
    assert r["few_seeds_warning"] is None
    assert r["multiplicity_note"].startswith("2 comparisons at 95 % each") and "k/20 = 0.10" in r["multiplicity_note"]
    # cost: median over seeds and the range; steady steps/s from the second epoch on
    c = by["pcgrad"]["cost"]
    assert c["phase1_seconds"] == pytest.approx(3.0) and c["phase1_seconds_range"] == pytest.approx([2.5, 3.5])
    assert c["steady_steps_per_second"] == pytest.approx(10 / 1.0) and c["steady_steps_per_second_range"] == pytest.approx([10 / 1.5, 10 / 0.5])
    assert by["adatt"]["gates_frozen_from"] == ["phase 1 epoch 2"] and by["equal"]["gates_frozen_from"] == ["phase 2"]
    assert r["machine"] == {"cpus": 2, "device": "cpu"}
    md, html = render_markdown(r), render_html(r)
    assert "Caveat" not in md and "single-seed-caveat" not in html
    assert "Order by mean Δm over 3 seeds, with adatt's paired verdict against each" in md
    assert r["ranking_text"] in md and "(adatt better)" in md and "(within noise)" in md
    assert "Few seeds" not in md and "few-seeds-warning" not in html
    assert "Note: 2 comparisons at 95 % each" in md and 'id="multiplicity-note"' in html
    # the Markdown cost table has the HTML one's columns: median [min-max] over the seeds, by hand
    # (pcgrad: Phase 1 seconds 2.5 / 3.0 / 3.5, 20 steps, second epoch 0.5 / 1.0 / 1.5 s for 10 steps)
    cols = "| strategy | phase-1 s | epochs | steps | steps/s | steady steps/s | wall s (both phases) |"
    assert cols in md and "".join(f"<th>{c}</th>" for c in cols.strip("| ").split(" | ")[1:]) in html
    assert "| pcgrad | 3.0 [2.5-3.5] | 2 | 20 | 6.7 [5.7-8.0] | 10.0 [6.7-20.0] | 4.0 [3.5-4.5] |" in md
    assert ("<td>3.0 [2.5-3.5]</td><td>2</td><td>20</td><td>6.7 [5.7-8.0]</td><td>10.0 [6.7-20.0]</td>"
            "<td>4.0 [3.5-4.5]</td>") in html
    assert "adatt against each strategy (paired over seeds)" in html and "adatt better" in html
    assert "keeps training them until Phase 2" in md and "keeps training them until Phase 2" in html
    assert "wall-clock on the machine" in html and "untimed warm-up" in html and "Machine: cpus 2" in html


def test_the_order_carries_the_paired_verdicts_and_cannot_contradict_them():
    """The verification's case: adjacent pairs all within noise, yet adatt significantly worse
    than the top strategy and better than the last. The old chain read 'pcgrad ≈ mgda ≈ adatt'.

    One task, baseline AUC 0.5 in both seeds, so delta-m = 200 (AUC - 0.5) per seed:
    adatt 20, 22; pcgrad 30, 33; mgda 24, 20; uncertainty 10, 13. d = adatt - other:
    pcgrad -10, -11 (mean -10.5, sd √0.5, half 12.706·√0.5/√2 = 6.353: [-16.853, -4.147], worse);
    mgda -4, +2 (mean -1, sd √18, half 12.706·3 = 38.118: within noise);
    uncertainty +10, +9 (mean 9.5: [3.147, 15.853], better).
    """
    aucs = {"adatt": (0.60, 0.61), "pcgrad": (0.65, 0.665), "mgda": (0.62, 0.60), "uncertainty": (0.55, 0.565)}
    runs = {n: [_man(["a"], s, {"a": v[s]}, strategy=n) for s in (0, 1)] for n, v in aucs.items()}
    r = compare_numbers(runs, {"a": [_man(["a"], s, {"a": 0.5}) for s in (0, 1)]})
    comps = {c["other"]: c for c in r["paired_vs_reference"]["comparisons"]}
    half = 12.706 * math.sqrt(0.5) / math.sqrt(2)
    assert comps["pcgrad"]["ci95"] == pytest.approx([-10.5 - half, -10.5 + half])
    assert comps["uncertainty"]["ci95"] == pytest.approx([9.5 - half, 9.5 + half])
    assert comps["mgda"]["ci95"] == pytest.approx([-1 - 38.118, -1 + 38.118], abs=1e-3)
    assert {n: c["verdict"] for n, c in comps.items()} == {"pcgrad": "worse", "mgda": "within noise",
                                                         "uncertainty": "better"}
    # every entry of the order carries exactly the paired table's verdict
    assert r["ranking_by_delta_m"] == ["pcgrad", "mgda", "adatt", "uncertainty"]
    for e in r["ranking"]:
        assert e["vs_reference"] == ("reference" if e["name"] == "adatt" else comps[e["name"]]["verdict"])
    assert r["ranking_text"] == ("pcgrad +31.50% (adatt worse), mgda +22.00% (within noise), "
                                 "adatt +21.00% (reference), uncertainty +11.50% (adatt better)")
    assert "≈" not in r["ranking_text"] and ">" not in r["ranking_text"]
    # two seeds: one degree of freedom, said on both pages; three tests: about 3/20 by chance
    assert r["few_seeds_warning"].startswith("each paired interval rests on n = 2 seeds, n - 1 = 1 degree")
    assert r["multiplicity_note"] == ("3 comparisons at 95 % each, no multiple-comparison correction: even if no "
                                      "strategy truly differed from adatt, about k/20 = 0.15 of these verdicts "
                                      "would read 'better' or 'worse' by chance")
    md, html = render_markdown(r), render_html(r)
    assert r["ranking_text"] in md and "only pairs with adatt are tested" in md
    assert "> **Few seeds: each paired interval" in md and 'id="few-seeds-warning"' in html
    assert f"Note: {r['multiplicity_note']}." in md and "about k/20 = 0.15" in html
    # the verdict beside each name in the order is the one in the paired table's row
    assert "| pcgrad | " in md and "(adatt worse) | yes |" in md


def test_one_seed_shows_the_caveat_and_no_ranking():
    tasks = ["a"]
    runs = {"adatt": _man(tasks, 0, {"a": 0.7}, strategy="adatt"), "pcgrad": _man(tasks, 0, {"a": 0.6})}
    r = compare_numbers(runs, {"a": _man(tasks, 0, {"a": 0.65})})
    assert r["n_seeds"] == 1 and "one seed cannot separate them" in r["single_seed_caveat"]
    assert r["paired_vs_reference"]["comparisons"][0]["verdict"] == "one seed"
    md, html = render_markdown(r), render_html(r)
    assert md.splitlines()[2].startswith("> **Caveat: One seed") and "--seeds 3" in md
    assert 'id="single-seed-caveat"' in html and html.index("single-seed-caveat") < html.index("<table")
    assert "Ranking" not in md and "Order by Δm (one seed: not a ranking" in md
    # one seed: the order with Δm only, no verdicts, no interval notes
    assert r["ranking_text"] == "adatt +7.69% (reference), pcgrad -7.69%"
    assert r["few_seeds_warning"] is None and r["multiplicity_note"] is None and "Note:" not in md
    assert "(one seed: cannot tell)" in md


def test_baselines_from_other_seeds_are_used_as_their_mean(tmp_path):
    tasks = ["a"]
    runs = {"adatt": [_man(tasks, s, {"a": 0.7}) for s in (0, 1)]}
    r = compare_numbers(runs, {"a": _man(tasks, 5, {"a": 0.5})})
    assert not r["baselines_paired"] and r["strategies"][0]["delta_m"] == pytest.approx(40.0)
    assert "against the mean single-task baseline" in render_markdown(r)
    with pytest.raises(Exception, match="two runs with seed 0"):
        compare_numbers({"adatt": [_man(tasks, 0, {"a": 0.7}), _man(tasks, 0, {"a": 0.6})]})


# ----------------------------------------------------------- a real several-seed compare


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """adatt and equal, tasks ctr and cvr, seeds 0 and 1: 8 tiny runs (plus the warm-up)."""
    d = tmp_path_factory.mktemp("compare-seeds")
    data = write_parquet(d / "syn.parquet", rows=1500, seed=0, brand_vocab=100)
    out = d / "cmp"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["compare", "--no-tracking", "--data", str(data), "--data-config",
                   str(ROOT / "configs/data/synthetic.yaml"), "--config", str(TINY), "--tasks", "ctr,cvr",
                   "--strategies", "adatt,equal", "--seeds", "0,1", "--out", str(out)])
    assert rc == 0, buf.getvalue()[-2000:]
    return out, buf.getvalue()


def test_compare_with_several_seeds(seeded):
    out, captured = seeded
    # the untimed warm-up runs before the first timed run and leaves nothing behind
    assert captured.index("warm-up (untimed, discarded)") < captured.index("=== compare 1/8: strategy adatt, seed 0")
    assert not (out / ".warmup").exists()
    # seed 1 trains the strategies in the other order
    assert captured.index("strategy equal, seed 1") < captured.index("strategy adatt, seed 1")
    r = json.loads((out / "compare.json").read_text())
    assert r["seeds"] == [0, 1] and r["baselines_paired"] and r["single_seed_caveat"] is None
    base = {t: {} for t in ("ctr", "cvr")}
    for t in base:
        for s in (0, 1):
            man = json.loads((out / "single_task" / t / f"seed-{s}" / "phase2" / "manifest.json").read_text())
            assert man["tasks"] == [t] and man["train_config"]["seed"] == s
            base[t][s] = man["metrics"]["tasks"][t]
    higher = {"ctr": True, "cvr": True}
    for st in r["strategies"]:
        dms = []
        for p in st["seeds"]:
            man = json.loads((out / "runs" / st["name"] / f"seed-{p['seed']}" / "phase2" / "manifest.json").read_text())
            cfg = man["train_config"]
            assert cfg["seed"] == p["seed"] == cfg["transfer"]["pcgrad"]["seed"] == cfg["transfer"]["mocograd"]["seed"]
            assert p["checkpoint"] == str(out / "runs" / st["name"] / f"seed-{p['seed']}" / "phase2")
            mets = {t: man["metrics"]["tasks"][t]["auc"] for t in higher}
            dms.append(delta_m(mets, {t: base[t][p["seed"]]["auc"] for t in higher}, higher))
            assert p["delta_m"] == pytest.approx(dms[-1])
        assert st["delta_m"] == pytest.approx(statistics.mean(dms))
        assert st["delta_m_sd"] == pytest.approx(statistics.stdev(dms))
        assert st["cost"]["n"] == 2 and st["cost"]["phase1_seconds_range"][0] <= st["cost"]["phase1_seconds"]
    # the seeds really differ (otherwise sd and the intervals would mean nothing)
    a0, a1 = (json.loads((out / "runs/adatt" / f"seed-{s}/phase2/manifest.json").read_text())["metrics"] for s in (0, 1))
    assert a0 != a1
    by = {s["name"]: s for s in r["strategies"]}
    assert by["adatt"]["gates_frozen_from"] == ["phase 1 epoch 2"] and by["equal"]["gates_frozen_from"] == ["phase 2"]
    (comp,) = r["paired_vs_reference"]["comparisons"]
    assert comp["other"] == "equal" and comp["n"] == 2 and comp["ci95"] is not None
    assert comp["mean"] == pytest.approx(by["adatt"]["delta_m"] - by["equal"]["delta_m"])
    # baselines.json: the mean over seeds of each single-task validation loss
    b = json.loads((out / "baselines.json").read_text())
    assert b["seeds"] == [0, 1] and b["val_loss"]["ctr"] == pytest.approx(statistics.mean(base["ctr"][s]["loss"] for s in (0, 1)))
    # with what the losses depend on, so that a copied-away baselines.json can still be checked
    from ple_adatt.reporting.inputs import loss_provenance

    ctr_man = json.loads(next((out / "single_task" / "ctr").rglob("manifest.json")).read_text())
    assert b["provenance"]["ctr"] == json.loads(json.dumps(loss_provenance(ctr_man, "ctr")))
    assert b["provenance"]["ctr"]["loss"] and b["provenance"]["ctr"]["data_hash"]
    html, md = (out / "compare.html").read_text(), (out / "compare.md").read_text()
    assert "single-seed-caveat" not in html and "Order by mean Δm over 2 seeds" in md
    # two seeds: the interval rests on one degree of freedom, and both pages say so before the tables
    assert "t(0.975, 1) = 12.71" in r["few_seeds_warning"]
    assert md.index("> **Few seeds: each paired interval rests on n = 2 seeds") < md.index("| strategy |")
    assert html.index('id="few-seeds-warning"') < html.index("<table")
    man = json.loads((out / "manifest.json").read_text())
    assert man["schema_version"] == COMPARE_SCHEMA_VERSION and man["seeds"] == [0, 1]
    assert "run.adatt.seed-1" in man["inputs"]
    # `report --baselines OUT/single_task` reads the seed-<n> layout: the mean over the seeds, as
    # baselines.json holds, each seed's provenance checked against the joint run
    from ple_adatt.reporting.inputs import load_baselines

    joint = out / "runs" / "adatt" / "seed-0" / "phase2"
    st = load_baselines(out / "single_task", ["ctr", "cvr"],
                        joint={"phase2": (joint, json.loads((joint / "manifest.json").read_text()))})
    assert st.val_loss["phase2"] == pytest.approx(b["val_loss"]) and set(st.checked["phase2"]) == {"ctr", "cvr"}
    assert any("seed 0, 1 (mean over 2 seeds) vs 0" in w for w in st.warnings)


def test_report_only_reads_every_seed_of_a_several_seed_compare(seeded, tmp_path):
    out, _ = seeded
    again = tmp_path / "again"
    assert main(["compare", "--out", str(again), "--runs", f"adatt={out / 'runs/adatt'}",
                 "--runs", f"equal={out / 'runs/equal/seed-0'}", "--runs", f"equal={out / 'runs/equal/seed-1'}",
                 "--singles", str(out / "single_task")]) == 0
    r, first = (json.loads((d / "compare.json").read_text()) for d in (again, out))
    assert r["seeds"] == [0, 1]
    for s, f in zip(r["strategies"], first["strategies"], strict=True):
        assert s["delta_m"] == pytest.approx(f["delta_m"]) and s["delta_m_sd"] == pytest.approx(f["delta_m_sd"])
