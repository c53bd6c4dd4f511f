"""Dataset validation: the data contract checked with a Great Expectations suite.

* :mod:`.counts`: exact availability / label-domain / null counts over every row (polars);
* :mod:`.suite`: the GX 1.x suite built from the data config, user expectations, the run;
* :mod:`.sample`: the bounded chunks of rows the GX suite sees;
* :mod:`.policy`: checks, severities and the per-task decision (enabled / disabled / failed);
* :mod:`.html`: the self-contained HTML page;
* :mod:`.runner`: :func:`validate_dataset` and :func:`write_report`, used by the stage.

Importing this package is cheap: great_expectations is imported only when a suite is
built or run.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "validate_dataset": ".runner",
    "write_report": ".runner",
    "read_enabled_tasks": ".runner",
    "ValidationReport": ".runner",
    "SCHEMA_VERSION": ".runner",
    "build_suite": ".suite",
    "load_expectations": ".suite",
    "run_suite": ".suite",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
