"""`ple-adatt compare`: every strategy and single-task baselines on generated data and on
UCI Adult (tiny configs), the numbers of the report, and its inputs' errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from ple_adatt.checkpoint import load_checkpoint
from ple_adatt.cli import main
from ple_adatt.config import STRATEGY_NAMES
from ple_adatt.data.synthetic import write_parquet
from ple_adatt.reporting.compare import delta_m, pareto_front
from ple_adatt.reporting.inputs import load_baselines

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs/train/compare_tiny.yaml"
ADULT = Path(os.environ.get("PLE_ADATT_ADULT_PATH") or ROOT.parent / "shared" / "data" / "adult" / "adult.data")
SYN_TASKS = ["ctr", "cvr", "churn", "ltv", "nba"]


# ------------------------------------------------------------------------ the numbers


def test_delta_m_signs_by_metric_direction():
    higher = {"a": True, "b": False}
    # a: +10% better; b (lower is better): 2.0 -> 2.2 is 10% worse -> mean 0
    assert delta_m({"a": 0.55, "b": 2.2}, {"a": 0.5, "b": 2.0}, higher) == pytest.approx(0.0)
    assert delta_m({"a": 0.55, "b": 1.8}, {"a": 0.5, "b": 2.0}, higher) == pytest.approx(10.0)
    assert delta_m({"a": 0.45, "b": None}, {"a": 0.5, "b": 2.0}, higher) == pytest.approx(-10.0)


def test_pareto_front_keeps_only_non_dominated_points():
    higher = {"auc": True, "rmse": False}
    pts = {"x": {"auc": 0.7, "rmse": 1.0}, "y": {"auc": 0.8, "rmse": 1.2}, "z": {"auc": 0.65, "rmse": 1.1},
           "w": {"auc": 0.7, "rmse": 1.0}}
    assert pareto_front(pts, higher) == ["x", "y", "w"]  # z is dominated by x; equal points both stay


# ------------------------------------------------------------- a real run on generated data


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare-syn")
    data = write_parquet(d / "syn.parquet", rows=2500, seed=0, brand_vocab=100)
    out = d / "cmp"
    rc = main(["compare", "--no-tracking", "--data", str(data), "--data-config", str(ROOT / "configs/data/synthetic.yaml"),
               "--config", str(TINY), "--tasks", ",".join(SYN_TASKS), "--out", str(out)])
    assert rc == 0
    return out


def check_comparison(out: Path, tasks: list[str]) -> dict:
    r = json.loads((out / "compare.json").read_text())
    assert [s["name"] for s in r["strategies"]] == list(STRATEGY_NAMES)
    assert [t["name"] for t in r["tasks"]] == tasks
    base = {t["name"]: t["single_task"] for t in r["tasks"]}
    higher = {t["name"]: t["higher_is_better"] for t in r["tasks"]}
    assert all(isinstance(v, float) and math.isfinite(v) for v in base.values())
    for s in r["strategies"]:
        # the run really used its strategy, and the table shows its checkpoint's metrics
        man = json.loads((out / "runs" / s["name"] / "phase2" / "manifest.json").read_text())
        assert man["strategy"] == s["name"] == man["train_config"]["transfer"]["strategy"]
        assert s["checkpoint"] == str(out / "runs" / s["name"] / "phase2")  # where it is, not the temp dir it was written in
        for t in r["tasks"]:
            assert s["metrics"][t["name"]] == man["metrics"]["tasks"][t["name"]][t["metric"]]
        # delta-m recomputed by hand from the table
        terms = [(1 if higher[t] else -1) * (s["metrics"][t] - base[t]) / abs(base[t]) for t in tasks]
        assert s["delta_m"] == pytest.approx(100 * sum(terms) / len(terms))
        assert s["cost"]["phase1_steps"] > 0 and s["cost"]["steps_per_second"] > 0 and s["cost"]["wall_seconds"] > 0
        tci = {row["task"]: row["tci"] for row in s["tci"]}
        for t in r["tasks"]:
            la, lj = t["single_task_loss"], s["val_loss"][t["name"]]
            assert tci[t["name"]] == pytest.approx((la - lj) / la)
    # the Pareto front: nothing on it is dominated by another point
    pts = {s["name"]: s["metrics"] for s in r["strategies"]}
    assert r["pareto_front"] and set(r["pareto_front"]) <= set(pts) | {"single-task"}
    for n in r["pareto_front"]:
        if n in pts:
            assert not any(all((q[t] >= pts[n][t]) if higher[t] else (q[t] <= pts[n][t]) for t in tasks)
                           and q != pts[n] for m, q in pts.items() if m != n)
    # single-task baselines: one model per task, in the format `report --baselines` reads
    for t in tasks:
        man = json.loads((out / "single_task" / t / "phase2" / "manifest.json").read_text())
        assert man["tasks"] == [t]
    b = load_baselines(out / "baselines.json", tasks)
    assert set(b.val_loss["phase2"]) == set(tasks)
    assert load_baselines(out / "single_task", tasks).val_loss["phase2"] == b.val_loss["phase2"]
    # the page is self-contained and shows every strategy
    html = (out / "compare.html").read_text()
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in html and all(f">{s}<" in html for s in STRATEGY_NAMES)
    md = (out / "compare.md").read_text()
    assert "| single-task |" in md and "Pareto front:" in md
    # one seed (the default): a caveat opens both pages, and the order is not called a ranking
    assert r["n_seeds"] == 1 and r["single_seed_caveat"]
    assert md.startswith("# Strategy comparison\n\n> **Caveat: One seed") and "--seeds 3" in md
    assert html.index('id="single-seed-caveat"') < html.index("<table") and "Ranking by" not in md
    assert "only adaTT freezes the CGC gates during Phase 1" in md and "only adaTT freezes the CGC gates" in html
    by = {s["name"]: s for s in r["strategies"]}
    assert by["adatt"]["gates_frozen_from"] == ["phase 1 epoch 2"] and by["pcgrad"]["gates_frozen_from"] == ["phase 2"]
    assert json.loads((out / "manifest.json").read_text())["kind"] == "comparison"
    return r


def test_compare_on_generated_data(synthetic):
    check_comparison(synthetic, SYN_TASKS)


def test_compare_checkpoints_keep_each_strategys_state(synthetic):
    ck = load_checkpoint(synthetic / "runs" / "mocograd" / "phase2")
    saved = torch.load(synthetic / "runs" / "mocograd" / "phase2" / "checkpoint.pt", weights_only=True)
    assert ck.system.transfer.momentum.shape == saved["transfer.momentum"].shape and saved["transfer.momentum"].abs().sum() > 0
    torch.testing.assert_close(ck.system.transfer.momentum, saved["transfer.momentum"])
    gn = load_checkpoint(synthetic / "runs" / "gradnorm" / "phase2").system.transfer.loss_weights
    assert float(gn.sum()) == pytest.approx(len(SYN_TASKS), rel=1e-5)
    unc = load_checkpoint(synthetic / "runs" / "uncertainty" / "phase2").system.criterion
    assert unc.weighting == "uncertainty" and float(unc.log_vars.detach().abs().sum()) > 0


def test_compare_report_only_from_existing_runs(synthetic, tmp_path):
    out = tmp_path / "again"
    rc = main(["compare", "--out", str(out), "--runs", f"adatt={synthetic / 'runs/adatt'}",
               "--runs", f"mgda={synthetic / 'runs/mgda'}", "--singles", str(synthetic / "single_task")])
    assert rc == 0
    r = json.loads((out / "compare.json").read_text())
    first = json.loads((synthetic / "compare.json").read_text())
    assert [s["name"] for s in r["strategies"]] == ["adatt", "mgda"]
    assert r["strategies"][1]["delta_m"] == pytest.approx(first["strategies"][4]["delta_m"])
    # runs and baselines of one compare are comparable: nothing refused, nothing to warn about
    assert r["warnings"] == [] and "Warning:" not in (out / "compare.md").read_text()


# ------------------------------------- report only: the runs and baselines must be comparable


def _copy_run(src: Path, dst: Path, edit) -> Path:
    """A copy of a compare run whose phase1 and phase2 manifests ``edit`` changes in place."""
    import shutil

    shutil.copytree(src, dst)
    for m in dst.glob("phase*/manifest.json"):
        man = json.loads(m.read_text())
        edit(man)
        m.write_text(json.dumps(man))
    return dst


def _refused_compare(capsys, out: Path, *argv: str) -> str:
    capsys.readouterr()
    assert main(["compare", "--no-tracking", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    return err


@pytest.fixture(scope="module")
def all_rows_run(synthetic, tmp_path_factory):
    """A real joint run on every row (max_rows null), as `make train` makes it, of the fixture's
    tasks: not comparable with the fixture's runs and baselines (max_rows 1500)."""
    d = tmp_path_factory.mktemp("all-rows")
    data = next(synthetic.parent.glob("syn.parquet"))
    assert main(["train-phase1", "--no-tracking", "--data", str(data), "--data-config",
                 str(ROOT / "configs/data/synthetic.yaml"), "--config", str(TINY), "--out", str(d / "run" / "phase1"),
                 "--only-tasks", ",".join(SYN_TASKS), "--set", "max_rows=null",
                 "--set", "training.shared_expert_epochs=1"]) == 0
    return d / "run"


