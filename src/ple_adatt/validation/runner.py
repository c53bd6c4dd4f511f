"""Validate a dataset against its contract: counts, the GX suite, the policy, the artifacts.

:func:`validate_dataset` does the work and returns a :class:`ValidationReport` (nothing is
written); :func:`write_report` writes it into a directory atomically. The validate stage
(``ple_adatt.stages.validate``) is a thin CLI over the two.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import atomic_output_dir, file_sha256, make_manifest, path_sha256, write_json
from ..config import ConfigError, DataConfig, config_hash, to_dict
from ..data.dataset import (
    check_columns,
    dataset_rows,
    parquet_files,
    read_errors,
    read_schema,
    scan_dataset,
)
from .counts import OUT_OF_RANGE_CLUSTER, UNKNOWN_CLUSTER, count_dataset
from .policy import CRITICAL, Evaluation, evaluate
from .sample import iter_chunks, plan_sample
from .suite import build_suite, import_gx, run_suite

SCHEMA_VERSION = 1
KIND = "validation"
FAILED_KIND = "validation_failed"  # the kind of a report written for a failed run (never read by training)
STAGE = "validate"
AVAILABILITY_JSON = "availability.json"
VALIDATION_HTML = "validation.html"
SUITE_JSON = "expectation_suite.json"
DEFAULT_SAMPLE_ROWS = 100_000
DEFAULT_CHUNK_ROWS = 250_000


def expectation_columns(kwargs: dict[str, Any]) -> list[str]:
    """The columns a GX expectation's kwargs name (``column``, ``column_A``/``_B``, ``column_list``, ...)."""
    cols: list[str] = []
    for key in ("column", "column_A", "column_B"):
        if isinstance(kwargs.get(key), str):
            cols.append(kwargs[key])
    for key in ("column_list", "column_set"):
        if isinstance(kwargs.get(key), (list, tuple, set)):
            cols.extend(c for c in kwargs[key] if isinstance(c, str))
    return cols


@dataclass
class ValidationReport:
    """Everything the stage writes, in memory."""

    data: dict[str, Any]  # the content of availability.json
    html: str
    suite: dict[str, Any]  # the GX suite that ran, serialized the GX way
    evaluation: Evaluation

    @property
    def passed(self) -> bool:
        return self.evaluation.passed

    @property
    def enabled_tasks(self) -> list[str]:
        return list(self.data["enabled_tasks"])

    def failure_line(self) -> str:
        return self.evaluation.failure_line()


