"""The compare pipeline variant: a parallel-for over strategies (and seeds), a fan-in compare
step; the main pipeline is left as it was. One real kfp.local run of a 2-seed compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines.compare_pipeline import build_compare_pipeline, main
from pipelines.pipeline import TASKS

ROOT = Path(__file__).resolve().parents[2]


def test_compare_pipeline_fans_out_over_strategies_and_collects_the_checkpoints(tmp_path):
    out = tmp_path / "cmp.yaml"
    assert main(["--out", str(out), "--strategies", "adatt,pcgrad,mgda", "--registry", "reg.example.com/r",
                 "--single-tasks", "none"]) == 0
    spec, platform = list(yaml.safe_load_all(out.read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"importer", "validate", "for-loop-2", "compare"}
    loop = tasks["for-loop-2"]
    assert yaml.safe_load(loop["parameterIterator"]["items"]["raw"]) == ["adatt", "pcgrad", "mgda"]
    inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"train-phase1", "train-phase2"}
    assert inner["train-phase1"]["inputs"]["parameters"]["strategy"]["componentInputParameter"].startswith(
        "pipelinechannel--loop-item")
    assert "seed" not in inner["train-phase1"]["inputs"]["parameters"]  # one seed: the config's, as before
    src = tasks["compare"]["inputs"]["artifacts"]["checkpoints"]["taskOutputArtifact"]
    assert src == {"outputArtifactKey": "pipelinechannel--train-phase2-checkpoint", "producerTask": "for-loop-2"}
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values() if "container" in e}
    assert any(i.startswith("reg.example.com/r/ple-adatt-cuda:") for i in images)
    assert "train-phase1" in str(platform)  # GPU toleration / shm on the training steps


def test_compare_pipeline_rejects_unknown_strategies(capsys):
    with pytest.raises(ValueError, match=r"unknown strategies \['cagrad'\]; valid: adatt, pcgrad"):
        build_compare_pipeline(["adatt", "cagrad"])
    assert main(["--out", "/dev/null", "--strategies", "cagrad"]) == 2
    assert TASKS == ("validate", "train-phase1", "train-phase2", "report", "register")  # main pipeline unchanged


def test_compare_pipeline_trains_single_task_baselines_in_a_second_parallel_for(tmp_path):
    out = tmp_path / "cmp.yaml"
    assert main(["--out", str(out), "--strategies", "adatt,pcgrad", "--data-config", "configs/data/adult.yaml"]) == 0
    spec, _ = list(yaml.safe_load_all(out.read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    loops = {k: v for k, v in tasks.items() if k.startswith("for-loop")}
    items = {k: yaml.safe_load(v["parameterIterator"]["items"]["raw"]) for k, v in loops.items()}
    from ple_adatt.config import load_data_config

    adult_tasks = load_data_config("configs/data/adult.yaml").task_names
    assert sorted(items.values(), key=len) == [["adatt", "pcgrad"], adult_tasks]
    single_loop = next(k for k, v in items.items() if v == adult_tasks)
    inner = spec["components"][loops[single_loop]["componentRef"]["name"]]["dag"]["tasks"]
    p1 = next(t for t in inner.values() if t["componentRef"]["name"].startswith("comp-train-phase1"))
    assert p1["inputs"]["parameters"]["only_tasks"]["componentInputParameter"].startswith("pipelinechannel--loop-item")
    assert p1["inputs"]["parameters"]["strategy"]["runtimeValue"]["constant"] == "equal"
    singles = tasks["compare"]["inputs"]["artifacts"]["singles"]["taskOutputArtifact"]
    assert singles["producerTask"] == single_loop


def _loops(spec: dict) -> dict[str, tuple[list, dict]]:
    """for-loop task -> (its items, the tasks inside it)."""
    return {k: (yaml.safe_load(v["parameterIterator"]["items"]["raw"]),
                spec["components"][v["componentRef"]["name"]]["dag"]["tasks"])
            for k, v in spec["root"]["dag"]["tasks"].items() if k.startswith("for-loop")}


def _selects(param: dict, field: str) -> bool:
    return (param["componentInputParameter"].startswith("pipelinechannel--loop-item")
            and param["parameterExpressionSelector"] == f'parseJson(string_value)["{field}"]')


@pytest.mark.parametrize("seeds", ["2", "0,1", "0,1,"])
def test_compare_pipeline_with_seeds_branches_per_strategy_and_seed_and_per_task_and_seed(tmp_path, seeds):
    out = tmp_path / "cmp.yaml"
    assert main(["--out", str(out), "--strategies", "adatt,pcgrad", "--single-tasks", "ctr,cvr",
                 "--seeds", seeds]) == 0
    spec, _ = list(yaml.safe_load_all(out.read_text()))
    loops = _loops(spec)
    by_items = {tuple(sorted(items[0])): (k, items, inner) for k, (items, inner) in loops.items()}
    loop, items, inner = by_items[("seed", "strategy")]
    assert items == [{"strategy": s, "seed": n} for n in ("0", "1") for s in ("adatt", "pcgrad")]
    p1 = inner["train-phase1"]["inputs"]["parameters"]
    assert _selects(p1["seed"], "seed") and _selects(p1["strategy"], "strategy")
    assert "seed" not in inner["train-phase2"]["inputs"]["parameters"]  # Phase 2 keeps the checkpoint's seed
    assert spec["root"]["dag"]["tasks"][loop]["iteratorPolicy"]["parallelismLimit"] == 4
    single, items, inner = by_items[("only_tasks", "seed")]
    assert items == [{"only_tasks": t, "seed": n} for n in ("0", "1") for t in ("ctr", "cvr")]
    p1 = next(t for n, t in inner.items() if n.startswith("train-phase1"))["inputs"]["parameters"]
    assert _selects(p1["seed"], "seed") and _selects(p1["only_tasks"], "only_tasks")
    assert p1["strategy"]["runtimeValue"]["constant"] == "equal"
    compare = spec["root"]["dag"]["tasks"]["compare"]["inputs"]["artifacts"]
    assert compare["checkpoints"]["taskOutputArtifact"]["producerTask"] == loop
    assert compare["singles"]["taskOutputArtifact"]["producerTask"] == single
    assert "x seeds 0,1" in spec["pipelineInfo"]["description"]


def test_compare_pipeline_seed_list_is_kept_as_given_and_one_seed_list_still_sets_the_seed(tmp_path):
    out = tmp_path / "cmp.yaml"
    assert main(["--out", str(out), "--strategies", "adatt", "--single-tasks", "none", "--seeds", "7,"]) == 0
    spec, _ = list(yaml.safe_load_all(out.read_text()))
    ((items, inner),) = _loops(spec).values()
    assert items == [{"strategy": "adatt", "seed": "7"}] and "seed" in inner["train-phase1"]["inputs"]["parameters"]


@pytest.mark.parametrize(("seeds", "message"), [
    ("0,0", "--seeds '0,0': names a seed twice"),
    ("three", "--seeds 'three': expected a count (e.g. 3) or a comma-separated list"),
    ("0", "--seeds '0': a count must be 1.."),
])
def test_compare_pipeline_refuses_bad_seeds_in_one_line(tmp_path, capsys, seeds, message):
    assert main(["--out", str(tmp_path / "cmp.yaml"), "--seeds", seeds]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"compare_pipeline: error: {message}") and "\n" not in err
    assert not (tmp_path / "cmp.yaml").exists()


@pytest.mark.integration
@pytest.mark.slow  # 14 kfp.local steps: 100-130 s on the 2-core machine (make test-all)
def test_two_seed_compare_pipeline_runs_under_kfp_local_with_the_cli_statistics(tmp_path):
    """A tiny 2-seed compare (2 strategies, 1 baseline task) end to end through kfp.local; its
    comparison equals what `ple-adatt compare --runs` reports on the same checkpoints."""
    from pipelines.local import run_locally
    from pipelines.runs import read_run_file
    from ple_adatt.cli import main as cli_main
    from ple_adatt.data.synthetic import write_parquet

    data = write_parquet(tmp_path / "tiny.parquet", rows=1500, seed=1)
    package = tmp_path / "cmp.yaml"
    assert main(["--out", str(package), "--strategies", "adatt,pcgrad", "--single-tasks", "ctr", "--seeds", "2"]) == 0
    run_dir = run_locally(data=data, package=package, train_config=str(ROOT / "configs/train/compare_tiny.yaml"),
                          overrides=[], root=tmp_path / "runs", mlflow_tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                          gx_rows="all")
    assert read_run_file(run_dir)["status"] == "succeeded"
    mans = {}
    for f in sorted(run_dir.glob("for-loop-*/train-phase2*/checkpoint/manifest.json")):
        man = json.loads(f.read_text())
        cfg = man["train_config"]
        # each branch trained its own seed, with PCGrad's / MoCoGrad's task orders seeded alike
        assert cfg["seed"] == cfg["transfer"]["pcgrad"]["seed"] == cfg["transfer"]["mocograd"]["seed"]
        role = man["strategy"] if len(man["tasks"]) > 1 else f"single:{man['tasks'][0]}"
        mans[(role, cfg["seed"])] = f.parent
    assert sorted(mans) == [(r, s) for r in ("adatt", "pcgrad", "single:ctr") for s in (0, 1)]
    report = json.loads((run_dir / "compare" / "comparison" / "compare.json").read_text())
    assert report["seeds"] == [0, 1] and report["baselines_paired"] and not report["single_seed_caveat"]
    assert report["single_task"]["seeds"] == [0, 1]
    assert [(s["name"], [p["seed"] for p in s["seeds"]]) for s in report["strategies"]] == [
        ("adatt", [0, 1]), ("pcgrad", [0, 1])]
    (paired,) = report["paired_vs_reference"]["comparisons"]
    assert paired["other"] == "pcgrad" and paired["n"] == 2 and paired["ci95"] is not None

    # the CLI's report-only compare over the same checkpoints, laid out as `compare --seeds` writes them
    singles = tmp_path / "single_task" / "ctr"
    singles.mkdir(parents=True)
    for s in (0, 1):
        (singles / f"seed-{s}").symlink_to(mans[("single:ctr", s)])
    cli_out = tmp_path / "cli"
    assert cli_main(["compare", "--out", str(cli_out), "--no-tracking",
                     *[a for (r, s), p in mans.items() if not r.startswith("single") for a in ("--runs", f"{r}={p}")],
                     "--singles", str(singles.parent)]) == 0
    cli = json.loads((cli_out / "compare.json").read_text())

    def numbers(r: dict) -> tuple:
        return ([(s["name"], s["delta_m"], s["delta_m_sd"], s["metrics"], [p["delta_m"] for p in s["seeds"]])
                 for s in r["strategies"]], r["paired_vs_reference"], r["ranking_text"], r["baselines_paired"])

    assert numbers(report) == numbers(cli)
