"""``ple-adatt generate``: write the synthetic 16-task dataset with planted task structure."""

from __future__ import annotations

import argparse
import time


def _rows(text: str) -> int:
    """``--rows``: an integer >= 1 (argparse turns the ValueError into a usage error, exit 2)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="Parquet file to write (*.parquet), e.g. data/synthetic.parquet")
    parser.add_argument("--rows", type=_rows, default=20_000, help="number of rows, >= 1 (default 20000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    from ..errors import StageError
    from .files import check_parquet_out
    from .synthetic import write_parquet

    if args.rows < 1:  # callers that build the namespace themselves
        raise StageError(f"--rows must be >= 1, got {args.rows}")
    # a directory, a non-.parquet name, an existing dataset without --force: refused before generating
    check_parquet_out(args.out, replace=getattr(args, "force", False))
    t0 = time.perf_counter()
    path = write_parquet(args.out, rows=args.rows, seed=args.seed)
    print(f"wrote {args.rows} rows to {path} in {time.perf_counter() - t0:.1f}s")
    return 0
