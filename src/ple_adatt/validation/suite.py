"""The Great Expectations suite of the dataset contract, and how it is run.

:func:`build_suite` turns a :class:`~ple_adatt.config.DataConfig` into a GX 1.x
``ExpectationSuite``: one expectation per built-in check, each tagged in its ``meta`` with
the check id (``meta["ple_adatt_check"]``) so results map back to the availability report.
Users extend the suite the GX way: add expectations to the returned suite in Python, or
list them in a JSON/YAML file (a serialized GX suite, ``{"expectations": [{"type": ...,
"kwargs": {...}, "severity": "warning"}]}``) passed as ``ple-adatt validate
--expectations FILE``.

:func:`run_suite` validates pandas chunks (never the whole dataset at once) through an
ephemeral GX context (nothing is written to disk) and merges the per-chunk results.
Note GX's ``unexpected_percent`` of column-map expectations counts non-null rows only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, DataConfig

if TYPE_CHECKING:
    import great_expectations as gx
    import pyarrow as pa

META_KEY = "ple_adatt_check"
MAX_INSET_CLASSES = 1000  # above this, multiclass domains use Between instead of InSet
FLOAT_MAX = 1.7976931348623157e308
MAX_PARTIAL = 20
BATCH_COLUMNS = 6  # columns per GX call (see run_suite)


def import_gx() -> Any:
    """Import great_expectations with its analytics off (the stage never uses the network)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    return gx


def suite_name(cfg: DataConfig) -> str:
    return f"ple_adatt.{cfg.name}"


def build_suite(cfg: DataConfig, float_features: Iterable[str] | None = None) -> gx.ExpectationSuite:
    """The built-in expectations of the dataset contract ``cfg`` as a GX ExpectationSuite.

    ``float_features``: the numeric features stored as floats (they get a finiteness
    expectation); default: every numeric feature.
    """
    gx = import_gx()
    E = gx.expectations
    floats = set(cfg.numeric_features if float_features is None else float_features)
    exps: list[Any] = []

    def add(exp_cls: Any, check: str, severity: str = "critical", **kwargs: Any) -> None:
        exps.append(exp_cls(meta={META_KEY: check}, severity=severity, **kwargs))

    declared = [*cfg.numeric_features, *cfg.categorical_features, *(t.column for t in cfg.tasks)]
    if cfg.cluster_column:
        declared.append(cfg.cluster_column)
    declared.append(cfg.split.key if cfg.split.method == "hash" else cfg.split.column)
    for c in declared:
        add(E.ExpectColumnToExist, f"column.{c}.exists", column=c)
    for t in cfg.tasks:
        check = f"task.{t.name}.label_domain"
        if t.type == "binary":
            add(E.ExpectColumnValuesToBeInSet, check, column=t.column, value_set=[0, 1])
        elif t.type == "multiclass" and (t.num_classes or 0) <= MAX_INSET_CLASSES:
            add(E.ExpectColumnValuesToBeInSet, check, column=t.column, value_set=list(range(t.num_classes or 0)))
        elif t.type in ("multiclass", "retrieval"):
            high = (t.num_classes if t.type == "multiclass" else t.vocab_size) or 1
            add(E.ExpectColumnValuesToBeBetween, check, column=t.column, min_value=0, max_value=high - 1)
        else:
            lo, hi = t.bounds if t.bounds is not None else (-FLOAT_MAX, FLOAT_MAX)
            add(E.ExpectColumnValuesToBeBetween, check, column=t.column, min_value=lo, max_value=hi)
        add(E.ExpectColumnProportionOfNonNullValuesToBeBetween, f"task.{t.name}.has_targets",
            column=t.column, min_value=0.0, strict_min=True)
        if t.min_availability > 0:
            add(E.ExpectColumnProportionOfNonNullValuesToBeBetween, f"task.{t.name}.min_availability",
                "critical" if t.on_low_availability == "fail" else "warning",
                column=t.column, min_value=t.min_availability)
    for f in cfg.numeric_features:
        if f in floats:
            add(E.ExpectColumnValuesToBeBetween, f"feature.{f}.finite", column=f,
                min_value=-FLOAT_MAX, max_value=FLOAT_MAX)
    for f in [*cfg.numeric_features, *cfg.categorical_features]:
        add(E.ExpectColumnProportionOfNonNullValuesToBeBetween, f"feature.{f}.not_all_null", "warning",
            column=f, min_value=0.0, strict_min=True)
    if cfg.cluster_column:
        add(E.ExpectColumnValuesToBeBetween, "cluster.in_range", "warning",
            column=cfg.cluster_column, min_value=0, max_value=cfg.num_clusters - 1)
    if cfg.split.method == "column":
        add(E.ExpectColumnValuesToBeInSet, "split.known_values", "warning",
            column=cfg.split.column, value_set=["train", "val", "test"])
    return gx.ExpectationSuite(name=suite_name(cfg), expectations=exps)


