"""The GX suite built from the config, user extensions, and chunked runs (real GX)."""

from __future__ import annotations

import json

import polars as pl
import pytest
from vhelpers import SMALL_YAML, Env, one_error_line, small_frame

from ple_adatt.config import load_data_config
from ple_adatt.validation import build_suite, run_suite, validate_dataset
from ple_adatt.validation.suite import META_KEY


def _by_check(suite) -> dict:
    return {e.meta[META_KEY]: e for e in suite.expectations}


def test_suite_built_from_config(env: Env) -> None:
    cfg = load_data_config(env.config)
    suite = build_suite(cfg)
    assert suite.name == "ple_adatt.small"
    e = _by_check(suite)
    assert e["task.click.label_domain"].expectation_type == "expect_column_values_to_be_in_set"
    assert e["task.click.label_domain"].value_set == [0, 1]
    assert e["task.kind.label_domain"].value_set == [0, 1, 2, 3]
    assert (e["task.item.label_domain"].min_value, e["task.item.label_domain"].max_value) == (0, 999)
    assert (e["task.value.label_domain"].min_value, e["task.value.label_domain"].max_value) == (0.0, 100.0)
    assert e["task.click.min_availability"].min_value == 0.5
    assert e["task.click.min_availability"].severity.value == "critical"  # on_low_availability: fail
    assert e["task.item.min_availability"].severity.value == "warning"  # on_low_availability: disable
    assert e["cluster.in_range"].max_value == 2
    assert {f"column.{c}.exists" for c in ("uid", "cl", "f_num", "y_item")} <= set(e)
    assert "feature.f_cat.finite" not in e  # strings are not checked for finiteness


def test_python_extension_of_the_suite(env: Env) -> None:
    """Users extend the built suite the GX way and hand it to validate_dataset."""
    import great_expectations as gx

    cfg = load_data_config(env.config)
    context = gx.get_context(mode="ephemeral")
    suite = context.suites.add(build_suite(cfg))  # stored suites take add_expectation
    suite.add_expectation(gx.expectations.ExpectColumnMeanToBeBetween(column="f_num", min_value=5, max_value=6,
                                                                      severity="warning"))
    suite.add_expectation(gx.expectations.ExpectColumnValuesToBeUnique(column="uid"))
    report = validate_dataset(env.data, cfg, config_path=env.config, suite=suite, log=lambda s: None)
    assert report.passed  # a failed warning does not fail the stage
    user = [c for c in report.data["checks"] if c["source"] == "gx"]
    assert [c["gx"]["type"] for c in user] == ["expect_column_mean_to_be_between", "expect_column_values_to_be_unique"]
    assert user[0]["passed"] is False and user[0]["severity"] == "warning"
    assert user[1]["passed"] is True and user[1]["severity"] == "critical"
    assert any("expect_column_mean_to_be_between" in w for w in report.data["warnings"])


def test_expectations_file_critical_failure_fails_the_stage(env: Env) -> None:
    f = env.tmp / "extra.json"
    f.write_text(json.dumps({"name": "mine", "expectations": [
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "f_cat", "value_set": ["c0", "c1"]}},
    ]}))
    rc, _, err = env.run("--expectations", str(f))
    assert rc == 2
    line = one_error_line(err)
    assert "GX expectation expect_column_values_to_be_in_set on column `f_cat` failed" in line


def test_expectations_yaml_warning_is_reported(env: Env) -> None:
    f = env.tmp / "extra.yaml"
    f.write_text("- type: expect_column_values_to_be_between\n"
                 "  kwargs: {column: f_num, min_value: -1, max_value: 1, mostly: 0.99}\n"
                 "  severity: warning\n"
                 "- type: expect_table_row_count_to_be_between\n"
                 "  kwargs: {min_value: 1000, max_value: 3000}\n")
    rc, out, err = env.run("--expectations", str(f))
    assert rc == 0, err
    checks = [c for c in env.report()["checks"] if c["source"] == "gx"]
    assert len(checks) == 2
    between, rows = checks
    assert between["passed"] is False and between["gx"]["unexpected_count"] > 0
    assert rows["passed"] is True and rows["subject"] == "table"
    assert "warning: GX expectation expect_column_values_to_be_between" in out
    suite = json.loads((env.out / "expectation_suite.json").read_text())
    assert suite["expectations"][-1]["type"] == "expect_table_row_count_to_be_between"


