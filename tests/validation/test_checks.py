"""Every check of the validate stage, on small data, with the real GX suite."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from vhelpers import SMALL_YAML, Env, one_error_line, small_frame

from ple_adatt.artifacts import path_sha256, read_manifest
from ple_adatt.config import load_data_config
from ple_adatt.data.dataset import SPLIT_COLUMN, split_expr
from ple_adatt.validation import read_enabled_tasks


def test_clean_data_passes_with_exact_numbers(env: Env) -> None:
    df = small_frame()
    rc, out, err = env.run()
    assert rc == 0, err
    assert "counting availability over 2,000 rows" in out
    r = env.report()
    assert r["passed"] is True
    assert r["enabled_tasks"] == ["click", "kind", "value", "item"]
    assert r["rows"] == 2000
    # every availability number equals an independent count
    cfg = load_data_config(env.config)
    with_split = df.with_columns(split_expr(cfg.split, dict(df.schema)))
    for name, col in [("click", "y_click"), ("kind", "y_kind"), ("value", "y_value"), ("item", "y_item")]:
        t = r["tasks"][name]
        assert t["available"] == df[col].is_not_null().sum()
        assert t["rate"] == pytest.approx(df[col].is_not_null().mean())
        for s in ("train", "val", "test"):
            part = with_split.filter(pl.col(SPLIT_COLUMN) == s)
            assert t["per_split"][s]["rows"] == part.height
            assert t["per_split"][s]["available"] == part[col].is_not_null().sum()
        for c in ("0", "1", "2"):
            part = df.filter(pl.col("cl") == int(c))
            assert t["per_cluster"][c]["available"] == part[col].is_not_null().sum()
            assert t["per_cluster"][c]["rows"] == part.height
        unknown = df.filter(pl.col("cl").is_null())
        assert t["per_cluster"]["unknown"]["rows"] == unknown.height
        assert t["per_cluster"]["unknown"]["available"] == unknown[col].is_not_null().sum()
        assert t["decision"] == "enabled"
    assert sum(r["splits"]["rows"][s] for s in ("train", "val", "test")) == 2000
    assert r["features"]["f_num"]["null_rate"] == 0.0
    assert r["clusters"]["rows"]["unknown"] == df["cl"].is_null().sum()
    # every check passed and each built-in one with a GX counterpart carries the GX result
    assert all(c["passed"] for c in r["checks"])
    dom = env.check("task.kind.label_domain")
    assert dom["gx"]["type"] == "expect_column_values_to_be_in_set"
    assert dom["gx"]["element_count"] == 2000 and dom["gx"]["unexpected_count"] == 0
    assert r["gx"]["sample"]["method"] == "all rows"
    # artifacts: manifest, input hash, suite, html
    man = read_manifest(env.out, "validation", (1,))
    assert man["inputs"]["data"] == "sha256:" + path_sha256(env.data)
    assert man == r["manifest"]
    assert read_enabled_tasks(env.out) == r["enabled_tasks"]
    suite = json.loads((env.out / "expectation_suite.json").read_text())
    assert len(suite["expectations"]) == r["gx"]["expectations"]
    html = (env.out / "validation.html").read_text()
    assert "PASSED" in html and "click" in html
    assert not [t for t in ("http://", "https://", "<script", "<link", "@import", "src=") if t in html]


def _bad(env: Env, column: str, values: dict[int, object], dtype: pl.DataType | None = None) -> tuple[int, str]:
    df = small_frame()
    vals = df[column].to_list()
    for i, v in values.items():
        vals[i] = v
    df = df.with_columns(pl.Series(column, vals, dtype=dtype or df.schema[column], strict=False))
    env.write(df)
    rc, _, err = env.run()
    return rc, err


def test_binary_label_outside_domain_fails_naming_task_count_examples(env: Env) -> None:
    rc, err = _bad(env, "y_click", {3: 2, 10: 7, 11: 2, 12: -1})
    assert rc == 2
    line = one_error_line(err)
    assert "task 'click'" in line and "4 of" in line and "y_click" in line
    assert "{0, 1}" in line and "e.g. 2, 7, -1" in line
    assert not env.out.exists()


@pytest.mark.parametrize(
    ("values", "count"),
    [({0: 4, 1: 4}, 2), ({0: -1}, 1), ({5: 1.5}, 1)],
    ids=["at-K", "negative", "non-integral"],
)
def test_multiclass_labels_outside_0_K_fail(env: Env, values: dict, count: int) -> None:
    rc, err = _bad(env, "y_kind", values, pl.Float64)
    assert rc == 2
    line = one_error_line(err)
    assert "task 'kind'" in line and f"{count:,} of" in line and "[0, 4)" in line


@pytest.mark.parametrize(
    ("values", "example"),
    [({0: 150.0}, "150"), ({0: float("inf")}, "inf"), ({0: float("nan")}, "nan"), ({0: -0.5}, "-0.5")],
    ids=["above-bound", "inf", "nan", "below-bound"],
)
def test_regression_targets_must_be_finite_and_in_bounds(env: Env, values: dict, example: str) -> None:
    rc, err = _bad(env, "y_value", values)
    assert rc == 2
    line = one_error_line(err)
    assert "task 'value'" in line and "finite values in [0, 100]" in line and f"e.g. {example}" in line


def test_retrieval_ids_outside_vocabulary_fail(env: Env) -> None:
    rc, err = _bad(env, "y_item", {0: 1000, 1: 5000})
    assert rc == 2
    assert "task 'item'" in one_error_line(err) and "[0, 1000)" in err


def test_gx_suite_sees_the_bad_labels(env: Env) -> None:
    """The real GX expectation runs and finds what the exact count finds (all rows sampled)."""
    df = small_frame().with_columns(pl.col("y_click").fill_null(0))
    df = df.with_columns(pl.when(pl.col("uid") < 3).then(5).otherwise(pl.col("y_click")).alias("y_click"))
    env.write(df)
    rc, _, err = env.run("--failure-report", str(env.tmp / "failed"))
    assert rc == 2 and "3 of 2,000 targets" in err
    r = json.loads((env.tmp / "failed" / "availability.json").read_text())
    assert r["passed"] is False and r["manifest"]["kind"] == "validation_failed"
    c = next(c for c in r["checks"] if c["id"] == "task.click.label_domain")
    assert c["passed"] is False and c["observed"] == 3
    assert c["gx"]["success"] is False and c["gx"]["unexpected_count"] == 3
    assert c["gx"]["partial_unexpected_list"] == [5, 5, 5]
    assert r["tasks"]["click"]["decision"] == "failed"
    assert "FAILED" in (env.tmp / "failed" / "validation.html").read_text()
    assert not env.out.exists()


def test_task_without_any_target_fails(env: Env) -> None:
    env.write(small_frame().with_columns(pl.lit(None, dtype=pl.Int64).alias("y_kind")))
    rc, _, err = env.run()
    assert rc == 2
    line = one_error_line(err)
    assert "task 'kind'" in line and "no target at all" in line and "y_kind" in line


def test_all_null_column_of_dtype_null_is_a_task_without_target(env: Env) -> None:
    env.write(small_frame().with_columns(pl.lit(None).alias("y_item")))
    rc, _, err = env.run()
    assert rc == 2 and "task 'item'" in err and "no target at all" in err


def test_low_availability_fails_under_policy_fail(env: Env) -> None:
    env.set_config(SMALL_YAML.replace("type: binary, min_availability: 0.5", "type: binary, min_availability: 0.95"))
    rc, _, err = env.run()
    assert rc == 2
    line = one_error_line(err)
    assert "task 'click'" in line and "under its min_availability 95.00%" in line
    assert "on_low_availability: disable" in line  # names the fix
    assert not env.out.exists()


def test_low_availability_disables_under_policy_disable(env: Env) -> None:
    env.set_config(SMALL_YAML.replace("vocab_size: 1000, min_availability: 0.2", "vocab_size: 1000, min_availability: 0.7"))
    rc, out, err = env.run()
    assert rc == 0, err
    assert "warning: task 'item': availability" in out and "task disabled" in out
    r = env.report()
    assert r["enabled_tasks"] == ["click", "kind", "value"]
    assert r["disabled_tasks"] == ["item"]
    assert r["tasks"]["item"]["decision"] == "disabled"
    c = env.check("task.item.min_availability")
    assert c["passed"] is False and c["severity"] == "warning"
    assert c["gx"]["severity"] == "warning" and c["gx"]["success"] is False
    assert read_enabled_tasks(env.out) == ["click", "kind", "value"]


def test_every_task_disabled_fails(env: Env) -> None:
    text = SMALL_YAML.replace("min_availability: 0.5}", "min_availability: 0.99, on_low_availability: disable}")
    text = text.replace("min_availability: 0.3}", "min_availability: 0.99, on_low_availability: disable}")
    text = text.replace("vocab_size: 1000, min_availability: 0.2", "vocab_size: 1000, min_availability: 0.99")
    env.set_config(text)
    rc, _, err = env.run()
    assert rc == 2 and "no task is left enabled" in one_error_line(err)


def test_no_train_targets_follows_policy(env: Env) -> None:
    df = small_frame()
    cfg = load_data_config(env.config)
    in_train = df.with_columns(split_expr(cfg.split, dict(df.schema)))[SPLIT_COLUMN] == "train"
    df = df.with_columns(pl.when(in_train).then(None).otherwise(pl.col("y_item")).alias("y_item"))
    env.write(df)
    env.set_config(SMALL_YAML.replace("vocab_size: 1000, min_availability: 0.2", "vocab_size: 1000, min_availability: 0.0"))
    rc, _, err = env.run()
    assert rc == 0, err
    assert env.report()["tasks"]["item"]["decision"] == "disabled"
    assert env.check("task.item.train_targets")["passed"] is False


def test_infinite_numeric_feature_fails_nan_counts_as_missing(env: Env) -> None:
    df = small_frame()
    vals = df["f_num"].to_numpy().copy()
    vals[:5] = np.nan
    env.write(df.with_columns(pl.Series("f_num", vals)))
    rc, _, err = env.run()
    assert rc == 0, err
    assert env.report()["features"]["f_num"]["nan"] == 5
    assert env.report()["features"]["f_num"]["null_rate"] == pytest.approx(5 / 2000)
    vals[7] = np.inf
    env.write(df.with_columns(pl.Series("f_num", vals)))
    rc, _, err = env.run()
    assert rc == 2
    assert "numeric feature `f_num`" in one_error_line(err) and "1 infinite" in err


def test_all_null_feature_is_a_warning(env: Env) -> None:
    env.write(small_frame().with_columns(pl.lit(None, dtype=pl.Utf8).alias("f_cat")))
    rc, out, err = env.run()
    assert rc == 0, err
    assert "warning: feature `f_cat`" in out
    c = env.check("feature.f_cat.not_all_null")
    assert c["passed"] is False and c["severity"] == "warning" and c["observed"] == 1.0
    assert c["gx"]["success"] is False


def test_cluster_range_and_coverage_warnings(env: Env) -> None:
    df = small_frame().with_columns(
        pl.when(pl.col("cl") == 2).then(7).otherwise(pl.col("cl")).alias("cl"))  # no cluster 2, ids 7
    env.write(df)
    rc, out, err = env.run()
    assert rc == 0, err
    r = env.report()
    moved = (small_frame()["cl"] == 2).sum()
    assert r["clusters"]["rows"]["out_of_range"] == moved
    assert r["clusters"]["missing_in_train"] == ["2"]
    assert env.check("cluster.in_range")["passed"] is False
    assert env.check("cluster.in_range")["gx"]["unexpected_count"] == moved
    assert env.check("cluster.coverage")["observed"] == ["2"]
    assert "warning:" in out and "outside [0, 3)" in out


def test_task_cluster_coverage_warning(env: Env) -> None:
    df = small_frame().with_columns(
        pl.when(pl.col("cl") == 1).then(None).otherwise(pl.col("y_value")).alias("y_value"))
    env.write(df)
    rc, _, err = env.run()
    assert rc == 0, err
    c = env.check("task.value.cluster_coverage")
    assert c["passed"] is False and c["observed"] == ["1"]
    assert env.report()["tasks"]["value"]["per_cluster"]["1"]["available"] == 0


def test_empty_val_split_fails(env: Env) -> None:
    env.set_config(SMALL_YAML.replace("{train: 0.8, val: 0.1, test: 0.1}", "{train: 0.9, val: 0.0, test: 0.1}"))
    rc, _, err = env.run()
    assert rc == 2 and "the val split" in one_error_line(err) and "is empty" in err


def test_split_column_with_unknown_values_is_a_warning(env: Env) -> None:
    df = small_frame()
    names = np.array(["train"] * 8 + ["val", "test"])[np.arange(df.height) % 10].tolist()
    names[0] = "holdout"
    env.write(df.with_columns(pl.Series("part", names)))
    env.set_config(SMALL_YAML.replace("{method: hash, key: uid,", "{method: column, column: part,"))
    rc, out, err = env.run()
    assert rc == 0, err
    r = env.report()
    assert r["splits"]["rows"]["other"] == 1 and r["splits"]["rows"]["val"] == 200
    assert r["splits"]["fractions"] == {}  # the column names each row's split: no configured cut to show
    c = env.check("split.known_values")
    assert c["passed"] is False and c["gx"]["partial_unexpected_list"] == ["holdout"]


def test_gx_sample_and_chunks(env: Env) -> None:
    env.write(small_frame(n=3000))
    rc, _, err = env.run("--gx-rows", "all", "--gx-chunk-rows", "700")
    assert rc == 0, err
    r = env.report()
    assert r["gx"]["sample"]["chunks"] == 5 and r["gx"]["sample"]["rows"] == 3000
    c = env.check("task.click.label_domain")["gx"]
    assert c["element_count"] == 3000 and c["chunks"] == 5
    prop = env.check("task.click.min_availability")["gx"]["observed_value"]
    assert prop == pytest.approx(r["tasks"]["click"]["rate"])  # a proportion merges exactly
    rc, _, err = env.run("--gx-rows", "500")
    assert rc == 0, err
    s = env.report()["gx"]["sample"]
    assert s["method"] == "systematic sample" and 400 <= s["rows"] <= 1500
    assert env.report()["tasks"]["click"]["rows"] == 3000  # exact counts still cover every row
