"""Local run directories: what a run was given, and where each stage's artifacts are.

A local pipeline run (``make run``) is a kfp.local directory
``runs/local/ple-adatt-<timestamp>/`` with one folder per task and one entry per output,
``<task>/<output>`` (``train-phase1/checkpoint``, ``report/report_html``, ...), plus the
``run.json`` written here: the pipeline parameters, the dataset, the MLflow URI, the status.

A stage rerun (``make stage``) writes a new directory with the same layout holding only the
rerun stage's outputs, and a ``run.json`` naming its ``source_run``: its other artifacts are
found by following that link, so a rerun of a rerun works and no run is ever copied or
modified.

Only the artifacts a run did not try to make come from its source. Where a run's own step
for that artifact failed or never finished (a stage rerun whose ``status`` is not
``succeeded``, or the failed task of a pipeline run), :func:`find_artifact` refuses, naming
the run directory, the stage and its status, instead of handing out an older run's artifact.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ple_adatt.artifacts import read_json

RUN_FILE = "run.json"
RUN_SCHEMA = 1


class RunError(RuntimeError):
    """A run directory is missing, incomplete or not a ple-adatt run; the message says which."""


#: stage -> {input of its component: (producing task, output name)}; "dataset" is the run's data
UPSTREAM: dict[str, dict[str, tuple[str, str]]] = {
    "validate": {"data": ("dataset", "")},
    "train-phase1": {"data": ("dataset", ""), "validation": ("validate", "validation")},
    "train-phase2": {"phase1_checkpoint": ("train-phase1", "checkpoint"), "data": ("dataset", "")},
    "report": {
        "phase1_checkpoint": ("train-phase1", "checkpoint"),
        "phase2_checkpoint": ("train-phase2", "checkpoint"),
        "validation": ("validate", "validation"),
    },
    "register": {
        "checkpoint": ("train-phase2", "checkpoint"),
        "validation": ("validate", "validation"),
        "report": ("report", "report"),
    },
}


def write_run_file(run_dir: Path, info: dict[str, Any]) -> None:
    (run_dir / RUN_FILE).write_text(json.dumps({"schema_version": RUN_SCHEMA, **info}, indent=1) + "\n")


def read_run_file(run_dir: str | Path) -> dict[str, Any]:
    d = Path(run_dir)
    if not d.is_dir():
        raise RunError(f"{d}: no such run directory; `make run` writes one under runs/local/")
    f = d / RUN_FILE
    info = read_json(f, f"{d}: no {RUN_FILE}; not a run directory written by `make run` or `make stage`", RunError)
    if not isinstance(info, dict):
        raise RunError(f"{f}: expected a JSON object, got {type(info).__name__}")
    if info.get("schema_version") != RUN_SCHEMA:
        raise RunError(f"{f}: run file schema {info.get('schema_version')!r} is not supported (reads {RUN_SCHEMA})")
    return info


_INNER_FAILED = re.compile(r"Inner task failed: '([^']+)'")


def failed_task(info: dict[str, Any]) -> str | None:
    """The task that failed a pipeline run (``run.json``'s ``failed_task``, or read from its error)."""
    if info.get("failed_task"):
        return str(info["failed_task"])
    m = _INNER_FAILED.search(str(info.get("error") or ""))
    return m.group(1) if m else None


def _own_step_status(info: dict[str, Any], task: str) -> str | None:
    """Why this run's own ``task`` step cannot be used ("failed: ..."), or None when it can be or it has none."""
    status = info.get("status")
    if info.get("kind") == "stage-rerun":
        if info.get("stage") != task or status == "succeeded":
            return None
    elif status == "succeeded":
        return None
    elif failed_task(info) != task and (info.get("tasks") or {}).get(task, "success") == "success":
        return None  # a step that finished in a failed or interrupted run, or one that never started
    why = f"status {status!r}" if status != "running" else "status 'running' (still running, or killed before it finished)"
    return why + (f": {info['error']}" if info.get("error") else "")


def find_artifact(run_dir: str | Path, task: str, output: str) -> Path:
    """The path of ``task``'s ``output`` in this run, or in the run it was derived from.

    Falls back to the source run only for a task this run did not run itself; a run whose own
    ``task`` step failed or did not finish is refused (RunError naming the run, the stage and
    its status).
    """
    d = Path(run_dir).resolve()
    seen: list[Path] = []
    while True:
        info = read_run_file(d)
        bad = _own_step_status(info, task)
        if bad:
            via = f" (reached from {seen[0]})" if seen else ""
            todo = "Rerun" if "interrupted" in bad else "Fix it and rerun"
            raise RunError(f"{d}{via}: its `{task}` stage did not succeed ({bad}); {task}/{output} is not there. "
                           f"{todo} that stage (make stage STAGE={task} RUN=...), or point RUN at a run "
                           "whose stage succeeded")
        path = d / task / output
        if path.exists():
            return path
        seen.append(d)
        if info.get("kind") == "stage-rerun" and info.get("stage") == task:  # succeeded, yet the output is gone
            raise RunError(f"{d}: its `{task}` stage succeeded but {task}/{output} is missing; the run directory "
                           "was changed after the rerun")
        source = info.get("source_run")
        if not source:
            where = " -> ".join(str(s) for s in seen)
            if info.get("status") in ("failed", "interrupted"):  # the run stopped before this step ran
                raise RunError(f"{task}/{output} not found in {where}: that run stopped (status {info['status']!r}) "
                               f"before its `{task}` stage ran. Run that stage first (make stage STAGE={task} "
                               "RUN=...), or point RUN at a run whose stage succeeded")
            status = f" (run status {info.get('status')!r})" if info.get("status") != "succeeded" else ""
            raise RunError(f"{task}/{output} not found in {where}{status}; did the `{task}` step of that run succeed?")
        d = Path(source)
        if d in seen:
            raise RunError(f"run directories link in a circle: {d}")


def artifact_origin(run_dir: str | Path, path: str | Path) -> Path | None:
    """The run directory ``path`` belongs to when it is not ``run_dir`` itself (a fallback to a source run)."""
    d, p = Path(run_dir).resolve(), Path(path).resolve()
    try:
        p.relative_to(d)
        return None
    except ValueError:
        pass
    for parent in p.parents:
        if (parent / RUN_FILE).exists():
            return parent
    return None


def latest_run(root: str | Path) -> Path:
    """The newest run directory under ``root`` (by name: kfp.local names them by time)."""
    r = Path(root)
    runs = sorted(p for p in r.glob("*/") if (p / RUN_FILE).exists()) if r.is_dir() else []
    if not runs:
        raise RunError(f"no run under {r}; `make run` makes one")
    return runs[-1]


def summarize_run(run_dir: str | Path) -> str:
    """A few lines a person reads after a run: metrics, negative transfer, report, model version."""
    from ple_adatt.stages.train_common import summarize

    d = Path(run_dir)
    info = read_run_file(d)
    lines = [f"run {d} ({info.get('status', '?')}, {info.get('seconds', 0):.0f}s)"]
    try:
        ckpt = find_artifact(d, "train-phase2", "checkpoint")
    except RunError:
        try:
            ckpt = find_artifact(d, "train-phase1", "checkpoint")
        except RunError:
            ckpt = None
    if ckpt is not None:
        lines.append(summarize(json.loads((ckpt / "manifest.json").read_text())))
    for task, output, label in (("report", "report", "report"), ("validate", "validation", "validation")):
        try:
            art = find_artifact(d, task, output)
        except RunError:
            continue
        html = next(iter(sorted(art.glob("*.html"))), art)
        lines.append(f"{label}: {html}")
    try:
        reg = json.loads((find_artifact(d, "register", "registration") / "registration.json").read_text())
        lines.append(f"registered: {describe_registration(reg)}")
    except (RunError, FileNotFoundError):
        lines.append("registered: nothing (the register step did not run)")
    if info.get("tracking") is False:
        lines.append("MLflow: not tracked (PLE_ADATT_NO_TRACKING=1)")
    elif info.get("mlflow_tracking_uri"):
        lines.append(describe_tracking(info["mlflow_tracking_uri"], info.get("pipeline_run_id")))
    return "\n".join(lines)


def describe_tracking(uri: str, pipeline_run_id: str | None = None) -> str:
    """Where the run's MLflow records are and how to look at them: a server's URL to open, or
    the ``mlflow ui`` command for a local store (``mlflow ui`` cannot serve an http:// store)."""
    run = f"; parent run 'pipeline {pipeline_run_id}'" if pipeline_run_id else ""
    if uri.startswith(("http://", "https://")):
        return f"MLflow: {uri}  (a tracking server: open {uri} in a browser{run})"
    return f"MLflow: {uri}  (mlflow ui --backend-store-uri {uri}{run})"


def describe_registration(reg: dict[str, Any]) -> str:
    if reg.get("registered") is False:  # PLE_ADATT_NO_TRACKING=1: register ran, registered nothing
        return f"nothing ({reg.get('skipped') or reg.get('reason') or 'skipped'})"
    name = reg.get("model_name") or reg.get("name") or "?"
    version = reg.get("version") or reg.get("model_version") or "?"
    aliases = reg.get("aliases") or ([reg["alias"]] if reg.get("alias") else [])
    text = f"model {name} version {version}"
    if aliases:
        text += f" (alias {', '.join(str(a) for a in aliases)})"
    if reg.get("created") is False:
        text += " (reused: the same checkpoint was registered before)"
    return text
