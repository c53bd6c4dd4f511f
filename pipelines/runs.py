"""Local run directories: what a run was given, and where each stage's artifacts are.

A local pipeline run (``make run``) is a kfp.local directory
``runs/local/ple-adatt-<timestamp>/`` with one folder per task and one entry per output,
``<task>/<output>`` (``train-phase1/checkpoint``, ``report/report_html``, ...), plus the
``run.json`` written here: the pipeline parameters, the dataset, the MLflow URI, the status.

A stage rerun (``make stage``) writes a new directory with the same layout holding only the
rerun stage's outputs, and a ``run.json`` naming its ``source_run``: its other artifacts are
found by following that link, so a rerun of a rerun works and no run is ever copied or
modified.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    if not f.exists():
        raise RunError(f"{d}: no {RUN_FILE}; not a run directory written by `make run` or `make stage`")
    info = json.loads(f.read_text())
    if info.get("schema_version") != RUN_SCHEMA:
        raise RunError(f"{f}: run file schema {info.get('schema_version')!r} is not supported (reads {RUN_SCHEMA})")
    return info


def find_artifact(run_dir: str | Path, task: str, output: str) -> Path:
    """The path of ``task``'s ``output`` in this run, or in the run it was derived from."""
    d = Path(run_dir).resolve()
    seen: list[Path] = []
    while True:
        path = d / task / output
        if path.exists():
            return path
        seen.append(d)
        source = read_run_file(d).get("source_run")
        if not source:
            where = " -> ".join(str(s) for s in seen)
            raise RunError(f"{task}/{output} not found in {where}; did the `{task}` step of that run succeed?")
        d = Path(source)
        if d in seen:
            raise RunError(f"run directories link in a circle: {d}")


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
    if info.get("mlflow_tracking_uri"):
        lines.append(f"MLflow: {info['mlflow_tracking_uri']}  (mlflow ui --backend-store-uri {info['mlflow_tracking_uri']})")
    return "\n".join(lines)


def describe_registration(reg: dict[str, Any]) -> str:
    name = reg.get("model_name") or reg.get("name") or "?"
    version = reg.get("version") or reg.get("model_version") or "?"
    aliases = reg.get("aliases") or ([reg["alias"]] if reg.get("alias") else [])
    text = f"model {name} version {version}"
    if aliases:
        text += f" (alias {', '.join(str(a) for a in aliases)})"
    return text