def test_expectation_on_missing_column_fails_naming_the_file_and_item(env: Env) -> None:
    f = env.tmp / "extra.json"
    f.write_text(json.dumps([{"type": "expect_column_to_exist", "kwargs": {"column": "f_num"}},
                             {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "ghost"}}]))
    rc, _, err = env.run("--expectations", str(f))
    assert rc == 2 and one_error_line(err).endswith(
        f"{f}: key `expectations[1]` (expect_column_values_to_not_be_null) names the column `ghost`, which "
        f"{env.data} does not have")
    assert not env.out.exists()


def test_expectations_that_may_meet_a_missing_column_leave_it_to_gx(env: Env) -> None:
    """expect_column_to_exist checks exactly that, and a warning-severity one only warns."""
    f = env.tmp / "extra.json"
    f.write_text(json.dumps([
        {"type": "expect_column_to_exist", "kwargs": {"column": "ghost"}, "severity": "warning"},
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "ghost"}, "severity": "warning"}]))
    rc, out, err = env.run("--expectations", str(f))
    assert rc == 0, err
    assert [c["passed"] for c in env.report()["checks"] if c["source"] == "gx"] == [False, False]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('[{"type": "expect_nonsense", "kwargs": {}}]', "expectations[0]` (expect_nonsense) is not a valid GX expectation"),
        ('{"expectations": 3}', "an `expectations` list"),
        ('[{"kwargs": {}}]', "expectations[0]` must be a mapping with `type`"),
        ("{not json", "cannot parse"),
        ('[{"type": "expect_column_to_exist", "kwargs": {"column": "x"}, "meta": {"ple_adatt_check": "x"}}]',
         "reserved"),
    ],
    ids=["unknown-type", "not-a-list", "no-type", "bad-json", "reserved-meta"],
)
def test_bad_expectations_file(env: Env, content: str, needle: str) -> None:
    f = env.tmp / "extra.json"
    f.write_text(content)
    rc, _, err = env.run("--expectations", str(f))
    assert rc == 2
    line = one_error_line(err)
    assert needle in line and str(f) in line
    assert not env.out.exists()


def test_chunked_run_merges_like_one_chunk(env: Env) -> None:
    """Counts of map expectations add up over chunks; a proportion is weighted by rows."""
    import pyarrow as pa

    cfg = load_data_config(env.config)
    df = small_frame().with_columns(
        pl.when(pl.col("uid") % 97 == 0).then(3).otherwise(pl.col("y_click")).alias("y_click"))
    table = df.to_arrow()
    whole = run_suite(build_suite(cfg), [table], log=lambda s: None)
    parts = run_suite(build_suite(cfg), [table.slice(i, 300) for i in range(0, table.num_rows, 300)],
                      log=lambda s: None)
    assert parts.chunks == 7 and parts.rows == whole.rows == 2000
    for a, b in zip(whole.outcomes, parts.outcomes, strict=True):
        assert a.check == b.check and a.success == b.success, a.check
        assert a.unexpected_count == b.unexpected_count, a.check
        if isinstance(a.observed_value, float):
            assert b.observed_value == pytest.approx(a.observed_value), a.check
    dom = next(o for o in parts.outcomes if o.check == "task.click.label_domain")
    assert dom.unexpected_count == (df["uid"] % 97 == 0).sum() and not dom.success
    assert isinstance(table, pa.Table)


def test_report_api_matches_cli(env: Env) -> None:
    cfg = load_data_config(env.config)
    lines: list[str] = []
    report = validate_dataset(env.data, cfg, config_path=env.config, log=lines.append)
    assert report.passed and report.enabled_tasks == ["click", "kind", "value", "item"]
    assert lines[0].startswith("dataset ") and any("counting availability" in s for s in lines)
    assert report.data["tasks"]["item"]["available"] == small_frame()["y_item"].is_not_null().sum()
    assert SMALL_YAML  # the contract the env wrote