def test_report_only_refuses_baselines_of_another_max_rows(synthetic, all_rows_run, tmp_path, capsys):
    """The audit's case: a joint run on all rows against compare_tiny's baselines (max_rows 1500)
    is refused in one line naming both runs, the key and both values, as `report --baselines` does."""
    err = _refused_compare(capsys, tmp_path / "cmp", "--runs", f"adatt={all_rows_run}",
                           "--singles", str(synthetic / "single_task"))
    assert f"single-task baseline 'churn' ({synthetic / 'single_task/churn/phase2'}) is not comparable with " \
           f"run 'adatt' ({all_rows_run / 'phase1'}): `max_rows` (train_config.max_rows) is 1500 in the baseline, " \
           "None in the run" in err
    # report refuses the same baselines with the same key and values
    assert "`max_rows` (train_config.max_rows) is 1500 in the baseline, None in the joint run" in \
        _report_refusal(synthetic, all_rows_run, capsys, tmp_path)


def _report_refusal(synthetic: Path, run: Path, capsys, tmp_path: Path) -> str:
    from ple_adatt.artifacts import ArtifactError

    man = json.loads((run / "phase1" / "manifest.json").read_text())
    with pytest.raises(ArtifactError) as e:
        load_baselines(synthetic / "single_task", SYN_TASKS, joint={"phase2": (run / "phase1", man)})
    return str(e.value)


