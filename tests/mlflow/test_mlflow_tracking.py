"""Tracking: nested stage runs, per-epoch metrics, events, matrices, stores and faults."""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlhelpers import BIN, DATA_CONFIG, PIPELINE_RUN_ID, TRAIN_CONFIG, Server, Trained, free_port

import ple_adatt
from ple_adatt.config import TrackingConfig, TrainConfig
from ple_adatt.stages.common import NullTracker, stage_tracking
from ple_adatt.tracking import (
    TrackingError,
    epoch_metrics,
    flatten_params,
    metric_name,
    resolve_target,
    stage_run,
)


def _runs(client: MlflowClient, experiment: str = "ple-adatt", filt: str = "") -> list:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    return client.search_runs([exp.experiment_id], filt)


def _args(**kw: object) -> argparse.Namespace:
    base = {"config": str(TRAIN_CONFIG), "overrides": [], "pipeline_run_id": None, "no_tracking": False}
    return argparse.Namespace(**{**base, **kw})


def test_training_stages_are_nested_runs_of_the_pipeline_run(trained: Trained) -> None:
    client = MlflowClient(trained.tracking_uri)
    runs = _runs(client, filt=f"tags.pipeline_run_id = '{PIPELINE_RUN_ID}'")
    parents = [r for r in runs if r.data.tags.get("ple_adatt_role") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["kfp_run_id"] == PIPELINE_RUN_ID
    assert parent.info.status == "FINISHED"
    stages = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("ple_adatt_role") == "stage"}
    assert {"train-phase1", "train-phase2"} <= set(stages)
    for name in ("train-phase1", "train-phase2"):
        run = stages[name]
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id, name
        assert tags["component_version"] == ple_adatt.__version__
        assert tags["kfp_run_id"] == PIPELINE_RUN_ID
        assert run.info.status == "FINISHED"
        # the flattened config, with the --set overrides applied
        assert run.data.params["transfer.adatt.freeze_epoch"] == "2"
        assert run.data.params["training.shared_expert_epochs"] == "3"
        assert "data.tasks.ctr.type" in run.data.params
    p1, p2 = stages["train-phase1"], stages["train-phase2"]
    # per-epoch metrics, the seed's names
    hist = client.get_metric_history(p1.info.run_id, "task_losses/ctr")
    assert sorted(m.step for m in hist) == [1, 2, 3]  # epochs as the console numbers them
    for key in ("raw_losses/ctr", "val/ctr/auc", "val/brand_prediction/recall_at_10", "val_loss", "lr",
                "transfer_share", "adatt_phase"):
        assert len(client.get_metric_history(p1.info.run_id, key)) == 3, key
    phases = sorted(client.get_metric_history(p1.info.run_id, "adatt_phase"), key=lambda m: m.step)
    assert [m.value for m in phases] == [0.0, 1.0, 1.0]  # warmup, dynamic, dynamic (freezes after epoch 2)
    # events as metrics whose value (and step) is the epoch the console printed them in, from 1
    # ("event: adatt_freeze_epoch (phase1, epoch 3)"); the manifest keeps 0-based epochs
    man1 = json.loads((trained.phase1 / "manifest.json").read_text())
    ev = {e["event"]: e["epoch"] for e in man1["events"]}
    assert ev["adatt_freeze_epoch"] == ev["cgc_frozen_epoch"] == 2
    assert p1.data.metrics["adatt_freeze_epoch"] == 3.0
    assert p1.data.metrics["cgc_frozen_epoch"] == 3.0
    assert [m.step for m in client.get_metric_history(p1.info.run_id, "adatt_freeze_epoch")] == [3]
    assert p2.data.metrics["phase2_start"] == 1.0
    assert [m.step for m in client.get_metric_history(p2.info.run_id, "phase2_start")] == [1]
    assert sorted(m.step for m in client.get_metric_history(p2.info.run_id, "task_losses/ctr")) == [1]
    # final metrics and lineage of the checkpoint
    man = json.loads((trained.phase2 / "manifest.json").read_text())
    assert p2.data.metrics["final/ctr/auc"] == pytest.approx(man["metrics"]["tasks"]["ctr"]["auc"])
    assert p2.data.tags["checkpoint.sha256"] == man["files"]["checkpoint.pt"]
    assert p2.data.tags["input.data"] == man["inputs"]["data"]
    # artifacts: matrices per epoch (JSON) and the checkpoint
    mats = [a.path for a in client.list_artifacts(p1.info.run_id, "matrices")]
    assert mats == [f"matrices/phase1_epoch_{e:03d}.json" for e in (1, 2, 3)]
    local = client.download_artifacts(p1.info.run_id, "matrices/phase1_epoch_003.json")
    mat = json.loads(Path(local).read_text())
    assert len(mat["tasks"]) == 16 and len(mat["affinity"]) == 16 and len(mat["transfer_matrix"][0]) == 16
    assert mat["transfer_phase"] == "dynamic" and mat["epoch"] == 3 and mat["manifest_epoch"] == 2
    frozen = sorted(client.get_metric_history(p1.info.run_id, "transfer_frozen"), key=lambda m: m.step)
    assert [m.value for m in frozen] == [0.0, 0.0, 1.0]  # adaTT froze at the end of epoch 2
    ck = {a.path for a in client.list_artifacts(p2.info.run_id, "checkpoint")}
    assert {"checkpoint/checkpoint.pt", "checkpoint/manifest.json", "checkpoint/preprocessing.json"} <= ck


