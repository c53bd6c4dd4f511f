"""Writing one Parquet file safely: the output path checked up front, written atomically.

``ple-adatt generate`` and ``ple-adatt convert-adult`` write a single Parquet file. The path
is checked before any work (a directory, a file standing where its parent should be, a
non-``.parquet`` name), the table goes to a hidden temporary file beside the output and is
renamed over it at the end; on any failure (also Ctrl-C) the temporary file is removed, so
nothing is left behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from .dataset import DataError

__all__ = ["check_parquet_out", "write_table_atomic"]


def check_parquet_out(out: str | Path, option: str = "--out", *, require_suffix: bool = True,
                      replace: bool = True) -> Path:
    """Refuse an output path a Parquet file cannot be written to, naming ``option`` and the path;
    with ``replace=False`` also an existing file (a dataset some run may have been trained on)."""
    out = Path(out)
    if not replace and out.is_file():
        raise DataError(f"{option} {out}: exists; pass --force to replace it")
    if out.is_dir():
        raise DataError(f"{option} {out}: is a directory; pass the path of the Parquet file to write, "
                        f"e.g. {out / 'NAME.parquet'}")
    if require_suffix and out.suffix.lower() != ".parquet":
        raise DataError(f"{option} {out}: the file written is Parquet; name it *.parquet, "
                        f"e.g. {out.with_suffix('.parquet') if out.suffix else out.with_name(out.name + '.parquet')}")
    existing = out.absolute().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"{option} {out}: cannot create it: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"{option} {out}: no permission to write in {existing}")
    return out


def write_table_atomic(table: Any, out: str | Path, option: str = "--out", **write_kwargs: Any) -> Path:
    """Write the Arrow ``table`` to ``out`` through a temporary file in the same directory.

    The temporary file is removed whatever goes wrong, ``out`` is replaced only by a complete
    file.
    """
    import pyarrow.parquet as pq

    out = check_parquet_out(out, option, require_suffix=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        pq.write_table(table, tmp, **write_kwargs)
        tmp.chmod(0o644)  # mkstemp makes it private; a dataset is meant to be shared
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
