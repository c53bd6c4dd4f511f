"""Benchmark of the validate stage: 10M rows x 16 task targets x 40 features.

    make bench-validate                                   # or:
    .venv/bin/python bench/bench_validate.py --rows 10000000

The dataset is the synthetic 16-task dataset (36 numeric + 4 categorical features, 16
targets, cluster, user_id), generated in chunks of ``--chunk-rows`` rows into one Parquet
file and cached under ``data/bench/`` (pass ``--regen`` to rebuild it). The stage runs as a
subprocess (``ple-adatt validate``, imports included, exactly what a user runs); the
benchmark prints its wall time, its CPU time, the peak resident memory of that subprocess
and the load average before the run (wall time is only meaningful on an otherwise idle
machine), and exits non-zero when a budget (``--max-seconds``, ``--max-rss-gib``) is
exceeded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(out: Path, rows: int, chunk_rows: int) -> None:
    """Write ``rows`` synthetic rows into one Parquet file, ``chunk_rows`` at a time."""
    import pyarrow.parquet as pq

    from ple_adatt.data.synthetic import generate as synth
    from ple_adatt.data.synthetic import to_arrow

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = None
    done = 0
    t0 = time.perf_counter()
    try:
        while done < rows:
            n = min(chunk_rows, rows - done)
            cols = synth(n, seed=done // chunk_rows)  # a different draw per chunk
            cols["user_id"] = cols["user_id"] + done  # ids stay unique across chunks
            table = to_arrow(cols)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table, row_group_size=256 * 1024)
            done += n
            print(f"  generated {done:,}/{rows:,} rows ({time.perf_counter() - t0:.0f}s)", flush=True)
    finally:
        if writer is not None:
            writer.close()
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--chunk-rows", type=int, default=1_000_000)
    p.add_argument("--data", type=Path, default=None,
                   help="cached dataset (default data/bench/synthetic_<rows>.parquet)")
    p.add_argument("--config", type=Path, default=ROOT / "configs/data/synthetic.yaml")
    p.add_argument("--regen", action="store_true", help="regenerate the cached dataset")
    p.add_argument("--max-seconds", type=float, default=20.0)
    p.add_argument("--max-rss-gib", type=float, default=4.0)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--track", action="store_true",
                   help="also log the run to MLflow (adds MLflow's start-up, ~5 s, to the time)")
    args = p.parse_args(argv)

    data = args.data or ROOT / "data" / "bench" / f"synthetic_{args.rows}.parquet"
    if args.regen or not data.exists():
        print(f"generating {args.rows:,} rows into {data} (cached for later runs)", flush=True)
        # in a process of its own: Linux carries a process's peak RSS into the child it starts
        # (exec records the old address space's high-water mark), so generating here made the
        # first run report the generator's memory as the stage's (1.6 GiB against 0.84 at 1M rows)
        gen = multiprocessing.get_context("spawn").Process(target=generate, args=(data, args.rows, args.chunk_rows))
        gen.start()
        gen.join()
        if gen.exitcode != 0:
            print(f"error: generating {data} failed (exit {gen.exitcode})", file=sys.stderr)
            return 1
    size_mib = data.stat().st_size / 2**20
    exe = Path(sys.executable).with_name("ple-adatt")
    with tempfile.TemporaryDirectory(prefix="bench-validate-") as tmp:
        out = Path(tmp) / "validate"
        cmd = [str(exe), "validate", "--data", str(data), "--config", str(args.config), "--out", str(out)]
        if not args.track:
            cmd.append("--no-tracking")
        print("running:", " ".join(cmd), flush=True)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own usage, not every child's (the generator's)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        rss_gib = usage.ru_maxrss / 2**20  # KiB on Linux
        cpu_seconds = usage.ru_utime + usage.ru_stime  # independent of other load on the machine
        if proc.returncode != 0:
            print(f"error: the validate stage exited with {proc.returncode}", file=sys.stderr)
            return proc.returncode
        report = json.loads((out / "availability.json").read_text())
    figures = {
        "rows": report["rows"],
        "tasks": len(report["tasks"]),
        "features": len(report["features"]),
        "parquet_mib": round(size_mib, 1),
        "seconds": round(seconds, 2),
        "peak_rss_gib": round(rss_gib, 3),
        "cpu_seconds": round(cpu_seconds, 2),
        "cpus": os.cpu_count(),
        "load_before": round(load_before, 2),  # 1-minute load average when the run started
    }
    print("bench-validate: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    over = []
    if seconds > args.max_seconds:
        over.append(f"time {seconds:.1f}s > {args.max_seconds:g}s")
    if rss_gib > args.max_rss_gib:
        over.append(f"peak RSS {rss_gib:.2f} GiB > {args.max_rss_gib:g} GiB")
    if over:
        print("bench-validate: over budget: " + "; ".join(over), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