def test_default_store_is_sqlite_in_the_working_directory(local_store: Path, trained: Trained) -> None:
    man = json.loads((trained.phase1 / "manifest.json").read_text())
    args = _args()
    with stage_run("train-phase1", args) as tracker:
        for record in man["history"]:
            tracker.log_epoch(record)
        tracker.log_artifact(trained.phase1, "checkpoint")
    assert args.pipeline_run_id.startswith("local-")  # made once, shared by the next stage
    assert (local_store / "mlflow.db").exists()
    client = MlflowClient(f"sqlite:///{local_store / 'mlflow.db'}")
    (run,) = [r for r in _runs(client) if r.data.tags.get("stage") == "train-phase1"]
    assert run.info.artifact_uri.startswith((local_store / "mlartifacts").as_uri())
    assert (local_store / "mlartifacts").is_dir()
    assert run.data.metrics["adatt_freeze_epoch"] == 3.0
    assert len(client.get_metric_history(run.info.run_id, "task_losses/ctr")) == 3


def test_one_parent_per_pipeline_run_and_a_failed_stage_fails_it(local_store: Path) -> None:
    args = _args(pipeline_run_id="pipe-7")
    with stage_run("validate", _args(pipeline_run_id="pipe-7", config=None)) as t:
        t.log_metrics({"rows": 10})
    with pytest.raises(RuntimeError, match="boom"), stage_run("train-phase1", args):
        raise RuntimeError("boom")
    client = MlflowClient(f"sqlite:///{local_store / 'mlflow.db'}")
    runs = _runs(client, filt="tags.pipeline_run_id = 'pipe-7'")
    parents = [r for r in runs if r.data.tags["ple_adatt_role"] == "pipeline"]
    stages = {r.data.tags["stage"]: r for r in runs if r.data.tags["ple_adatt_role"] == "stage"}
    assert len(parents) == 1 and set(stages) == {"validate", "train-phase1"}
    assert stages["validate"].info.status == "FINISHED"
    assert stages["train-phase1"].info.status == "FAILED"
    assert stages["train-phase1"].data.tags["error"] == "RuntimeError: boom"
    assert parents[0].info.status == "FAILED" and parents[0].data.tags["failed_stage"] == "train-phase1"


def test_stage_tracking_hook_uses_this_module_and_no_tracking_opts_out(local_store: Path) -> None:
    with stage_tracking("train-phase1", _args(no_tracking=True)) as t:
        assert type(t) is NullTracker
    assert not (local_store / "mlflow.db").exists()
    with stage_tracking("train-phase1", _args()) as t:
        assert type(t).__name__ == "StageTracker"


def test_server_down_fails_after_a_bounded_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = TrainConfig(tracking=TrackingConfig(retries=2, retry_wait_s=0.1))
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=r"did not answer after 3 attempts .*MLFLOW_TRACKING_URI"), \
            stage_run("train-phase1", _args(config=None), train_config=cfg):
        pass
    assert time.monotonic() - t0 < 10


