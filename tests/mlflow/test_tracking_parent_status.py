"""The pipeline's parent run is FINISHED only when the run's last stage finishes, KILLED on an
interrupt, and errors name where the tracking URI came from (real MLflow sqlite stores)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ple_adatt.config import TrackingConfig
from ple_adatt.tracking import (
    ORIGIN_ENV,
    TrackingError,
    end_parent_run,
    origin_env,
    resolve_target,
    stage_run,
)


def _args(run_id: str) -> argparse.Namespace:
    return argparse.Namespace(config=None, overrides=[], pipeline_run_id=run_id, no_tracking=False)


def _parent(client: MlflowClient, run_id: str):
    exp = client.get_experiment_by_name("ple-adatt")
    (p,) = client.search_runs([exp.experiment_id], f"tags.pipeline_run_id = '{run_id}' "
                                                   "and tags.ple_adatt_role = 'pipeline'")
    return p


@pytest.fixture
def store(local_store: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{local_store / 'mlflow.db'}")


def test_a_kfp_step_leaves_the_parent_running_until_the_last_stage(store, monkeypatch) -> None:
    monkeypatch.setenv("_KFP_RUNTIME", "true")  # what kfp's executor sets in each step's container
    for stage in ("validate", "train-phase1", "train-phase2", "report"):
        with stage_run(stage, _args("kfp-1")):
            pass
        assert _parent(store, "kfp-1").info.status == "RUNNING", stage  # stopped here: not complete
    with stage_run("register", _args("kfp-1")):
        pass
    assert _parent(store, "kfp-1").info.status == "FINISHED"


def test_an_interrupted_stage_kills_the_parent_and_a_launcher_can_end_a_stopped_one(store, monkeypatch) -> None:
    monkeypatch.setenv("_KFP_RUNTIME", "true")
    with pytest.raises(KeyboardInterrupt), stage_run("train-phase1", _args("kfp-2")):
        raise KeyboardInterrupt
    parent = _parent(store, "kfp-2")
    assert parent.info.status == "KILLED" and parent.data.tags["interrupted_stage"] == "train-phase1"
    # stopped between steps: no stage could mark it, the launcher does (only a RUNNING parent)
    with stage_run("validate", _args("kfp-3")) as t:
        stage_run_id = t.run_id
    uri = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    assert _parent(store, "kfp-3").info.status == "RUNNING"
    assert end_parent_run(uri, stage_run_id, "KILLED", why="make run: interrupted") is not None
    assert _parent(store, "kfp-3").info.status == "KILLED"
    assert end_parent_run(uri, stage_run_id, "FAILED") is None  # already ended: left as it is


def test_a_one_process_command_finishes_its_parent(store) -> None:
    args = _args(None)  # ple-adatt train: one local parent for both phases
    with stage_run("train-phase1", args):
        pass
    with stage_run("train-phase2", args):
        pass
    assert _parent(store, args.pipeline_run_id).info.status == "FINISHED"


def test_errors_name_where_a_launcher_took_the_uri_from(local_store: Path, monkeypatch) -> None:
    for k, v in origin_env("sqlite:///x.db", "runs/local/r/run.json, the store that run used",
                           "set MLFLOW_TRACKING_URI=<uri> (make stage ... MLFLOW_TRACKING_URI=<uri>)").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(TrackingError) as e:
        resolve_target(TrackingConfig(require_server=True))
    msg = str(e.value)
    assert "(from runs/local/r/run.json, the store that run used)" in msg
    assert "make stage ... MLFLOW_TRACKING_URI=<uri>" in msg and "(MLFLOW_TRACKING_URI)" not in msg
    # $MLFLOW_TRACKING_URI changed after the launcher set it: the note is about another URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///y.db")
    t = resolve_target(TrackingConfig())
    assert t.origin == "$MLFLOW_TRACKING_URI" and json.loads(os.environ[ORIGIN_ENV])["uri"] != t.uri


def test_a_cluster_step_names_the_pipeline_parameter_as_the_uri_source(monkeypatch) -> None:
    """On Kubeflow the URI arrives as the pipeline's mlflow_tracking_uri parameter; an error
    about it should send the user there, not to an environment variable they never set."""
    from ple_adatt.cli import run_as_component

    monkeypatch.delenv(ORIGIN_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # run_as_component writes the process env
    with pytest.raises(SystemExit):
        run_as_component(["no-such-stage"], mlflow_tracking_uri="sqlite:///cluster.db")
    with pytest.raises(TrackingError) as e:
        resolve_target(TrackingConfig(require_server=True))
    assert "(from the pipeline parameter mlflow_tracking_uri)" in str(e.value)
    assert "make submit PARAMS=mlflow_tracking_uri=<uri>" in str(e.value)
    # a launcher that named the URI already (make run, make stage) keeps its words
    os.environ.update(origin_env("sqlite:///local.db", "make run's default store ./mlflow.db", "fix it"))
    with pytest.raises(SystemExit):
        run_as_component(["no-such-stage"], mlflow_tracking_uri="sqlite:///local.db")
    assert resolve_target(TrackingConfig()).origin == "make run's default store ./mlflow.db"


def _outage(mlflow_server, monkeypatch, pipeline_run: str):
    """A train-phase1 stage whose server stops answering after its first metric: (the proxy it
    went through, now stopped; its TrackingError; its tracker)."""
    from mlhelpers import Proxy

    from ple_adatt.config import TrainConfig

    proxy = Proxy(mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retry: none, for a fast test
    for k, v in origin_env(proxy.uri, "make stage ... MLFLOW_TRACKING_URI=", "fix MLFLOW_TRACKING_URI=").items():
        monkeypatch.setenv(k, v)
    cfg = TrainConfig(tracking=TrackingConfig(retries=0, retry_wait_s=0.0))
    try:
        with pytest.raises(TrackingError) as e, \
                stage_run("train-phase1", _args(pipeline_run), train_config=cfg) as tracker:
            tracker.log_metrics({"lr": 0.1}, step=1)
            proxy.stop()
            tracker.log_metrics({"lr": 0.2}, step=2)
    finally:
        proxy.stop()
    return proxy, e, tracker


def test_an_outage_mid_stage_names_where_the_uri_came_from(mlflow_server, monkeypatch, capsys, tmp_path) -> None:
    """The server stops answering after the stage started: the error line names the URI's origin
    as the start-up check does. The stage's run stays RUNNING (nothing can tell the server), and
    a line on stderr names the runs left RUNNING, where they are recorded for a later stage, and
    the call that marks them by hand, which works once the server answers."""
    monkeypatch.setenv("PLE_ADATT_STATE_DIR", str(tmp_path / "state"))
    proxy, e, tracker = _outage(mlflow_server, monkeypatch, "outage-1")
    msg = str(e.value)
    assert msg.startswith(f"MLflow at {proxy.uri} (from make stage ... MLFLOW_TRACKING_URI=): logging metrics "
                          "failed: "), msg
    assert "\n" not in msg
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "RUNNING" and run.data.metrics["lr"] == 0.1
    parent_id = run.data.tags["mlflow.parentRunId"]
    line = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("MLflow: could not mark runs"))
    assert f"runs {tracker.run_id}, {parent_id} FAILED at {proxy.uri}" in line and "they stay RUNNING" in line
    journal = tmp_path / "state" / "mlflow-unmarked-runs.jsonl"
    assert f"recorded in {journal}: the next stage that reaches {proxy.uri} marks them" in line
    (entry,) = [json.loads(x) for x in journal.read_text().splitlines()]
    assert entry["uri"] == proxy.uri and entry["run_ids"] == [tracker.run_id, parent_id]
    assert entry["status"] == "FAILED"
    # the printed call, run once the server answers (here: the server behind the stopped proxy)
    code = re.search(r'python -c "(.*)"$', line).group(1).replace(proxy.uri, mlflow_server.uri)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                   env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    assert client.get_run(parent_id).info.status == "FAILED"


def test_the_next_stage_that_reaches_the_server_marks_the_runs_an_outage_left_running(
        mlflow_server, monkeypatch, capsys, tmp_path) -> None:
    """The server answers again at the same URI: the next stage to connect marks the failed
    stage's run and its parent FAILED (they were recorded on disk as the stage failed), tags them,
    and empties the record; that stage's own runs are untouched."""
    from mlhelpers import Proxy

    from ple_adatt.config import TrainConfig

    monkeypatch.setenv("PLE_ADATT_STATE_DIR", str(tmp_path / "state"))
    proxy, _, tracker = _outage(mlflow_server, monkeypatch, "outage-2")
    client = MlflowClient(mlflow_server.uri)
    parent_id = client.get_run(tracker.run_id).data.tags["mlflow.parentRunId"]
    assert client.get_run(parent_id).info.status == "RUNNING"
    capsys.readouterr()
    back = Proxy(mlflow_server.uri, port=int(proxy.uri.rsplit(":", 1)[1]))  # the server answers again
    try:
        cfg = TrainConfig(tracking=TrackingConfig(retries=0, retry_wait_s=0.0))
        with stage_run("validate", _args("after-outage-2"), train_config=cfg) as later:
            assert later.run_id not in (tracker.run_id, parent_id)
    finally:
        back.stop()
    for run_id in (tracker.run_id, parent_id):
        run = client.get_run(run_id)
        assert run.info.status == "FAILED", run_id
        assert "could not reach the server" in run.data.tags["marked_later"]
    assert client.get_run(later.run_id).info.status == "FINISHED"
    err = capsys.readouterr().err
    assert f"MLflow: marked runs {tracker.run_id}, {parent_id} FAILED at {proxy.uri}, which a stage that failed" in err
    assert (tmp_path / "state" / "mlflow-unmarked-runs.jsonl").read_text() == ""
