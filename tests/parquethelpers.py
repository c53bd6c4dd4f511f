"""Damaged Parquet files for the bad-input tests (tests/data, tests/validation)."""

from __future__ import annotations

from pathlib import Path


def zero_data_pages(src: Path, dst: Path) -> None:
    """Write ``src`` to ``dst`` with its data pages zeroed but magic bytes and footer intact:
    a file that opens and then fails to decode."""
    raw = bytearray(src.read_bytes())
    footer = int.from_bytes(raw[-8:-4], "little") + 8
    start, end = 200, len(raw) - footer - 200
    assert end - start > 10_000
    raw[start:end] = bytes(end - start)
    dst.write_bytes(bytes(raw))