def test_server_refusing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(503)
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{httpd.server_port}")
        cfg = TrainConfig(tracking=TrackingConfig(retries=1, retry_wait_s=0.05))
        with pytest.raises(TrackingError, match="HTTP 503"), stage_run("register", None, train_config=cfg):
            pass
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_require_server_refuses_the_local_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrackingError, match="require_server is true .*MLFLOW_TRACKING_URI=http"):
        resolve_target(TrackingConfig(require_server=True))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    t = resolve_target(TrackingConfig(require_server=True, tracking_uri="sqlite:///x.db"))
    assert t.uri == "http://mlflow.example:5000" and t.source == "MLFLOW_TRACKING_URI"


def test_uri_precedence_env_then_config_then_default(monkeypatch: pytest.MonkeyPatch, server_env: Server) -> None:
    assert resolve_target(TrackingConfig(tracking_uri="sqlite:///cfg.db")).uri == server_env.uri
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_target(TrackingConfig(tracking_uri="sqlite:///cfg.db")).uri == "sqlite:///cfg.db"
    default = resolve_target(TrackingConfig())
    assert default.uri == f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    assert default.artifact_location == (Path.cwd() / "mlartifacts").as_uri()


def test_flatten_params_and_metric_names() -> None:
    flat = flatten_params(TrainConfig())
    assert flat["training.learning_rate"] == "0.0005"
    assert flat["model.logit_transfer_edges"] == '[["ctr", "cvr"], ["cvr", "ltv"]]'
    assert flat["registry.champion_alias"] == "champion"
    assert metric_name("val/brand_prediction/recall@10") == "val/brand_prediction/recall_at_10"
    record = {"phase": "phase1", "epoch": 0, "step": 5, "lr": 0.1, "transfer_phase": "warmup",
              "task_losses": {"ctr": 0.5}, "raw_losses": {"ctr": 0.4}, "transfer_share": 0.2,
              "val": {"val_loss": 1.0, "tasks": {"ctr": {"auc": float("nan"), "loss": 0.3, "by_cluster": {}}}},
              "cgc_frozen": False, "transfer_frozen": False, "skipped_batches": 0, "seconds": 1.0}
    m = epoch_metrics(record)
    assert m["task_losses/ctr"] == 0.5 and m["adatt_phase"] == 0.0 and m["val/ctr/loss"] == 0.3
    assert "val/ctr/auc" not in m  # NaN is not logged


@pytest.mark.parametrize(("uri", "why"), [
    ("localhost:5000", r"a host and port without a scheme \(did you mean http://localhost:5000\?\)"),
    ("127.0.0.1:5000", r"did you mean http://127.0.0.1:5000\?"),
    ("foo://bar", "'foo' is not a scheme MLflow can track to"),
    ("file:///proc/nonexist", "MLFLOW_ALLOW_FILE_STORE=true"),
    ("sqlite:////proc/nonexist/mlflow.db", "the directory /proc/nonexist of its database does not exist"),
])
def test_a_malformed_tracking_uri_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, local_store: Path,
                                                     uri: str, why: str) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingError) as info, stage_run("validate", _args(config=None)):
        pass
    msg = str(info.value)
    assert msg.startswith(f"MLflow tracking URI {uri!r} (from $MLFLOW_TRACKING_URI) cannot be used: ")
    assert "fix MLFLOW_TRACKING_URI" in msg and "\n" not in msg
    assert re.search(why, msg), msg
    assert not (local_store / "mlflow.db").exists()  # no silent fallback to the local store


def test_a_malformed_uri_from_the_config_names_the_config_key(monkeypatch: pytest.MonkeyPatch,
                                                              local_store: Path) -> None:
    cfg = TrainConfig(tracking=TrackingConfig(tracking_uri="mlflow.example:5000"))
    with pytest.raises(TrackingError, match=r"^MLflow tracking URI 'mlflow.example:5000' \(from "
                       r"tracking.tracking_uri in the train config\) .*; fix tracking.tracking_uri "), \
            stage_run("register", None, train_config=cfg):
        pass