def load_expectations(path: str | Path) -> list[Any]:
    """User expectations from a JSON or YAML file: a serialized GX suite or a list.

    Each item is a GX expectation configuration: ``{"type": "expect_...", "kwargs":
    {...}, "meta": {...}, "severity": "critical" | "warning" | "info"}``. Raises
    ConfigError naming the file and the item when the file or an item is invalid.
    """
    gx = import_gx()
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: expectations file not found")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise ConfigError(f"{p}: cannot parse the expectations file ({str(e).splitlines()[0]})") from e
    items = data.get("expectations") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ConfigError(f"{p}: expected a GX suite with an `expectations` list, or a list of expectations")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "type" not in item:
            raise ConfigError(f"{p}: key `expectations[{i}]` must be a mapping with `type` and `kwargs`")
        unknown = set(item) - {"type", "kwargs", "meta", "severity", "id", "notes", "description"}
        if unknown:
            raise ConfigError(f"{p}: key `expectations[{i}].{sorted(unknown)[0]}` is not a GX expectation field")
        try:
            exp = ExpectationConfiguration(
                type=item["type"], kwargs=dict(item.get("kwargs") or {}), meta=dict(item.get("meta") or {}),
                severity=item.get("severity", "critical"),
            ).to_domain_obj()
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{p}: key `expectations[{i}]` ({item['type']}) is not a valid GX expectation: {first}") from e
        if META_KEY in (exp.meta or {}):
            raise ConfigError(f"{p}: key `expectations[{i}].meta.{META_KEY}` is reserved for built-in checks")
        out.append(exp)
    del gx
    return out


# ----------------------------------------------------------------------------------- running


@dataclass
class ExpectationOutcome:
    """One expectation's result merged over every chunk the suite saw."""

    index: int
    type: str
    kwargs: dict[str, Any]
    meta: dict[str, Any]
    severity: str
    success: bool = True
    element_count: int = 0
    missing_count: int = 0
    unexpected_count: int | None = None
    partial_unexpected_list: list[Any] = field(default_factory=list)
    observed_value: Any = None
    exception: str | None = None
    chunks: int = 0

    @property
    def check(self) -> str | None:
        return self.meta.get(META_KEY)

    @property
    def unexpected_percent(self) -> float | None:
        """Percent of the non-null rows that were unexpected (GX's convention)."""
        if self.unexpected_count is None:
            return None
        nonmissing = self.element_count - self.missing_count
        return 100.0 * self.unexpected_count / nonmissing if nonmissing else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "kwargs": self.kwargs,
            "severity": self.severity,
            "success": self.success,
            "element_count": self.element_count,
            "missing_count": self.missing_count,
            "unexpected_count": self.unexpected_count,
            "unexpected_percent": self.unexpected_percent,
            "partial_unexpected_list": self.partial_unexpected_list,
            "observed_value": self.observed_value,
            "exception": self.exception,
            "chunks": self.chunks,
        }


