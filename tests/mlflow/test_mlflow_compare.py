"""`ple-adatt compare` tracks every training run, tagged with its strategy, under one parent run."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from ple_adatt.cli import main
from ple_adatt.data.synthetic import write_parquet

ROOT = Path(__file__).resolve().parents[2]


def test_compare_runs_are_tagged_with_their_strategy(local_store: Path) -> None:
    data = write_parquet(local_store / "syn.parquet", rows=1200, seed=1, brand_vocab=100)
    rc = main(["compare", "--data", str(data), "--data-config", str(ROOT / "configs/data/synthetic.yaml"),
               "--config", str(ROOT / "configs/train/compare_tiny.yaml"), "--tasks", "ctr,ltv",
               "--strategies", "pcgrad,mgda", "--out", str(local_store / "cmp"),
               "--set", "training.shared_expert_epochs=1"])
    assert rc == 0
    client = MlflowClient(f"sqlite:///{local_store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ple-adatt")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    train = [r for r in runs if r.data.tags.get("stage", "").startswith("train-")]
    by = {(r.data.tags["compare_role"], r.data.tags["strategy"], r.data.tags.get("task"), r.data.tags["stage"])
          for r in train}
    assert {("joint", "pcgrad", None, "train-phase1"), ("joint", "mgda", None, "train-phase2"),
            ("single_task", "equal", "ctr", "train-phase1"), ("single_task", "equal", "ltv", "train-phase2")} <= by
    assert len(train) == 8
    # the checkpoint's own manifest agrees with the tag
    assert all(r.data.params["transfer.strategy"] == r.data.tags["strategy"] for r in train)
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs if r.data.tags.get("ple_adatt_role") == "stage"}
    assert len(parents) == 1  # one parent run for the whole comparison
    cmp = [r for r in runs if r.data.tags.get("stage") == "compare"]
    assert len(cmp) == 1 and cmp[0].data.tags["pareto_front"]