def test_report_only_refuses_runs_that_differ_from_each_other(synthetic, all_rows_run, tmp_path, capsys):
    err = _refused_compare(capsys, tmp_path / "cmp", "--runs", f"adatt={synthetic / 'runs/adatt'}",
                           "--runs", f"pcgrad={all_rows_run}")
    assert f"run 'pcgrad' ({all_rows_run / 'phase1'}) is not comparable with run 'adatt' " \
           f"({synthetic / 'runs/adatt/phase2'}): `max_rows` (train_config.max_rows) is None in 'pcgrad', 1500 in " \
           "'adatt'" in err

    def focal(man):
        man["train_config"].setdefault("tasks", {}).setdefault("ctr", {})["loss"] = "focal"

    other = _copy_run(synthetic / "runs/mgda", tmp_path / "mgda-focal", focal)
    err = _refused_compare(capsys, tmp_path / "cmp", "--runs", f"adatt={synthetic / 'runs/adatt'}",
                           "--runs", f"mgda={other}", "--singles", str(synthetic / "single_task"))
    assert f"run 'mgda' ({other / 'phase2'}) is not comparable with run 'adatt'" in err
    assert "`loss` (the loss of task 'ctr') is 'focal' in 'mgda', 'bce' in 'adatt'" in err

    def fewer_tasks(man):
        man["tasks"] = man["tasks"][:-1]

    other = _copy_run(synthetic / "runs/mgda", tmp_path / "mgda-4", fewer_tasks)
    err = _refused_compare(capsys, tmp_path / "cmp", "--runs", f"adatt={synthetic / 'runs/adatt'}",
                           "--runs", f"mgda={other}")
    assert f"run 'mgda' ({other / 'phase2'}) is not comparable with run 'adatt'" in err
    assert "it trains tasks ['ctr', 'cvr', 'churn', 'ltv'], 'adatt' trains ['ctr', 'cvr', 'churn', 'ltv', 'nba']" in err


