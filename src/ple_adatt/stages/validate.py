"""``ple-adatt validate``: check per-task target availability before any GPU hour is spent.

    ple-adatt validate --data data/synthetic.parquet --config configs/data/synthetic.yaml --out runs/validate

Writes ``DIR/availability.json`` (every number, ``enabled_tasks``, pass/fail per check,
the manifest), ``DIR/validation.html`` (self-contained), ``DIR/expectation_suite.json``
(the GX suite that ran, to copy and extend) and ``DIR/manifest.json``. ``DIR`` exists only
after a passing run: input that cannot be validated and a dataset that breaks the contract
both end with one line on stderr and exit code 2 (``--failure-report DIR2`` keeps the full
report of a failed validation for debugging).
"""

from __future__ import annotations

import argparse
import time

from .common import StageError, add_tracking_arguments, stage_tracking


class ValidationFailed(StageError):
    """The dataset breaks its contract (labels outside their domain, too few targets, ...)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="Parquet file or directory of *.parquet files")
    parser.add_argument("--config", required=True, help="data config (the contract), e.g. configs/data/synthetic.yaml")
    parser.add_argument("--out", required=True, help="output directory (replaced atomically on success)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a data-config key, e.g. --set split.seed=1 or --set num_clusters=4 (repeatable; "
             "mapping keys only: entries of the `tasks` list are edited in the YAML)",
    )
    parser.add_argument(
        "--expectations", action="append", default=[], metavar="FILE",
        help="extra GX expectations (JSON or YAML: a GX suite or a list of expectation configs); repeatable",
    )
    parser.add_argument(
        "--gx-rows", default="100000", metavar="N|all",
        help="rows the GX suite sees (a systematic sample; 'all' = every row, in chunks); exact counts "
             "always cover every row (default 100000)",
    )
    parser.add_argument("--gx-chunk-rows", type=int, default=250_000, metavar="N",
                        help="rows per pandas chunk handed to GX (default 250000)")
    parser.add_argument("--failure-report", default=None, metavar="DIR",
                        help="on a failed validation, write the full report here (kind validation_failed)")
    add_tracking_arguments(parser)


def _gx_rows(value: str) -> int | None:
    if value.strip().lower() == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise StageError(f"--gx-rows must be a positive integer or 'all', got {value!r}")
    return n


def run(args: argparse.Namespace) -> int:
    from ..artifacts import check_output_dir

    # before the MLflow run opens and any work: fail now, not after the counts
    out = check_output_dir(args.out, kind="validation", inputs=(args.data, args.config, *args.expectations))
    if args.failure_report:
        check_output_dir(args.failure_report, "--failure-report", kind="validation_failed",
                         inputs=(args.data, args.config, *args.expectations))
    with stage_tracking("validate", args) as tracker:
        from ..config import load_data_config
        from ..validation.runner import validate_dataset, write_report
        from ..validation.suite import load_expectations

        t0 = time.perf_counter()
        sample_rows = _gx_rows(args.gx_rows)
        if args.gx_chunk_rows < 1:
            raise StageError(f"--gx-chunk-rows must be >= 1, got {args.gx_chunk_rows}")
        cfg = load_data_config(args.config, args.overrides, option="--config")
        extra, sources = [], []
        for path in args.expectations:
            loaded = load_expectations(path)
            extra += loaded
            sources += [f"{path}: key `expectations[{i}]`" for i in range(len(loaded))]
        report = validate_dataset(
            args.data, cfg, config_path=args.config, overrides=args.overrides, sample_rows=sample_rows,
            chunk_rows=args.gx_chunk_rows, extra_expectations=extra, extra_sources=sources,
        )
        for msg in report.data["warnings"]:
            print(f"warning: {msg}")
        if not report.passed:
            if args.failure_report:
                write_report(report, args.failure_report)
                tracker.log_artifact(args.failure_report, "validation_failed")
                print(f"the full report of the failed validation is in {args.failure_report}")
            raise ValidationFailed(report.failure_line())
        write_report(report, out)
        d = report.data
        tracker.log_metrics(_availability_metrics(d))
        tracker.log_artifact(out, "validation")
        print(f"validation passed: {len(d['enabled_tasks'])} of {len(d['tasks'])} tasks enabled"
              + (f" (disabled: {', '.join(d['disabled_tasks'])})" if d["disabled_tasks"] else "")
              + f"; {d['check_summary']['passed']}/{d['check_summary']['total']} checks passed")
        print(f"wrote {out}/availability.json and {out}/validation.html in {time.perf_counter() - t0:.1f}s")
        return 0


def _availability_metrics(d: dict) -> dict[str, float]:
    """The validation numbers as MLflow metrics: per task rate and count, the check summary."""
    out: dict[str, float] = {
        "rows": float(d.get("rows", 0)),
        "tasks_enabled": float(len(d.get("enabled_tasks", []))),
        "tasks_disabled": float(len(d.get("disabled_tasks", []))),
        "checks_passed": float(d.get("check_summary", {}).get("passed", 0)),
        "checks_total": float(d.get("check_summary", {}).get("total", 0)),
    }
    for task, t in (d.get("tasks") or {}).items():
        if isinstance(t.get("rate"), (int, float)):
            out[f"availability/{task}"] = float(t["rate"])
        if isinstance(t.get("available"), (int, float)):
            out[f"available_rows/{task}"] = float(t["available"])
    return out
