"""The UCI Adult census file as a multi-task Parquet dataset (``configs/data/adult.yaml``).

The source is the comma separated ``adult.data`` (or ``adult.test``: its ``|1x3 Cross
validator`` header line and the ``.`` after the income label are handled) with 15 columns
and ``?`` for unknown values. Five tasks are derived from it; every column a task is
derived from, and every close proxy of one, is left out of the features, so no target
leaks into the inputs:

======================  ==========  ======================================  =====================================
task (target column)    type        derived from                            columns excluded from the features
======================  ==========  ======================================  =====================================
income (y_income)       binary      income ``>50K`` -> 1, ``<=50K`` -> 0    income
marital_status          multiclass  marital-status, 7 classes               marital-status, relationship (Husband /
(y_marital_status)                  (:data:`MARITAL_STATUS` order)          Wife imply married; Own-child mostly
                                                                            never married)
occupation              multiclass  occupation, 14 classes; ``?`` -> null   occupation
(y_occupation)                      (about 94% of rows carry a target)
hours_per_week          regression  hours-per-week (1 .. 99)                hours-per-week
(y_hours_per_week)
education_level         multiclass  education-num - 1, 16 ordered levels    education-num, education (the same
(y_education_level)                                                         information as a string)
======================  ==========  ======================================  =====================================

Features: numeric ``age``, ``fnlwgt``, ``capital_gain``, ``capital_loss``; categorical
``workclass``, ``race``, ``sex``, ``native_country`` (``?`` -> null). ``row_id`` (the
0-based line number among data rows) is the hash-split key and ``age_band`` the cluster
column (ages <25, 25-34, 35-44, 45-54, 55+ -> 0..4).
"""

from __future__ import annotations

import os
from pathlib import Path

from .dataset import DataError

#: the source columns, in file order
SOURCE_COLUMNS = (
    "age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation",
    "relationship", "race", "sex", "capital_gain", "capital_loss", "hours_per_week", "native_country",
    "income",
)
MARITAL_STATUS = (
    "Never-married", "Married-civ-spouse", "Divorced", "Separated", "Widowed",
    "Married-spouse-absent", "Married-AF-spouse",
)
OCCUPATION = (
    "Adm-clerical", "Armed-Forces", "Craft-repair", "Exec-managerial", "Farming-fishing",
    "Handlers-cleaners", "Machine-op-inspct", "Other-service", "Priv-house-serv", "Prof-specialty",
    "Protective-serv", "Sales", "Tech-support", "Transport-moving",
)
AGE_BANDS = (25, 35, 45, 55)  # upper edges: <25 -> 0, 25-34 -> 1, ..., >=55 -> 4
NUM_AGE_BANDS = len(AGE_BANDS) + 1
ENV_PATH = "PLE_ADATT_ADULT_PATH"
DEFAULT_PATH = "../shared/data/adult/adult.data"


def default_source() -> Path:
    """``$PLE_ADATT_ADULT_PATH`` or ``../shared/data/adult/adult.data`` (relative to the cwd)."""
    return Path(os.environ.get(ENV_PATH) or DEFAULT_PATH)


def _parse(src: Path) -> dict[str, list]:
    if not src.exists():
        raise DataError(f"{src}: UCI Adult file not found; pass --src PATH (with make: make adult ADULT_SRC=PATH) "
                        f"or set {ENV_PATH}")
    cols: dict[str, list] = {c: [] for c in SOURCE_COLUMNS}
    with open(src, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.strip()
            if not line or line.startswith("|"):  # blank lines, adult.test's header
                continue
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != len(SOURCE_COLUMNS):
                raise DataError(
                    f"{src}:{lineno}: expected {len(SOURCE_COLUMNS)} comma separated fields "
                    f"(the UCI Adult format), got {len(parts)}"
                )
            for c, v in zip(SOURCE_COLUMNS, parts, strict=True):
                cols[c].append(None if v == "?" else v)
            cols["income"][-1] = (cols["income"][-1] or "").rstrip(".")
    if not cols["age"]:
        raise DataError(f"{src}: no data rows; expected the UCI Adult format")
    return cols


def _ints(src: Path, name: str, values: list) -> list[int | None]:
    out: list[int | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            out.append(int(v))
        except ValueError:
            raise DataError(f"{src}: data row {i + 1}: column `{name}` is {v!r}, expected an integer") from None
    return out


def _codes(src: Path, name: str, values: list, classes: tuple[str, ...]) -> list[int | None]:
    index = {c: i for i, c in enumerate(classes)}
    out: list[int | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
        elif v in index:
            out.append(index[v])
        else:
            raise DataError(f"{src}: data row {i + 1}: column `{name}` has the unknown value {v!r}; "
                            f"expected one of {', '.join(classes)}")
    return out


def convert(src: str | Path, out: str | Path) -> tuple[Path, int]:
    """Convert the Adult file ``src`` into the Parquet file ``out`` (written atomically).

    Returns the output path and the number of rows.
    """
    import pyarrow as pa

    from .files import check_parquet_out, write_table_atomic

    src, out = Path(src), check_parquet_out(out, require_suffix=False)  # before the parse
    raw = _parse(src)
    n = len(raw["age"])
    age = _ints(src, "age", raw["age"])
    income = []
    for i, v in enumerate(raw["income"]):
        if v not in (">50K", "<=50K"):
            raise DataError(f"{src}: data row {i + 1}: column `income` is {v!r}, expected >50K or <=50K")
        income.append(1 if v == ">50K" else 0)
    edu = _ints(src, "education_num", raw["education_num"])
    for i, e in enumerate(edu):
        if e is not None and not 1 <= e <= 16:
            raise DataError(f"{src}: data row {i + 1}: column `education_num` is {e}, expected 1..16")

    def band(a: int | None) -> int | None:
        return None if a is None else sum(a >= edge for edge in AGE_BANDS)

    hours = _ints(src, "hours_per_week", raw["hours_per_week"])
    table = pa.table({
        "row_id": pa.array(range(n), pa.int64()),
        "age": pa.array(age, pa.int64()),
        "fnlwgt": pa.array(_ints(src, "fnlwgt", raw["fnlwgt"]), pa.int64()),
        "capital_gain": pa.array(_ints(src, "capital_gain", raw["capital_gain"]), pa.int64()),
        "capital_loss": pa.array(_ints(src, "capital_loss", raw["capital_loss"]), pa.int64()),
        "workclass": pa.array(raw["workclass"], pa.string()),
        "race": pa.array(raw["race"], pa.string()),
        "sex": pa.array(raw["sex"], pa.string()),
        "native_country": pa.array(raw["native_country"], pa.string()),
        "age_band": pa.array([band(a) for a in age], pa.int64()),
        "y_income": pa.array(income, pa.int64()),
        "y_marital_status": pa.array(_codes(src, "marital_status", raw["marital_status"], MARITAL_STATUS), pa.int64()),
        "y_occupation": pa.array(_codes(src, "occupation", raw["occupation"], OCCUPATION), pa.int64()),
        "y_hours_per_week": pa.array([None if h is None else float(h) for h in hours], pa.float64()),
        "y_education_level": pa.array([None if e is None else e - 1 for e in edu], pa.int64()),
    })
    return write_table_atomic(table, out), n