def test_report_only_allows_what_a_comparison_varies_and_warns_about_training(synthetic, tmp_path, capsys):
    """Strategy, transfer.* and seed may differ; another training schedule is a warning (as
    `report --baselines` warns), shown on stderr and on both pages."""

    def varied(man):
        man["train_config"]["seed"] = 7
        man["train_config"]["transfer"]["mgda"] = {"on": "representation"}
        man["train_config"]["training"]["shared_expert_epochs"] = 5

    other = _copy_run(synthetic / "runs/mgda", tmp_path / "mgda-5", varied)
    out = tmp_path / "cmp"
    capsys.readouterr()
    assert main(["compare", "--no-tracking", "--out", str(out), "--runs", f"adatt={synthetic / 'runs/adatt'}",
                 "--runs", f"mgda={other}", "--singles", str(synthetic / "single_task")]) == 0
    err = capsys.readouterr().err
    warning = ("run 'mgda' was trained differently from run 'adatt' (mgda vs adatt): training.shared_expert_epochs "
               "5 vs 2; the comparison then also reflects these differences")
    assert warning in err and "seed" not in err and "transfer" not in err
    r = json.loads((out / "compare.json").read_text())
    assert r["warnings"] == [warning]
    assert f"> **Warning: {warning}.**" in (out / "compare.md").read_text()
    assert "input-warning" in (out / "compare.html").read_text()


def test_report_only_warns_about_runs_on_other_features(synthetic, tmp_path, capsys):
    """Same data and split, another feature set or cluster column: a different model of the same
    tasks, named in a warning (it once passed silently)."""

    def fewer_features(man):
        man["data_config"]["numeric_features"] = man["data_config"]["numeric_features"][:2]

    other = _copy_run(synthetic / "runs/mgda", tmp_path / "mgda-2f", fewer_features)
    capsys.readouterr()
    assert main(["compare", "--no-tracking", "--out", str(tmp_path / "cmp"), "--runs",
                 f"adatt={synthetic / 'runs/adatt'}", "--runs", f"mgda={other}"]) == 0
    err = capsys.readouterr().err
    assert "run 'mgda' was trained differently from run 'adatt' (mgda vs adatt): data_config.numeric_features" in err


def test_compare_refuses_training_options_with_runs(synthetic, tmp_path, capsys):
    """--data (and the other training options) with --runs would be ignored: refused, as --seeds is."""
    err = _refused_compare(capsys, tmp_path / "cmp", "--runs", f"adatt={synthetic / 'runs/adatt'}",
                           "--data", str(synthetic.parent / "syn.parquet"))
    assert "--data: only used to train new runs; with --runs (report only) nothing trains" in err
    err = _refused_compare(capsys, tmp_path / "cmp", "--runs", f"adatt={synthetic / 'runs/adatt'}",
                           "--config", str(TINY), "--set", "seed=1", "--strategies", "adatt")
    assert "--config, --set, --strategies: only used to train new runs" in err and "drop them" in err


def test_compare_rejects_unknown_strategies_and_missing_inputs(tmp_path, capsys):
    rc = main(["compare", "--out", str(tmp_path / "x"), "--strategies", "adatt,cagrad", "--data", "d",
               "--data-config", "c", "--config", "c"])
    err = capsys.readouterr().err
    assert rc == 2 and "--strategies: unknown ['cagrad']; valid: adatt, pcgrad, mocograd, gradnorm, mgda" in err
    rc = main(["compare", "--out", str(tmp_path / "x")])
    assert rc == 2 and "training needs --data, --data-config, --config" in capsys.readouterr().err