def test_the_cli_reports_a_malformed_uri_in_one_line_with_exit_code_2(tmp_path: Path) -> None:
    from ple_adatt.data.synthetic import write_parquet

    data = write_parquet(tmp_path / "d.parquet", rows=50, seed=0)  # inputs that exist: the URI is the error
    env = {**os.environ, "MLFLOW_TRACKING_URI": "localhost:5000", "PLE_ADATT_NO_TRACKING": ""}
    proc = subprocess.run([str(BIN / "ple-adatt"), "validate", "--data", str(data),
                           "--config", str(DATA_CONFIG), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "ple-adatt validate: error: MLflow tracking URI 'localhost:5000' (from $MLFLOW_TRACKING_URI) cannot be "
        "used: it is a host and port without a scheme (did you mean http://localhost:5000?); fix "
        "MLFLOW_TRACKING_URI (a server: http://<host>:<port>, a local store: sqlite:///<path>/mlflow.db), or "
        "rerun with --no-tracking to skip tracking for a local stage"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_sqlite_store_in_a_missing_directory_is_refused_before_any_work(tmp_path: Path) -> None:
    """A mistyped store path must not create a new empty store (MLflow makes the directories)."""
    from ple_adatt.data.synthetic import write_parquet
    from ple_adatt.tracking import origin_env

    data = write_parquet(tmp_path / "d.parquet", rows=50, seed=0)
    typo = tmp_path / "typo" / "dir"
    uri = f"sqlite:///{typo / 'x.db'}"
    cmd = [str(BIN / "ple-adatt"), "validate", "--data", str(data), "--config", str(DATA_CONFIG),
           "--out", str(tmp_path / "out")]
    base = {**os.environ, "PLE_ADATT_NO_TRACKING": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**base, "MLFLOW_TRACKING_URI": uri},
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"ple-adatt validate: error: MLflow tracking URI {uri!r} (from $MLFLOW_TRACKING_URI) "
                           f"cannot be used: the directory {typo} of its database does not exist"), line
    assert not (tmp_path / "typo").exists() and not (tmp_path / "out").exists()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()
    # set by a launcher (make stage): the line names the launcher's setting, not the variable
    env = {**base, **origin_env(uri, "MLFLOW_TRACKING_URI= of make stage", "fix MLFLOW_TRACKING_URI= of make stage")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "(from MLFLOW_TRACKING_URI= of make stage)" in proc.stderr, proc.stderr
    assert "fix MLFLOW_TRACKING_URI= of make stage" in proc.stderr and not (tmp_path / "typo").exists()
    # the default store in the working directory, and a store in a directory that exists, still work
    (tmp_path / "ok").mkdir()
    ok = f"sqlite:///{tmp_path / 'ok' / 'x.db'}"
    assert resolve_target(TrackingConfig()).uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    from ple_adatt.tracking import TrackingTarget, check_uri

    for good in (ok, "sqlite:///mlflow.db", resolve_target(TrackingConfig()).uri):
        check_uri(TrackingTarget(good, "e", "argument", 0, 0.0, None))


def test_loading_a_model_from_a_malformed_uri_does_not_suggest_skipping_tracking() -> None:
    from ple_adatt.registry import load_registered_model

    with pytest.raises(TrackingError) as e:
        load_registered_model("models:/m@champion", tracking_uri="localhost:5000")
    assert "'localhost:5000' (from " in str(e.value) and "did you mean http://localhost:5000?" in str(e.value)
    assert "--no-tracking" not in str(e.value)


@pytest.mark.parametrize("pipeline_run_id", ["it's-7", 'say "hi"'])
def test_a_pipeline_run_id_with_a_quote_finds_its_parent_run(local_store: Path, pipeline_run_id: str) -> None:
    for stage in ("validate", "train-phase1"):
        with stage_run(stage, _args(pipeline_run_id=pipeline_run_id, config=None)):
            pass
    client = MlflowClient(f"sqlite:///{local_store / 'mlflow.db'}")
    runs = [r for r in _runs(client) if r.data.tags.get("pipeline_run_id") == pipeline_run_id]
    parents = [r for r in runs if r.data.tags["ple_adatt_role"] == "pipeline"]
    assert len(parents) == 1 and len(runs) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in runs if r.data.tags["ple_adatt_role"] == "stage"} == {
        parents[0].info.run_id}


def test_a_pipeline_run_id_with_both_quotes_is_refused_clearly(local_store: Path) -> None:
    with pytest.raises(TrackingError, match=r"--pipeline-run-id .*both a single and a double quote"), \
            stage_run("validate", _args(pipeline_run_id="a'b\"c", config=None)):
        pass
