"""Runs a failed stage could not mark, kept on disk until a later stage can.

When the tracking server stops answering in the middle of a stage, the stage fails, and its
attempt to mark its own run and the pipeline's parent run FAILED (or KILLED) fails too: they
stay RUNNING on the server. The failed stage appends them here (:func:`record`), one JSON line
per failure: the tracking URI, the run ids, the status. The next stage of any command on this
machine that connects to the same URI marks them (:func:`mark_recorded`), each only if it is
still RUNNING, and drops the line.

Marking is safe because only the process that owned the runs records them, and only as it
fails: a RUNNING run that is alive elsewhere (a parallel step of the comparison pipeline) is
never in the file. Pods of a Kubeflow run share no disk, so on a cluster the failed step's
log line (the call that marks the runs) is the way; see docs/mlflow.md.

The file is ``$PLE_ADATT_STATE_DIR/mlflow-unmarked-runs.jsonl``, by default under
``$XDG_STATE_HOME/ple-adatt`` (``~/.local/state/ple-adatt``). Every read and rewrite holds an
exclusive lock on a sibling ``.lock`` file, so concurrent stages neither lose nor repeat lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["STATE_ENV", "journal_path", "mark_recorded", "record"]

STATE_ENV = "PLE_ADATT_STATE_DIR"
FILE_NAME = "mlflow-unmarked-runs.jsonl"


def journal_path() -> Path:
    """Where unmarked runs are kept: ``$PLE_ADATT_STATE_DIR``, else ``$XDG_STATE_HOME/ple-adatt``,
    else ``~/.local/state/ple-adatt``."""
    base = os.environ.get(STATE_ENV)
    if base:
        return Path(base) / FILE_NAME
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "ple-adatt" / FILE_NAME


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def record(uri: str, run_ids: list[str], status: str, why: str) -> Path | None:
    """Append runs that could not be marked ``status`` at ``uri``; the file's path, or None if
    it cannot be written (then the caller's printed line is all that is left)."""
    path = journal_path()
    entry = {"uri": store_key(uri), "run_ids": list(run_ids), "status": status, "why": why[:300],
             "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pid": os.getpid()}
    try:
        with _locked(path), open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
    except OSError:
        return None
    return path


# MLflow's answers that say the run cannot be marked (gone, or its state forbids it), as opposed
# to a server that did not answer: such a run is dropped from the record, not retried
_FINAL_ERRORS = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "INVALID_STATE")


def _final(e: Exception) -> bool:
    return any(code in str(getattr(e, "error_code", "")) for code in _FINAL_ERRORS)


def _mark(client: Any, entry: dict) -> tuple[list[str], list[str]]:
    """Mark the entry's runs that are still RUNNING: (the runs marked, the runs the server could
    not be asked about). A run that is gone, deleted or no longer RUNNING is neither."""
    marked, left = [], []
    for run_id in entry["run_ids"]:
        try:
            run = client.get_run(run_id)
            if run.info.status != "RUNNING" or run.info.lifecycle_stage != "active":
                continue  # marked since, or deleted (a deleted run cannot be tagged)
            client.set_tag(run_id, "marked_later", f"by a later stage (pid {os.getpid()}): the failed stage "
                                                   f"could not reach the server ({entry.get('why', '')})"[:5000])
            client.set_terminated(run_id, entry["status"])
            marked.append(run_id)
        except Exception as e:  # noqa: BLE001 - the server went away again: keep it for the next stage
            if not _final(e):
                left.append(run_id)
    return marked, left


def store_key(uri: str) -> str:
    """``uri`` as the record keys it: a relative ``sqlite:///`` path made absolute, so that a
    stage run from another directory finds what one run here recorded (and a store of the same
    relative name elsewhere is another store)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _read(path: Path) -> list[str]:
    return [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]


def mark_recorded(client: Any, uri: str, say: Callable[[str], None] | None = None) -> list[str]:
    """Mark the recorded runs of ``uri`` with the status their stage meant, where still RUNNING,
    and drop them from the file; runs the server cannot be asked about stay. Returns the run ids
    marked. Best effort: never raises (a damaged line is dropped with a note). The file is locked
    while it is read and while it is rewritten, not while the server is asked."""
    path = journal_path()
    if not path.exists():
        return []
    say = say or (lambda m: print(m, file=sys.stderr))
    key = store_key(uri)
    done: list[str] = []
    try:
        with _locked(path):
            ours: list[tuple[str, dict]] = []
            damaged: list[str] = []
            for n, line in enumerate(_read(path), 1):
                try:
                    entry = json.loads(line)
                    if not isinstance(entry["run_ids"], list) or not isinstance(entry["status"], str):
                        raise TypeError("run_ids")
                    if store_key(entry["uri"]) == key:
                        ours.append((line, entry))
                except (ValueError, KeyError, TypeError, AttributeError):
                    say(f"MLflow: dropped line {n} of {path}: not a record of unmarked runs")
                    damaged.append(line)
        if not ours and not damaged:
            return []
        replaced: dict[str, str | None] = {}  # processed line -> what takes its place
        for line, entry in ours:
            marked, left = _mark(client, entry)
            done += marked
            replaced[line] = json.dumps({**entry, "run_ids": left}) if left else None
            if marked:
                say(f"MLflow: marked runs {', '.join(marked)} {entry['status']} at {uri}, which a stage that "
                    f"failed at {entry.get('time', '?')} could not mark (recorded in {path})")
        replaced.update({line: None for line in damaged})
        with _locked(path):  # lines appended meanwhile stay
            keep = []
            for line in _read(path):
                if line in replaced:
                    new = replaced.pop(line)
                    if new is not None:
                        keep.append(new)
                else:
                    keep.append(line)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
            os.replace(tmp, path)
    except OSError as e:
        say(f"MLflow: could not read or rewrite {path} ({e}); runs recorded there stay RUNNING")
    return done
