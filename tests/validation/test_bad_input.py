"""Every bad input ends with exit code 2, one line naming what is wrong, and no output dir."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from parquethelpers import zero_data_pages
from vhelpers import SMALL_YAML, Env, one_error_line, small_frame

from ple_adatt.cli import main


def _fails(env: Env, *needles: str, data: Path | None = None, config: Path | None = None, extra: tuple = ()) -> str:
    rc, _, err = env.run(*extra, data=data, config=config)
    assert rc == 2, err
    line = one_error_line(err)
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    assert not env.out.exists()
    return line


def test_missing_path(env: Env) -> None:
    _fails(env, "nope.parquet", "dataset path not found", data=env.tmp / "nope.parquet")


def test_not_parquet(env: Env) -> None:
    p = env.tmp / "data.csv"
    p.write_text("a,b\n1,2\n")
    _fails(env, "data.csv", "not a Parquet file", data=p)


def test_directory_without_parquet(env: Env) -> None:
    d = env.tmp / "empty_dir"
    d.mkdir()
    _fails(env, "empty_dir", "no *.parquet files", data=d)


def test_truncated_parquet(env: Env) -> None:
    p = env.tmp / "broken.parquet"
    p.write_bytes(env.data.read_bytes()[:300])
    _fails(env, "broken.parquet", "truncated or corrupt", data=p)


def test_empty_dataset(env: Env) -> None:
    env.write(small_frame().head(0))
    _fails(env, "data.parquet", "empty (0 rows)")


def test_directory_with_mismatched_files(env: Env) -> None:
    d = env.tmp / "parts"
    d.mkdir()
    small_frame().write_parquet(d / "a.parquet")
    small_frame().drop("f_cat").write_parquet(d / "b.parquet")
    _fails(env, "b.parquet", "`f_cat`", "same columns", data=d)


def test_directory_dataset_is_read_whole(env: Env) -> None:
    d = env.tmp / "parts"
    d.mkdir()
    df = small_frame()
    df.head(1200).write_parquet(d / "a.parquet")
    df.tail(800).write_parquet(d / "b.parquet")
    rc, _, err = env.run(data=d)
    assert rc == 0, err
    assert env.report()["rows"] == 2000 and env.report()["dataset"]["files"] == 2


def test_declared_column_absent(env: Env) -> None:
    env.write(small_frame().drop("y_kind"))
    _fails(env, "`y_kind`", "target of task 'kind'", "is missing", str(env.config))


@pytest.mark.parametrize(
    ("column", "series", "needles"),
    [
        ("y_click", pl.Series("y_click", ["yes"] * 2000), ("`y_click`", "dtype String", "integer labels")),
        ("f_num", pl.Series("f_num", ["1.5"] * 2000), ("`f_num`", "numeric feature", "a numeric dtype")),
        ("y_value", pl.Series("y_value", ["3"] * 2000), ("`y_value`", "a numeric dtype")),
        ("cl", pl.Series("cl", ["a"] * 2000), ("`cl`", "cluster column", "integer cluster ids")),
        ("f_cat", pl.Series("f_cat", [[1]] * 2000), ("`f_cat`", "categorical feature")),
    ],
    ids=["string-target", "string-numeric-feature", "string-regression", "string-cluster", "list-categorical"],
)
def test_wrong_dtype(env: Env, column: str, series: pl.Series, needles: tuple) -> None:
    env.write(small_frame().with_columns(series))
    _fails(env, *needles)


def test_labels_outside_domain_name_task_rows_examples(env: Env) -> None:
    df = small_frame().with_columns(pl.when(pl.col("uid") < 2).then(9).otherwise(pl.col("y_kind")).alias("y_kind"))
    env.write(df)
    _fails(env, "task 'kind'", "2 of", "e.g. 9", str(env.data))


def test_unreadable_config(env: Env) -> None:
    _fails(env, "missing.yaml", "config file not found", config=env.tmp / "missing.yaml")
    bad = env.set_config("name: [unclosed\n")
    _fails(env, str(bad), "not valid YAML")


def test_unknown_config_key(env: Env) -> None:
    env.set_config(SMALL_YAML + "min_rows: 3\n")
    _fails(env, "unknown key `min_rows`")


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (("cluster_column: cl\n", ""), ("`num_clusters` is 3", "`cluster_column` is not set")),
        (("{method: hash, key: uid,", "{method: column, column: uid, key: uid,"), ("`split.key` is set", "method` is column")),
        (("{method: hash, key: uid,", "{method: hash, column: part, key: uid,"), ("`split.column` is set",)),
        (("key: uid", "key: y_click"), ("`split.key` is `y_click`", "task 'click'", "leaks")),
        (("{train: 0.8, val: 0.1, test: 0.1}", "{train: 0.0, val: 0.5, test: 0.5}"), ("split.fractions.train` must be > 0",)),
        (("num_classes: 4", "num_classes: 1"), ("tasks[1].num_classes", ">= 2")),
        (("bounds: [0.0, 100.0]", "bounds: [5.0, 1.0]"), ("tasks[2].bounds", "low < high")),
        (("column: y_kind", "column: f_num"), ("column `f_num`", "one role")),
    ],
    ids=["clusters-without-column", "key-with-column-split", "column-with-hash-split", "split-on-label",
         "no-train", "one-class", "bounds", "feature-is-target"],
)
def test_contradictory_config(env: Env, edit: tuple[str, str], needles: tuple) -> None:
    assert edit[0] in SMALL_YAML
    env.set_config(SMALL_YAML.replace(edit[0], edit[1]))
    _fails(env, str(env.config), *needles)


def test_override_is_applied_and_checked(env: Env) -> None:
    _fails(env, "`split.fractions.train` must be > 0",
           extra=("--set", "split.fractions={train: 0.0, val: 0.5, test: 0.5}"))
    rc, _, err = env.run("--set", "split.seed=3")
    assert rc == 0, err
    assert env.report()["config"]["overrides"] == ["split.seed=3"]
    assert env.report()["config"]["data_config"]["split"]["seed"] == 3


def test_bad_arguments(env: Env) -> None:
    _fails(env, "--gx-rows", extra=("--gx-rows", "lots"))
    _fails(env, "--gx-chunk-rows", extra=("--gx-chunk-rows", "0"))


def test_failed_run_keeps_previous_output(env: Env) -> None:
    rc, _, err = env.run()
    assert rc == 0, err
    before = (env.out / "availability.json").read_text()
    env.write(small_frame().drop("y_kind"))
    rc, _, err = env.run()
    assert rc == 2
    assert (env.out / "availability.json").read_text() == before  # untouched
    leftovers = [p.name for p in env.tmp.iterdir() if p.name.startswith(".out")]
    assert leftovers == []


def test_console_script_exit_code_and_single_line(env: Env) -> None:
    exe = Path(sys.executable).with_name("ple-adatt")
    env.write(small_frame().drop("f_cat"))
    proc = subprocess.run([str(exe), "validate", "--data", str(env.data), "--config", str(env.config),
                           "--out", str(env.out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr).endswith(f"the column `f_cat` (categorical feature) is missing in "
                                                f"{env.data}; declared in {env.config}")
    assert not env.out.exists()


def test_corrupt_data_pages_name_the_file(env: Env) -> None:
    d = env.tmp / "parts"
    d.mkdir()
    small_frame().write_parquet(d / "a.parquet")
    zero_data_pages(env.data, d / "b.parquet")  # the footer reads fine: only decoding fails
    line = _fails(env, f"{d / 'b.parquet'}: cannot read row group 0 (", "truncated or corrupt", data=d)
    assert "a.parquet" not in line


def test_directory_with_files_of_different_dtypes(env: Env) -> None:
    d = env.tmp / "parts"
    d.mkdir()
    small_frame().write_parquet(d / "a.parquet")
    small_frame(seed=1).with_columns(pl.col("y_click").cast(pl.Float64)).write_parquet(d / "b.parquet")
    _fails(env, f"{d / 'b.parquet'}: column `y_click` has dtype Float64, but Int64 in {d / 'a.parquet'}",
           "same dtypes", data=d)


def test_out_and_failure_report_are_checked_before_any_work(env: Env) -> None:
    afile = env.tmp / "afile"
    afile.write_text("keep")
    env.capsys.readouterr()
    for extra, needle in [
        (["--out", str(afile / "v")], f"--out {afile / 'v'}: cannot create it: {afile} is a file, not a directory"),
        (["--out", str(afile)], f"--out {afile}: exists and is not a directory"),
        (["--out", str(env.out), "--failure-report", str(afile / "f")],
         f"--failure-report {afile / 'f'}: cannot create it: {afile} is a file"),
    ]:
        rc = main(["validate", "--data", str(env.data), "--config", str(env.config), *extra])
        cap = env.capsys.readouterr()
        assert rc == 2
        assert needle in one_error_line(cap.err)
        assert "counting availability" not in cap.out  # refused before reading the data
    assert afile.read_text() == "keep" and not env.out.exists()
