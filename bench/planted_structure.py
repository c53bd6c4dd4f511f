"""Measure what adaTT's affinity finds in the synthetic data's planted structure.

    .venv/bin/python bench/planted_structure.py --rows 20000 --seeds 0 1 2

For each seed: generate data, run Phase 1 of the CPU config, and print the mean affinity
within planted groups, across groups, the conflicting pair's affinity and the most
negative pair. These are the numbers the README quotes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from ple_adatt.data.synthetic import CONFLICT_PAIR, GROUPS, write_parquet
from ple_adatt.stages.train_common import run_phase1

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", default=str(ROOT / "configs/train/cpu_small.yaml"))
    args = ap.parse_args()
    group = {t: g for g, ms in GROUPS.items() for t in ms}
    print(f"{'seed':>4} {'within':>8} {'across':>8} {'ctr-churn':>10}  most negative pair")
    with tempfile.TemporaryDirectory() as d:
        for seed in args.seeds:
            data = write_parquet(Path(d) / f"s{seed}.parquet", rows=args.rows, seed=seed)
            m = run_phase1(data=data, data_config=ROOT / "configs/data/synthetic.yaml", config=args.config,
                           out=Path(d) / f"p{seed}", overrides=[f"seed={seed}"], log=lambda _m: None)
            names = m["tasks"]
            A = np.array(m["affinity_history"][-1]["matrix"])
            n = len(names)
            within = [A[i, j] for i in range(n) for j in range(n) if i != j and group[names[i]] == group[names[j]]]
            across = [A[i, j] for i in range(n) for j in range(n) if group[names[i]] != group[names[j]]]
            a, b = (names.index(t) for t in CONFLICT_PAIR)
            off = A + np.eye(n) * 9
            i, j = np.unravel_index(off.argmin(), off.shape)
            print(f"{seed:>4} {np.mean(within):8.3f} {np.mean(across):8.3f} {A[a, b]:10.3f}  "
                  f"{names[i]}-{names[j]} {A[i, j]:.3f}")


if __name__ == "__main__":
    main()
