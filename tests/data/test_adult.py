"""The UCI Adult converter and its 5-task contract (configs/data/adult.yaml)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pytest

from ple_adatt.cli import main
from ple_adatt.config import load_data_config
from ple_adatt.data.adult import MARITAL_STATUS, OCCUPATION, SOURCE_COLUMNS, convert, default_source
from ple_adatt.data.dataset import DataError

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "data" / "adult.yaml"
ADULT = Path(os.environ.get("PLE_ADATT_ADULT_PATH") or ROOT.parent / "shared" / "data" / "adult" / "adult.data")
needs_adult = pytest.mark.skipif(
    not ADULT.is_file(), reason=f"UCI Adult not found at {ADULT}; set PLE_ADATT_ADULT_PATH to run these tests")

LINES = [
    "39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, Male, 2174, 0, 40, United-States, <=50K",
    "50, Self-emp-not-inc, 83311, Bachelors, 13, Married-civ-spouse, Exec-managerial, Husband, White, Male, 0, 0, 13, United-States, >50K",
    "23, ?, 215646, HS-grad, 9, Divorced, ?, Not-in-family, White, Female, 0, 0, 99, ?, <=50K",
    "61, Private, 234721, 11th, 7, Widowed, Sales, Unmarried, Black, Female, 0, 1902, 1, Jamaica, >50K",
]
#: source columns a task is derived from, or a close proxy of one: never features
LEAKY = {"income", "marital_status", "relationship", "occupation", "hours_per_week", "education", "education_num"}


def test_convert_small_file(tmp_path: Path) -> None:
    src = tmp_path / "adult.data"
    src.write_text("\n".join(LINES) + "\n\n")
    out, n = convert(src, tmp_path / "adult.parquet")
    assert n == 4
    df = pl.read_parquet(out)
    assert df["row_id"].to_list() == [0, 1, 2, 3]
    assert df["y_income"].to_list() == [0, 1, 0, 1]
    assert df["y_marital_status"].to_list() == [MARITAL_STATUS.index(m) for m in
                                                ("Never-married", "Married-civ-spouse", "Divorced", "Widowed")]
    assert df["y_occupation"].to_list() == [0, OCCUPATION.index("Exec-managerial"), None, OCCUPATION.index("Sales")]
    assert df["y_education_level"].to_list() == [12, 12, 8, 6]
    assert df["y_hours_per_week"].to_list() == [40.0, 13.0, 99.0, 1.0]
    assert df["age_band"].to_list() == [2, 3, 0, 4]
    assert df["workclass"].to_list()[2] is None and df["native_country"].to_list()[2] is None
    assert not {"relationship", "education", "education_num", "marital_status", "occupation"} & set(df.columns)


def test_convert_adult_test_format(tmp_path: Path) -> None:
    src = tmp_path / "adult.test"
    src.write_text("|1x3 Cross validator\n" + "\n".join(line.replace("50K", "50K.") for line in LINES) + "\n")
    out, n = convert(src, tmp_path / "t.parquet")
    assert n == 4 and pl.read_parquet(out)["y_income"].to_list() == [0, 1, 0, 1]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("39, State-gov, 77516", "adult.data:2: expected 15 comma separated fields"),
        (LINES[0].replace("Never-married", "Engaged"), "unknown value 'Engaged'"),
        (LINES[0].replace("<=50K", "maybe"), "column `income` is 'maybe'"),
        (LINES[0].replace("39,", "old,", 1), "column `age` is 'old', expected an integer"),
    ],
    ids=["field-count", "unknown-marital-status", "bad-income", "bad-age"],
)
def test_convert_rejects_malformed_input(tmp_path: Path, line: str, needle: str) -> None:
    src = tmp_path / "adult.data"
    src.write_text(LINES[0] + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        convert(src, tmp_path / "x.parquet")
    assert needle in str(e.value)
    assert not (tmp_path / "x.parquet").exists()


def test_convert_cli_missing_source(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setenv("PLE_ADATT_ADULT_PATH", str(tmp_path / "nowhere.data"))
    assert default_source() == tmp_path / "nowhere.data"
    rc = main(["convert-adult", "--out", str(tmp_path / "a.parquet")])
    err = capsys.readouterr().err
    assert rc == 2 and "nowhere.data: UCI Adult file not found" in err and "PLE_ADATT_ADULT_PATH" in err
    assert "ADULT_SRC=PATH" in err and "--src PATH" in err


def test_adult_contract_has_no_leakage() -> None:
    cfg = load_data_config(CONFIG)
    features = set(cfg.numeric_features) | set(cfg.categorical_features)
    assert not features & LEAKY
    assert not features & {t.column for t in cfg.tasks}
    assert features <= set(SOURCE_COLUMNS)
    assert [t.name for t in cfg.tasks] == ["income", "marital_status", "occupation", "hours_per_week", "education_level"]


@needs_adult
def test_validate_real_adult(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "adult.parquet"
    assert main(["convert-adult", "--src", str(ADULT), "--out", str(data)]) == 0
    out = tmp_path / "validate"
    rc = main(["validate", "--data", str(data), "--config", str(CONFIG), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    r = json.loads((out / "availability.json").read_text())
    assert r["rows"] == 32561
    assert r["enabled_tasks"] == ["income", "marital_status", "occupation", "hours_per_week", "education_level"]
    unknown_occupation = sum(1 for line in ADULT.read_text().splitlines() if line.split(", ")[6:7] == ["?"])
    assert r["tasks"]["occupation"]["available"] == 32561 - unknown_occupation
    assert r["tasks"]["income"]["rate"] == 1.0
    assert sum(r["clusters"]["rows"][str(c)] for c in range(5)) == 32561
    assert r["gx"]["sample"]["method"] == "all rows"
