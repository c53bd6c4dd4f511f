"""``ple-adatt convert-adult``: the UCI Adult file as a multi-task Parquet dataset.

    ple-adatt convert-adult --out data/adult.parquet          # reads $PLE_ADATT_ADULT_PATH or
                                                               # ../shared/data/adult/adult.data
    ple-adatt validate --data data/adult.parquet --config configs/data/adult.yaml --out runs/validate-adult
"""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .adult import DEFAULT_PATH, ENV_PATH

    parser.add_argument("--src", default=None,
                        help=f"adult.data (or adult.test); default ${ENV_PATH} or {DEFAULT_PATH} "
                        "(make adult: ADULT_SRC=PATH)")
    parser.add_argument("--out", required=True, help="Parquet file to write (*.parquet), e.g. data/adult.parquet")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    from .adult import convert, default_source
    from .files import check_parquet_out

    # a directory, a non-.parquet name, an existing dataset without --force: refused before converting
    check_parquet_out(args.out, replace=getattr(args, "force", False))
    t0 = time.perf_counter()
    src = args.src or default_source()
    path, rows = convert(src, args.out)
    print(f"wrote {rows} rows of {src} to {path} in {time.perf_counter() - t0:.1f}s "
          "(data contract: configs/data/adult.yaml)")
    return 0
