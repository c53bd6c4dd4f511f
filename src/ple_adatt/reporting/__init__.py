"""The affinity and negative-transfer report (the ``report`` stage's domain code).

* :mod:`.inputs`: read and cross-check the two checkpoints, the validation result and the
  optional single-task baselines;
* :mod:`.analysis`: the numbers (cosine form, group agreement, regrouping, blocked pairs,
  trajectories, transfer shares, GCD / TCI), plain numpy;
* :mod:`.numbers`: the report dict written as ``report.json``;
* :mod:`.svg`, :mod:`.html`, :mod:`.markdown`: the renderers, which read only that dict.

Imports torch only through :mod:`.inputs` (loading checkpoints).
"""

from __future__ import annotations

__all__ = ["REPORT_SCHEMA_VERSION"]

REPORT_SCHEMA_VERSION = 1
