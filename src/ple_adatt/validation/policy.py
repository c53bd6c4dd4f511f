"""Checks, their severities and the per-task decision (enabled / disabled / failed).

Every check has an id (``task.ctr.label_domain``), a severity in GX's words and a result:

* ``critical``: a failure fails the stage (non-zero exit, no output directory);
* ``warning``: a failure is reported in the JSON / HTML and printed as a warning;

Built-in checks are decided by the exact counts over every row (:mod:`.counts`); their GX
expectation ran on the rows the suite saw and is attached to the check (``gx``) for the
record. Expectations a user added to the suite are decided by GX alone, with the
severity the user gave them.

Per task, in this order:

* ``has_targets`` (critical): at least one non-null target;
* ``label_domain`` (critical): no target outside the task's label domain;
* ``min_availability`` and ``train_targets``: the share of rows with a target is at least
  ``min_availability`` and the train split holds at least one target. The task's
  ``on_low_availability`` decides: ``fail`` makes them critical, ``disable`` makes them
  warnings and drops the task from ``enabled_tasks``;
* ``cluster_coverage`` (warning): every known cluster with train rows has train targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import DataConfig
from ..data.dataset import domain_text
from .counts import OTHER_SPLIT, OUT_OF_RANGE_CLUSTER, SPLITS, DatasetCounts
from .suite import ExpectationOutcome, SuiteRun

CRITICAL = "critical"
WARNING = "warning"
INFO = "info"


@dataclass
class Check:
    id: str
    subject: str
    description: str
    severity: str
    passed: bool
    observed: Any = None
    expected: Any = None
    message: str | None = None  # why it failed, one line
    source: str = "exact"  # exact (every row) | schema | gx (the rows the suite saw)
    gx: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "subject": self.subject,
            "description": self.description,
            "severity": self.severity,
            "passed": self.passed,
            "observed": self.observed,
            "expected": self.expected,
            "message": self.message,
            "source": self.source,
            "gx": self.gx,
        }


@dataclass
class Evaluation:
    checks: list[Check]
    tasks: dict[str, dict[str, Any]]
    enabled_tasks: list[str]
    disabled_tasks: list[str]
    failed_tasks: list[str]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.errors

    def failure_line(self) -> str:
        """One line naming the first failure and how many others there are."""
        failed = [c for c in self.checks if not c.passed and c.severity == CRITICAL]
        if not failed:
            return self.errors[0] if self.errors else "validation failed"
        more = failed[1:]
        tail = ""
        if more:
            ids = ", ".join(c.id for c in more[:4]) + (", ..." if len(more) > 4 else "")
            tail = f" (+{len(more)} more failed check{'s' if len(more) > 1 else ''}: {ids})"
        return f"{failed[0].message}{tail}"


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _examples(vals: list[Any]) -> str:
    out = []
    for v in vals:
        if isinstance(v, float) and v.is_integer():
            out.append(str(int(v)))
        else:
            out.append(repr(v) if isinstance(v, str) else str(v))
    return ", ".join(out)


def evaluate(
    cfg: DataConfig,
    counts: DatasetCounts,
    run: SuiteRun | None,
    *,
    data_path: str,
    config_src: str,
    float_features: set[str],
) -> Evaluation:
    """Decide every check and every task from the counts and the GX results."""
    checks: list[Check] = []
    gx_by_check: dict[str, ExpectationOutcome] = {}
    user: list[ExpectationOutcome] = []
    for o in run.outcomes if run else []:
        if o.check:
            gx_by_check[o.check] = o
        else:
            user.append(o)

    def add(c: Check) -> Check:
        o = gx_by_check.get(c.id)
        if o is not None:
            c.gx = o.to_json()
        checks.append(c)
        return c

    n = counts.rows
    # ---- columns (verified on the schema before any counting)
    declared = [*cfg.numeric_features, *cfg.categorical_features, *(t.column for t in cfg.tasks)]
    if cfg.cluster_column:
        declared.append(cfg.cluster_column)
    declared.append(cfg.split.key if cfg.split.method == "hash" else cfg.split.column)
    for col in declared:
        add(Check(f"column.{col}.exists", col, "the declared column exists with a usable dtype", CRITICAL,
                  True, observed="present", expected="present", source="schema"))

    # ---- splits
    for s in ("train", "val"):
        rows_s = counts.split_rows[s]
        add(Check(f"split.{s}_rows", "split", f"the {s} split has rows", CRITICAL, rows_s > 0,
                  observed=rows_s, expected="> 0",
                  message=None if rows_s else
                  f"the {s} split of {data_path} is empty (0 of {n:,} rows); check `split` in {config_src}"))
    if cfg.split.method == "column":
        other = counts.split_rows[OTHER_SPLIT]
        add(Check("split.known_values", "split", "split column values are train, val or test", WARNING,
                  other == 0, observed=other, expected=0,
                  message=None if not other else
                  f"{other:,} rows of {data_path} have a `{cfg.split.column}` value other than train/val/test "
                  "(or null); no stage uses them"))

    # ---- tasks
    tasks: dict[str, dict[str, Any]] = {}
    enabled, disabled, failed = [], [], []
    for t in cfg.tasks:
        tc = counts.tasks[t.name]
        rate = _rate(tc.available, n) or 0.0
        train_av = tc.by_split["train"]["available"]
        task_checks: list[Check] = []
        task_checks.append(add(Check(
            f"task.{t.name}.has_targets", t.name, "the target column holds at least one target", CRITICAL,
            tc.available > 0, observed=tc.available, expected="> 0",
            message=None if tc.available else
            f"task {t.name!r}: column `{t.column}` holds no target at all (0 of {n:,} rows non-null) in "
            f"{data_path}; fill the column or remove the task from {config_src}")))
        task_checks.append(add(Check(
            f"task.{t.name}.label_domain", t.name, f"every target is in {domain_text(t)}", CRITICAL,
            tc.out_of_domain == 0, observed=tc.out_of_domain, expected=0,
            message=None if not tc.out_of_domain else
            f"task {t.name!r}: {tc.out_of_domain:,} of {tc.available:,} targets in column `{t.column}` of "
            f"{data_path} are outside {domain_text(t)} (e.g. {_examples(tc.examples)}); fix the labels or the "
            f"task's type / num_classes / vocab_size / bounds in {config_src}")))
        policy_sev = CRITICAL if t.on_low_availability == "fail" else WARNING
        low = rate < t.min_availability
        task_checks.append(add(Check(
            f"task.{t.name}.min_availability", t.name,
            f"at least {_pct(t.min_availability)} of rows carry a target (on_low_availability: {t.on_low_availability})",
            policy_sev, not low, observed=rate, expected=f">= {t.min_availability:g}",
            message=None if not low else
            f"task {t.name!r}: availability {_pct(rate)} ({tc.available:,} of {n:,} rows) is under its "
            f"min_availability {_pct(t.min_availability)} in {config_src}"
            + (" -> task disabled" if t.on_low_availability == "disable" else
               "; lower min_availability or set on_low_availability: disable"))))
        task_checks.append(add(Check(
            f"task.{t.name}.train_targets", t.name, "the train split holds targets of the task", policy_sev,
            train_av > 0, observed=train_av, expected="> 0",
            message=None if train_av else
            f"task {t.name!r}: the train split holds no target of column `{t.column}` "
            f"({tc.available:,} targets in other splits)"
            + (" -> task disabled" if t.on_low_availability == "disable" else ""))))
        if cfg.cluster_column:
            empty = [c for c in map(str, range(cfg.num_clusters))
                     if tc.train_by_cluster[c]["rows"] > 0 and tc.train_by_cluster[c]["available"] == 0]
            add(Check(f"task.{t.name}.cluster_coverage", t.name,
                      "every known cluster with train rows has train targets", WARNING, not empty,
                      observed=empty, expected=[],
                      message=None if not empty else
                      f"task {t.name!r}: clusters {', '.join(empty)} have train rows but no train target; "
                      "their cluster heads learn nothing for this task"))
        if any(not c.passed and c.severity == CRITICAL for c in task_checks):
            decision = "failed"
            failed.append(t.name)
        elif any(not c.passed for c in task_checks):
            decision = "disabled"
            disabled.append(t.name)
        else:
            decision = "enabled"
            enabled.append(t.name)
        tasks[t.name] = {
            "column": t.column,
            "type": t.type,
            "domain": domain_text(t),
            "num_classes": t.num_classes,
            "vocab_size": t.vocab_size,
            "bounds": list(t.bounds) if t.bounds is not None else None,
            "rows": tc.rows,
            "available": tc.available,
            "rate": rate,
            "min_availability": t.min_availability,
            "on_low_availability": t.on_low_availability,
            "decision": decision,
            "reasons": [c.message for c in task_checks if not c.passed],
            "label": {"out_of_domain": tc.out_of_domain, "min": tc.label_min, "max": tc.label_max,
                      "examples": tc.examples},
            "per_split": {s: {**v, "rate": _rate(v["available"], v["rows"])} for s, v in tc.by_split.items()
                          if s in SPLITS or v["rows"]},  # "other" only when the split column has such rows
            "per_cluster": {c: {**v, "rate": _rate(v["available"], v["rows"])} for c, v in tc.by_cluster.items()},
        }

    # ---- features
    for f, fc in counts.features.items():
        missing = fc.nulls + fc.nan
        if f in float_features:
            add(Check(f"feature.{f}.finite", f, "no infinite values (NaN counts as missing)", CRITICAL,
                      fc.infinite == 0, observed=fc.infinite, expected=0,
                      message=None if not fc.infinite else
                      f"numeric feature `{f}` of {data_path} has {fc.infinite:,} infinite values; "
                      "the normaliser would turn the column into NaN; write them as null"))
        add(Check(f"feature.{f}.not_all_null", f, "the feature has at least one value", WARNING,
                  missing < n, observed=_rate(missing, n), expected="< 1",
                  message=None if missing < n else
                  f"feature `{f}` of {data_path} is null on every row; it carries no signal"))

    # ---- clusters
    if cfg.cluster_column:
        oor = counts.cluster_rows[OUT_OF_RANGE_CLUSTER]
        add(Check("cluster.in_range", cfg.cluster_column, f"cluster ids are in [0, {cfg.num_clusters})", WARNING,
                  oor == 0, observed=oor, expected=0,
                  message=None if not oor else
                  f"{oor:,} rows of {data_path} have a `{cfg.cluster_column}` id outside [0, {cfg.num_clusters}) "
                  f"(num_clusters in {config_src}); they use the global head like unknown clusters"))
        missing_cl = [c for c in map(str, range(cfg.num_clusters)) if counts.train_cluster_rows[c] == 0]
        add(Check("cluster.coverage", cfg.cluster_column, "every cluster has train rows", WARNING,
                  not missing_cl, observed=missing_cl, expected=[],
                  message=None if not missing_cl else
                  f"clusters {', '.join(missing_cl)} of `{cfg.cluster_column}` have no train rows; "
                  "their cluster heads stay untrained"))

    # ---- expectations the user added to the suite
    for o in user:
        col = o.kwargs.get("column")
        cid = f"gx.{o.index}.{o.type}" + (f".{col}" if col else "")
        detail = o.exception or (
            f"{o.unexpected_count:,} unexpected of {o.element_count - o.missing_count:,} non-null values"
            if o.unexpected_count is not None else f"observed {o.observed_value!r}")
        checks.append(Check(
            cid, str(col or "table"), f"{o.type} {o.kwargs}", o.severity, o.success,
            observed=o.observed_value if o.unexpected_count is None else o.unexpected_count,
            expected=o.kwargs, source="gx", gx=o.to_json(),
            message=None if o.success else
            f"GX expectation {o.type}" + (f" on column `{col}`" if col else "") + f" failed: {detail}"))

    # GX could not evaluate a built-in expectation: worth a warning, the exact check decides
    warnings: list[str] = []
    for cid, o in gx_by_check.items():
        if o.exception:
            warnings.append(f"GX could not evaluate {cid} ({o.type}): {o.exception}")
    for c in checks:
        if not c.passed and c.severity != CRITICAL and c.message:
            warnings.append(c.message)
    errors = [c.message or c.id for c in checks if not c.passed and c.severity == CRITICAL]
    if not enabled and not errors:
        errors.append(f"no task is left enabled (disabled: {', '.join(disabled)}); nothing can train on "
                      f"{data_path}; lower min_availability in {config_src} or fix the data")
    return Evaluation(checks, tasks, enabled, disabled, failed, errors, warnings)