def _leftovers(out: Path) -> list[str]:
    """``out`` and its temporary siblings (``.<name>.tmp-*``), whichever exist."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


def test_compare_checks_every_strategys_config_before_training_any(tmp_path, capsys):
    data = write_parquet(tmp_path / "syn.parquet", rows=600, seed=0)
    out = tmp_path / "cmp"
    rc = main(["compare", "--no-tracking", "--data", str(data), "--data-config", str(ROOT / "configs/data/synthetic.yaml"),
               "--config", str(TINY), "--tasks", "ctr,cvr", "--strategies", "adatt,mgda", "--no-single-task",
               "--out", str(out), "--set", "training.cuda_graph=true", "--set", "transfer.mgda.solver=host"])
    captured = capsys.readouterr()
    assert rc == 2
    assert "key `training.cuda_graph` cannot replay `transfer.mgda.solver: host`" in captured.err
    assert "--set training.cuda_graph=false" in captured.err  # the way out, for production.yaml's graphs
    assert "[config of strategy 'mgda'; compare checks every run's config first, nothing was trained]" in captured.err
    assert "=== compare 1/" not in captured.out  # adatt did not train first
    assert _leftovers(out) == []


def test_a_compare_that_fails_mid_way_leaves_no_partial_output(tmp_path, capsys):
    """adatt trains, then mocograd diverges (a calibration strength of 1e30): the whole compare
    fails, and neither adatt's run nor a temporary directory is left; an older OUT stays as it was."""
    data = write_parquet(tmp_path / "syn.parquet", rows=800, seed=0)
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.md").write_text("an earlier comparison")
    rc = main(["compare", "--no-tracking", "--data", str(data), "--data-config", str(ROOT / "configs/data/synthetic.yaml"),
               "--config", str(TINY), "--tasks", "ctr,cvr,churn", "--strategies", "adatt,mocograd", "--no-single-task",
               "--out", str(out), "--set", "training.shared_expert_epochs=1", "--set", "transfer.mocograd.strength=1e30"])
    captured = capsys.readouterr()
    assert rc == 2 and "training diverged" in captured.err, captured.err
    assert "=== compare 1/2: strategy adatt (0.0 min so far) ===" in captured.out
    assert "=== compare 2/2: strategy mocograd (" in captured.out and "min left) ===" in captured.out
    assert "phase 2 checkpoint written" in captured.out
    assert _leftovers(out) == ["cmp"] and [p.name for p in out.iterdir()] == ["compare.md"]
    assert (out / "compare.md").read_text() == "an earlier comparison"


def test_a_compare_refuses_an_out_that_holds_other_outputs(tmp_path, capsys):
    """A compare replaces OUT whole, so `--out runs` must not delete runs/validate and the rest."""
    out = tmp_path / "runs"
    (out / "validate").mkdir(parents=True)
    rc = main(["compare", "--no-tracking", "--data", str(tmp_path / "none.parquet"), "--data-config",
               str(ROOT / "configs/data/synthetic.yaml"), "--config", str(TINY), "--strategies", "adatt",
               "--no-single-task", "--out", str(out)])
    assert rc == 2 and "holds validate, which a compare did not write" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["validate"]


# ---------------------------------------------------------------------------- UCI Adult


@pytest.mark.skipif(not ADULT.is_file(), reason=f"UCI Adult not found at {ADULT}; set PLE_ADATT_ADULT_PATH")
def test_compare_on_adult(tmp_path):
    data = tmp_path / "adult.parquet"
    assert main(["convert-adult", "--src", str(ADULT), "--out", str(data)]) == 0
    out = tmp_path / "cmp"
    rc = main(["compare", "--data", str(data), "--data-config", str(ROOT / "configs/data/adult.yaml"),
               "--config", str(TINY), "--out", str(out), "--set", "max_rows=2000"])
    assert rc == 0
    r = check_comparison(out, ["income", "marital_status", "occupation", "hours_per_week", "education_level"])
    assert {t["metric"] for t in r["tasks"]} == {"auc", "accuracy", "rmse"}
