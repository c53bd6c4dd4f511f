"""``ple-adatt report``: the affinity and negative-transfer report of a trained run.

    ple-adatt report --phase1 runs/train/phase1 --phase2 runs/train/phase2 \\
        --validation runs/validate --out runs/report [--baselines baselines.json]

Reads the two checkpoints of one run (their buffers and manifests) and the validation
result; writes ``DIR/report.html`` (self-contained: inline SVG, no script or fetch),
``DIR/report.md`` (the short summary the KFP UI shows), ``DIR/report.json`` (every number
in the HTML) and ``DIR/manifest.json`` (kind ``report``), atomically. Bad inputs (missing
directory, wrong artifact kind, phase1/phase2 swapped, checkpoints of different runs) end
with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import add_tracking_arguments, stage_tracking

STAGE = "report"
FILES = ("report.html", "report.md", "report.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--phase1", required=True, help="Phase 1 checkpoint directory (e.g. runs/train/phase1)")
    parser.add_argument("--phase2", required=True, help="Phase 2 checkpoint directory of the same run")
    parser.add_argument("--validation", required=True, help="output directory of `ple-adatt validate` for the data")
    parser.add_argument("--out", required=True, help="report directory to write (replaced atomically)")
    parser.add_argument(
        "--baselines", default=None,
        help="single-task baselines for TCI: a JSON file {kind: single_task_baselines, val_loss: {task: loss}} "
             "or a directory of single-task checkpoints (see docs/report.md)",
    )
    add_tracking_arguments(parser)


def build_report(*, phase1: str | Path, phase2: str | Path, validation: str | Path, out: str | Path,
                 baselines: str | Path | None = None) -> dict[str, Any]:
    """Write the report directory ``out``; return its manifest (``summary`` holds the headline numbers)."""
    from ..artifacts import (
        atomic_output_dir,
        check_output_dir,
        make_manifest,
        path_sha256,
        write_json,
    )
    from ..reporting import REPORT_SCHEMA_VERSION
    from ..reporting.html import render_html
    from ..reporting.inputs import load_inputs
    from ..reporting.markdown import render_markdown
    from ..reporting.numbers import build_report_data

    check_output_dir(out, kind="report", inputs=(phase1, phase2, validation, baselines))
    inp = load_inputs(phase1=phase1, phase2=phase2, validation=validation, baselines=baselines)
    report = build_report_data(inp)
    html, md = render_html(report), render_markdown(report)
    inputs = {
        "phase1": inp.phase1["files"]["checkpoint.pt"],
        "phase2": inp.phase2["files"]["checkpoint.pt"],
        "validation": path_sha256(Path(validation) / "availability.json"),
    }
    if baselines is not None:
        inputs["baselines"] = path_sha256(baselines)
    with atomic_output_dir(out) as tmp:
        (tmp / "report.html").write_text(html, encoding="utf-8")
        (tmp / "report.md").write_text(md, encoding="utf-8")
        write_json(tmp / "report.json", report)
        manifest = make_manifest(
            "report", STAGE, schema_version=REPORT_SCHEMA_VERSION, config_hash=inp.phase1.get("config_hash"),
            inputs=inputs,
            extra={"tasks": report["run"]["tasks"], "strategy": report["run"]["strategy"],
                   "summary": report["summary"], "files": {f: path_sha256(tmp / f) for f in FILES}},
        )
        write_json(tmp / "manifest.json", manifest)
    return manifest


def _metrics(summary: dict[str, Any]) -> dict[str, float]:
    keys = ("agreement_score", "blocked_pairs", "conflicting_pairs", "transfer_share_last_epoch", "suggested_moves")
    return {f"report/{k}": float(summary[k]) for k in keys if isinstance(summary.get(k), (int, float))}


# how to make each input when it is missing
MAKES = {
    "phase1": "train first: `make train` or `ple-adatt train` (writes runs/train/phase1 and phase2)",
    "phase2": "train first: `make train` or `ple-adatt train` (writes runs/train/phase1 and phase2)",
    "validation": "validate the data first: `make validate` or `ple-adatt validate` (writes runs/validate)",
}


def check_inputs(args: argparse.Namespace) -> None:
    """Missing input directories and an --out that must not be replaced fail before an MLflow run
    opens, with the command that makes the input."""
    from ..artifacts import check_output_dir
    from ..errors import StageError

    for key, how in MAKES.items():
        path = getattr(args, key)
        if not Path(path).is_dir():
            raise StageError(f"--{key} {path}: no such directory; {how}")
    check_output_dir(args.out, kind="report", inputs=(args.phase1, args.phase2, args.validation, args.baselines))


def run(args: argparse.Namespace) -> int:
    check_inputs(args)
    with stage_tracking(STAGE, args) as tracker:
        manifest = build_report(phase1=args.phase1, phase2=args.phase2, validation=args.validation, out=args.out,
                                baselines=args.baselines)
        tracker.log_metrics(_metrics(manifest["summary"]))
        tracker.log_artifact(args.out, "report")
    s = manifest["summary"]
    print(f"report: {s['tasks']} tasks, group agreement {s['agreement_score'] if s['agreement_score'] is None else round(s['agreement_score'], 3)}, "
          f"{s['blocked_pairs']} blocked pair(s), {s['conflicting_pairs']}/{s['measured_pairs']} pairs with GCD > 1")
    print(f"wrote {args.out}/report.html, report.md, report.json")
    return 0