@dataclass
class SuiteRun:
    suite_name: str
    gx_version: str
    rows: int
    chunks: int
    outcomes: list[ExpectationOutcome]

    @property
    def success(self) -> bool:
        return all(o.success for o in self.outcomes)


def _plain(v: Any) -> Any:
    """numpy scalars and containers to plain Python for JSON."""
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        try:
            return v.item()
        except (ValueError, AttributeError):
            return str(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def _exception_message(info: Any) -> str | None:
    """The first exception message in a GX ``exception_info`` (flat or keyed by metric)."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        lines = str(info.get("exception_message") or "exception").strip().splitlines()
        return lines[0] if lines else "exception"
    for v in info.values():
        if isinstance(v, dict) and v.get("raised_exception"):
            lines = str(v.get("exception_message") or "exception").strip().splitlines()
            return lines[0] if lines else "exception"
    return None


def _merge(o: ExpectationOutcome, res: Any, chunk_rows: int) -> None:
    r = res.result or {}
    o.chunks += 1
    err = _exception_message(res.exception_info)
    if err is not None:
        o.exception = o.exception or err
        o.success = False
        return
    if "unexpected_count" in r:  # column-map expectation: counts add up over chunks
        o.element_count += int(r.get("element_count") or 0)
        o.missing_count += int(r.get("missing_count") or 0)
        o.unexpected_count = (o.unexpected_count or 0) + int(r.get("unexpected_count") or 0)
        room = MAX_PARTIAL - len(o.partial_unexpected_list)
        if room > 0:
            o.partial_unexpected_list += _plain(list(r.get("partial_unexpected_list") or [])[:room])
        mostly = o.kwargs.get("mostly")
        nonmissing = o.element_count - o.missing_count
        if mostly is None:
            o.success = o.unexpected_count == 0
        else:
            o.success = nonmissing == 0 or (1 - o.unexpected_count / nonmissing) >= float(mostly)
        return
    o.element_count += chunk_rows
    if o.type == "expect_column_proportion_of_non_null_values_to_be_between" and "observed_value" in r:
        # a proportion merges exactly: weight each chunk by its rows
        prev = (o.observed_value or 0.0) * (o.element_count - chunk_rows)
        o.observed_value = (prev + float(r["observed_value"]) * chunk_rows) / o.element_count
        lo, hi = o.kwargs.get("min_value"), o.kwargs.get("max_value")
        v = o.observed_value
        ok = True
        if lo is not None:
            ok = ok and (v > lo if o.kwargs.get("strict_min") else v >= lo)
        if hi is not None:
            ok = ok and (v < hi if o.kwargs.get("strict_max") else v <= hi)
        o.success = ok
        return
    # any other aggregate expectation: it must hold on every chunk
    o.observed_value = _plain(r.get("observed_value")) if o.chunks == 1 else o.observed_value
    o.success = o.success and bool(res.success)


def _key(cfg: Any) -> str:
    """An identity of an expectation configuration, stable between suite and result."""
    kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
    return json.dumps([cfg.type, _plain(kwargs), _plain(dict(cfg.meta or {}))], sort_keys=True, default=str)


def _to_pandas(table: pa.Table) -> Any:
    """A pandas frame of a chunk; narrow numbers are widened to int64 / float64, the
    dtypes GX's pandas engine evaluates vectorised (float32 would go row by row)."""
    import pyarrow as pa

    fields = []
    for f in table.schema:
        t = f.type
        if pa.types.is_floating(t) and t != pa.float64():
            t = pa.float64()
        elif pa.types.is_integer(t) and t != pa.int64() and t != pa.uint64():
            t = pa.int64()
        fields.append(pa.field(f.name, t))
    target = pa.schema(fields)
    if target != table.schema:
        table = table.cast(target)
    return table.to_pandas()


def _domain_columns(cfg: Any) -> tuple[str, ...] | None:
    """The columns an expectation reads, or None when it needs the whole table."""
    kw = cfg.kwargs
    if kw.get("row_condition"):
        return None
    cols = [kw[k] for k in ("column", "column_A", "column_B") if isinstance(kw.get(k), str)]
    if isinstance(kw.get("column_list"), list):
        cols += [c for c in kw["column_list"] if isinstance(c, str)]
    return tuple(dict.fromkeys(cols)) or None


def _standalone(e: Any) -> Any:
    """The expectation itself, or a fresh copy when it already belongs to a stored suite."""
    if getattr(e, "id", None) is None:
        return e
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    c = e.configuration
    return ExpectationConfiguration(type=c.type, kwargs=dict(c.kwargs), meta=dict(c.meta or {}),
                                    severity=e.severity).to_domain_obj()


def run_suite(
    suite: gx.ExpectationSuite,
    chunks: Iterable[pa.Table],
    log: Callable[[str], None] = print,
) -> SuiteRun:
    """Validate every chunk with ``suite`` in an ephemeral GX context; merge the results.

    Column expectations run on narrow frames holding only their columns, a few columns
    per GX call (GX's pandas engine copies the frame it validates for every map metric,
    so narrow frames are much faster); table-level expectations and those with a
    ``row_condition`` see the whole chunk.
    """
    gx = import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = (
        ctx.data_sources.add_pandas("ple_adatt")
        .add_dataframe_asset("dataset")
        .add_batch_definition_whole_dataframe("chunk")
    )
    outcomes: list[ExpectationOutcome] = []
    by_cols: dict[tuple[str, ...] | None, list[tuple[Any, ExpectationOutcome]]] = {}
    for i, e in enumerate(suite.expectations):
        cfg = e.configuration
        kwargs = {k: _plain(v) for k, v in cfg.kwargs.items() if k != "batch_id"}
        severity = str(getattr(e.severity, "value", e.severity))
        o = ExpectationOutcome(i, cfg.type, kwargs, dict(cfg.meta or {}), severity)
        outcomes.append(o)
        by_cols.setdefault(_domain_columns(cfg), []).append((_standalone(e), o))
    # pack column groups into frames of about BATCH_COLUMNS columns: narrow enough that
    # GX's per-metric frame copies stay cheap, few enough calls to keep its overhead low
    groups: list[tuple[tuple[str, ...] | None, list[tuple[Any, ExpectationOutcome]]]] = []
    batch_cols: list[str] = []
    batch: list[tuple[Any, ExpectationOutcome]] = []
    for cols, members in by_cols.items():
        if cols is None:
            groups.append((None, members))
            continue
        if batch and len(set(batch_cols) | set(cols)) > BATCH_COLUMNS:
            groups.append((tuple(batch_cols), batch))
            batch_cols, batch = [], []
        batch_cols += [c for c in cols if c not in batch_cols]
        batch += members
    if batch:
        groups.append((tuple(batch_cols), batch))
    subsuites = [
        gx.ExpectationSuite(name=f"{suite.name}[{','.join(cols or ('*',))}]", expectations=[e for e, _ in members])
        for cols, members in groups
    ]
    rows = n_chunks = 0
    for table in chunks:
        df = _to_pandas(table)
        for (cols, members), subsuite in zip(groups, subsuites, strict=True):
            frame = df[list(cols)] if cols is not None and all(c in df.columns for c in cols) else df
            res = batch_def.get_batch(batch_parameters={"dataframe": frame}).validate(
                subsuite, result_format="SUMMARY")
            # GX returns results in its own order: match them by configuration
            pending: dict[str, list[ExpectationOutcome]] = {}
            for e, o in members:
                pending.setdefault(_key(e.configuration), []).append(o)
            for r in res.results:
                _merge(pending[_key(r.expectation_config)].pop(0), r, len(df))
        rows += len(df)
        n_chunks += 1
        del df
        if n_chunks > 1:
            log(f"  GX chunk {n_chunks}: {rows:,} rows validated")
    return SuiteRun(suite.name, gx.__version__, rows, n_chunks, outcomes)
