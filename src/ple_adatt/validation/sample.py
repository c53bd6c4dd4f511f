"""Bounded reads of a Parquet dataset for the Great Expectations suite.

GX validates pandas DataFrames, so it never sees the whole of a large dataset at once:

* when the dataset has at most ``sample_rows`` rows (or ``sample_rows`` is None), every
  row is read, ``chunk_rows`` at a time;
* otherwise a deterministic systematic sample: row groups spread evenly over the files
  (at most about ten times the sample size is decoded), of which every m-th row is kept.

Chunks are pyarrow Tables; the caller converts one at a time to pandas.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

DECODE_FACTOR = 10  # decode at most this many times the sample size


@dataclass
class SamplePlan:
    """Which rows the GX suite sees."""

    method: str  # "all rows" | "systematic sample"
    rows: int  # rows the suite will see
    row_groups: int  # row groups read
    stride: int  # every stride-th row of those row groups is kept
    chunk_rows: int


def _row_groups(files: list[Path]) -> list[tuple[Path, int, int]]:
    import pyarrow.parquet as pq

    out = []
    for f in files:
        md = pq.ParquetFile(f).metadata
        out += [(f, i, md.row_group(i).num_rows) for i in range(md.num_row_groups)]
    return [rg for rg in out if rg[2] > 0]


def plan_sample(files: list[Path], total_rows: int, sample_rows: int | None, chunk_rows: int) -> tuple[SamplePlan, list[tuple[Path, int, int]]]:
    """Choose the row groups and the stride; returns the plan and the row groups to read."""
    groups = _row_groups(files)
    if sample_rows is None or total_rows <= sample_rows:
        return SamplePlan("all rows", total_rows, len(groups), 1, chunk_rows), groups
    budget = min(total_rows, DECODE_FACTOR * sample_rows)
    # evenly spaced row groups until their rows reach the decode budget
    order = sorted(range(len(groups)), key=lambda i: _spread_key(i, len(groups)))
    picked: list[int] = []
    decoded = 0
    for i in order:
        picked.append(i)
        decoded += groups[i][2]
        if decoded >= budget:
            break
    picked.sort()
    chosen = [groups[i] for i in picked]
    stride = max(1, decoded // sample_rows)
    kept = sum((n + stride - 1) // stride for _, _, n in chosen)
    return SamplePlan("systematic sample", kept, len(chosen), stride, chunk_rows), chosen


def _spread_key(i: int, n: int) -> float:
    """Order 0..n-1 so that every prefix is spread over the range (bit-reversal order)."""
    if n <= 1:
        return 0.0
    bits = max(1, (n - 1).bit_length())
    rev = int(format(i, f"0{bits}b")[::-1], 2)
    return rev + i / (n + 1.0) * 1e-9


def iter_chunks(plan: SamplePlan, groups: list[tuple[Path, int, int]], columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Yield the planned rows as pyarrow Tables of at most ``plan.chunk_rows`` rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    pending: list[pa.Table] = []
    pending_rows = 0
    handles: dict[Path, pq.ParquetFile] = {}
    for f, i, _n in groups:
        pf = handles.get(f)
        if pf is None:
            pf = handles[f] = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=max(plan.chunk_rows, 1), row_groups=[i], columns=columns):
            t = pa.Table.from_batches([batch])
            if plan.stride > 1:
                t = t.take(np.arange(0, t.num_rows, plan.stride))
            pending.append(t)
            pending_rows += t.num_rows
            while pending_rows >= plan.chunk_rows:
                whole = pa.concat_tables(pending, promote_options="permissive")
                yield whole.slice(0, plan.chunk_rows)
                rest = whole.slice(plan.chunk_rows)
                pending, pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
    if pending_rows:
        yield pa.concat_tables(pending, promote_options="permissive")