def _jsonable(v: Any) -> Any:
    """Plain JSON: numpy scalars unwrapped, NaN / inf as strings (JSON has no NaN)."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            v = v.item()
        except (ValueError, AttributeError):
            return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def _preload_gx() -> threading.Thread:
    """Import great_expectations in the background while polars counts (it takes seconds)."""
    th = threading.Thread(target=import_gx, name="import-gx", daemon=True)
    th.start()
    return th


def validate_dataset(
    data: str | Path,
    cfg: DataConfig,
    *,
    config_path: str | Path | None = None,
    overrides: Iterable[str] = (),
    sample_rows: int | None = DEFAULT_SAMPLE_ROWS,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    suite: Any = None,
    extra_expectations: Iterable[Any] = (),
    extra_sources: Iterable[str] | None = None,
    log: Callable[[str], None] = print,
) -> ValidationReport:
    """Validate the Parquet dataset ``data`` against the contract ``cfg``.

    ``sample_rows``: at most this many rows go through the GX suite (None: every row, in
    chunks of ``chunk_rows``); exact counts always cover every row. ``suite``: a GX suite
    to run instead of :func:`build_suite` (e.g. the built-in one with expectations added);
    ``extra_expectations``: GX expectations appended to it, ``extra_sources`` where each came
    from (``FILE: key `expectations[i]```), for errors. Raises DataError for input
    that cannot be validated (missing / non-Parquet / empty dataset, missing column,
    wrong dtype); a dataset that breaks the contract gives a report with ``passed`` False.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    data = Path(data)
    config_src = str(config_path) if config_path is not None else "the data config"
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if sample_rows is not None and sample_rows < 1:
        raise ValueError(f"sample_rows must be >= 1 or None, got {sample_rows}")

    files = parquet_files(data)
    rows = dataset_rows(files)
    lf = scan_dataset(data)
    schema = read_schema(lf, data)
    check_columns(schema, cfg, data, config_src)
    extra = list(extra_expectations)
    sources = list(extra_sources) if extra_sources is not None else [f"extra expectation {i}" for i in range(len(extra))]
    for exp, src in zip(extra, sources, strict=True):  # GX would only say the column is missing, not whose
        if exp.expectation_type == "expect_column_to_exist" or str(exp.severity.value) != "critical":
            continue  # a missing column is what it checks, or only worth a warning: GX reports it
        for col in expectation_columns(exp.configuration.kwargs):
            if col not in schema:
                raise ConfigError(f"{src} ({exp.expectation_type}) names the column `{col}`, which {data} does "
                                "not have")
    log(f"dataset {data}: {len(files)} Parquet file(s), {rows:,} rows, {len(schema)} columns")
    gx_thread = _preload_gx()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hash")
    data_hash = pool.submit(path_sha256, data)  # hashlib releases the GIL: overlaps the scans

    t0 = time.perf_counter()
    with read_errors(data, files):  # a corrupt data page: one line naming the file
        counts = count_dataset(lf, schema, cfg, rows, log=log)
    timings["exact_counts"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    float_features = {f for f in cfg.numeric_features if schema[f].is_float()}
    gx_thread.join()
    timings["import_gx"] = time.perf_counter() - t0
    if suite is None:
        suite = build_suite(cfg, float_features)
    if extra:
        import copy

        gx = import_gx()
        suite = gx.ExpectationSuite(name=suite.name, expectations=[copy.copy(e) for e in [*suite.expectations, *extra]])
    plan, groups = plan_sample(files, rows, sample_rows, chunk_rows)
    n_chunks = max(1, math.ceil(plan.rows / chunk_rows))
    what = "every row" if plan.method == "all rows" else f"a systematic sample of {plan.rows:,} rows"
    log(f"running the Great Expectations suite ({len(suite.expectations)} expectations) on {what}"
        f" in {n_chunks} chunk(s) ...")
    t0 = time.perf_counter()
    with read_errors(data, files):  # the sample also reads columns the counts do not
        run = run_suite(suite, iter_chunks(plan, groups, columns=list(schema)), log=log)
    timings["gx_suite"] = time.perf_counter() - t0

    evaluation = evaluate(cfg, counts, run, data_path=str(data), config_src=config_src,
                          float_features=float_features)
    t0 = time.perf_counter()
    sha = data_hash.result()
    pool.shutdown()
    timings["hash_wait"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    inputs = {"data": f"sha256:{sha}"}
    if config_path is not None and Path(config_path).is_file():
        inputs["data_config"] = f"sha256:{file_sha256(config_path)}"
    passed = evaluation.passed
    manifest = make_manifest(
        KIND if passed else FAILED_KIND, STAGE, schema_version=SCHEMA_VERSION,
        config_hash=config_hash(cfg), inputs=inputs,
        extra={"files": [AVAILABILITY_JSON, VALIDATION_HTML, SUITE_JSON]},
    )
    failed_checks = [c for c in evaluation.checks if not c.passed]
    cluster_info = None
    if cfg.cluster_column:
        order = [*map(str, range(cfg.num_clusters)), UNKNOWN_CLUSTER, OUT_OF_RANGE_CLUSTER]
        cluster_info = {
            "column": cfg.cluster_column,
            "num_clusters": cfg.num_clusters,
            "order": order,
            "rows": {c: counts.cluster_rows[c] for c in order},
            "train_rows": {c: counts.train_cluster_rows[c] for c in order},
            "unknown_rate": counts.cluster_rows[UNKNOWN_CLUSTER] / rows,
            "out_of_range_rate": counts.cluster_rows[OUT_OF_RANGE_CLUSTER] / rows,
            "missing_in_train": [c for c in order[: cfg.num_clusters] if counts.train_cluster_rows[c] == 0],
        }
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": manifest["kind"],
        "passed": passed,
        "enabled_tasks": evaluation.enabled_tasks,
        "disabled_tasks": evaluation.disabled_tasks,
        "failed_tasks": evaluation.failed_tasks,
        "errors": evaluation.errors,
        "warnings": evaluation.warnings,
        "rows": rows,
        "dataset": {"path": str(data), "files": len(files), "bytes": sum(f.stat().st_size for f in files),
                    "columns": len(schema), "sha256": sha},
        "config": {"path": config_src, "name": cfg.name, "overrides": list(overrides),
                   "hash": config_hash(cfg), "data_config": to_dict(cfg)},
        "splits": {"method": cfg.split.method, "key": cfg.split.key, "column": cfg.split.column,
                   # the configured cut; none for method column (the column names each row's split)
                   "fractions": dict(cfg.split.fractions) if cfg.split.method == "hash" else {},
                   "rows": dict(counts.split_rows),
                   "rates": {s: v / rows for s, v in counts.split_rows.items()}},
        "tasks": evaluation.tasks,
        "features": {
            f: {"kind": fc.kind, "dtype": str(schema[f]), "nulls": fc.nulls, "nan": fc.nan,
                "infinite": fc.infinite, "null_rate": (fc.nulls + fc.nan) / rows}
            for f, fc in counts.features.items()
        },
        "clusters": cluster_info,
        "check_summary": {
            "total": len(evaluation.checks),
            "passed": len(evaluation.checks) - len(failed_checks),
            "failed_critical": sum(c.severity == CRITICAL for c in failed_checks),
            "failed_other": sum(c.severity != CRITICAL for c in failed_checks),
        },
        "checks": [c.to_json() for c in evaluation.checks],
        "gx": {
            "version": run.gx_version,
            "suite": run.suite_name,
            "expectations": len(run.outcomes),
            "success": run.success,
            "sample": {"method": plan.method, "rows": run.rows, "row_groups": plan.row_groups,
                       "stride": plan.stride, "chunks": run.chunks, "chunk_rows": chunk_rows},
            "note": "GX unexpected_percent counts non-null rows only; built-in checks are decided by exact "
                    "counts over every row, their GX result is for the record",
        },
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "manifest": manifest,
    }
    report = _jsonable(report)
    from .html import render_html

    html = render_html(report)
    return ValidationReport(report, html, _jsonable(suite.to_json_dict()), evaluation)


def write_report(report: ValidationReport, out: str | Path) -> Path:
    """Write availability.json, validation.html, expectation_suite.json and manifest.json
    into ``out`` atomically (a failure leaves ``out`` as it was)."""
    with atomic_output_dir(out) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the artifact is for other users too
        write_json(tmp / AVAILABILITY_JSON, report.data)
        (tmp / VALIDATION_HTML).write_text(report.html, encoding="utf-8")
        write_json(tmp / SUITE_JSON, report.suite)
        write_json(tmp / "manifest.json", report.data["manifest"])
    return Path(out)


def read_enabled_tasks(directory: str | Path) -> list[str]:
    """The ``enabled_tasks`` of a validation artifact, checking its manifest first."""
    from ..artifacts import ArtifactError, read_manifest

    d = Path(directory)
    read_manifest(d, KIND, (SCHEMA_VERSION,))
    p = d / AVAILABILITY_JSON
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{p}: cannot read the availability report ({e}); rerun `ple-adatt validate`") from e
    tasks = data.get("enabled_tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise ArtifactError(f"{p}: key `enabled_tasks` must be a list of task names")
    return tasks
