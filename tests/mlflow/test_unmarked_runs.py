"""The record of runs a failed stage could not mark (ple_adatt.unmarked_runs), against a real
sqlite MLflow store; tests/mlflow/test_tracking_parent_status.py runs the whole outage against
a real server."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ple_adatt import unmarked_runs
from ple_adatt.tracking import unmarked_runs_line


@pytest.fixture
def state(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("PLE_ADATT_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state" / "mlflow-unmarked-runs.jsonl"


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("e")


def test_the_state_dir_defaults_under_xdg_state_home(monkeypatch, tmp_path):
    monkeypatch.delenv("PLE_ADATT_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert unmarked_runs.journal_path() == tmp_path / "ple-adatt" / "mlflow-unmarked-runs.jsonl"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert unmarked_runs.journal_path() == tmp_path / "home/.local/state/ple-adatt/mlflow-unmarked-runs.jsonl"


def test_recorded_runs_are_marked_once_and_only_where_still_running(state, store):
    uri, client, exp = store
    running = [client.create_run(exp).info.run_id for _ in range(2)]
    finished = client.create_run(exp).info.run_id
    client.set_terminated(finished, "FINISHED")
    assert unmarked_runs.record(uri, running, "KILLED", "connection refused") == state
    assert unmarked_runs.record(uri, [finished, "0" * 32], "FAILED", "timed out") == state
    assert unmarked_runs.record("http://127.0.0.1:1", ["elsewhere"], "FAILED", "x") == state  # another server's
    with open(state, "a") as f:
        f.write("{not json\n")
    said: list[str] = []
    assert unmarked_runs.mark_recorded(client, uri, said.append) == running
    assert [client.get_run(r).info.status for r in running] == ["KILLED", "KILLED"]
    assert "connection refused" in client.get_run(running[0]).data.tags["marked_later"]
    assert client.get_run(finished).info.status == "FINISHED"  # its stage's status stands
    assert "marked_later" not in client.get_run(finished).data.tags
    assert said[0] == f"MLflow: dropped line 4 of {state}: not a record of unmarked runs"
    assert said[1].startswith(f"MLflow: marked runs {', '.join(running)} KILLED at {uri}, which a stage")
    # what is left: the other server's record only (the unknown run id is gone: nothing to mark)
    assert [json.loads(x)["uri"] for x in state.read_text().splitlines()] == ["http://127.0.0.1:1"]
    assert unmarked_runs.mark_recorded(client, uri, said.append) == []  # nothing twice
    assert len(said) == 2


def test_runs_the_server_cannot_be_asked_about_stay_recorded(state, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    unmarked_runs.record(uri, ["a" * 32], "FAILED", "connection refused")
    before = state.read_text()
    assert unmarked_runs.mark_recorded(MlflowClient(uri), uri, lambda m: None) == []
    assert [json.loads(x)["run_ids"] for x in state.read_text().splitlines()] == [["a" * 32]]
    assert json.loads(state.read_text()) == json.loads(before)


def test_without_a_writable_state_dir_the_line_still_says_how_to_mark_them(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PLE_ADATT_STATE_DIR", str(blocker / "sub"))  # under a file: cannot be made
    assert unmarked_runs.record("sqlite:///x.db", ["r1"], "FAILED", "why") is None
    line = unmarked_runs_line("sqlite:///x.db", ["r1", "p1"], "FAILED", OSError("gone"), None)
    assert "recorded in" not in line and "they stay RUNNING for now" in line
    assert "c.set_terminated('r1', 'FAILED'); c.set_terminated('p1', 'FAILED')" in line


def test_a_deleted_run_is_dropped_not_retried(state, store):
    uri, client, exp = store
    run_id = client.create_run(exp).info.run_id
    client.delete_run(run_id)  # still RUNNING, but it cannot be tagged or marked
    unmarked_runs.record(uri, [run_id], "FAILED", "timed out")
    assert unmarked_runs.mark_recorded(client, uri, lambda m: None) == []
    assert state.read_text() == ""


def test_a_relative_sqlite_store_is_found_from_another_directory(state, monkeypatch, tmp_path):
    """A stage that failed in one directory with sqlite:///rel.db; the next one, run from another
    directory with an absolute URI of the same file, marks its run (and the relative name there,
    another file, does not match)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    client = MlflowClient("sqlite:///rel.db")
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    unmarked_runs.record("sqlite:///rel.db", [run_id], "FAILED", "gone")
    monkeypatch.chdir(tmp_path / "b")
    assert unmarked_runs.mark_recorded(MlflowClient("sqlite:///rel.db"), "sqlite:///rel.db", lambda m: None) == []
    absolute = f"sqlite:///{tmp_path / 'a' / 'rel.db'}"
    assert unmarked_runs.mark_recorded(MlflowClient(absolute), absolute, lambda m: None) == [run_id]
    assert MlflowClient(absolute).get_run(run_id).info.status == "FAILED"


def test_a_journal_of_bytes_that_are_not_text_is_dropped_with_a_note(state, store):
    uri, client, _ = store
    state.parent.mkdir(parents=True)
    state.write_bytes(b"\xff\xfe not utf-8\n")
    said: list[str] = []
    assert unmarked_runs.mark_recorded(client, uri, said.append) == []
    assert said == [f"MLflow: dropped line 1 of {state}: not a record of unmarked runs"]
    assert state.read_text() == ""
