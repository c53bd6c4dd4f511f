"""The strategy comparison: numbers (``compare.json``), Markdown and a self-contained HTML page.

Inputs are checkpoint manifests only (no torch): one Phase 2 checkpoint per strategy and seed
and, optionally, one single-task checkpoint per task and seed (the seed is the manifest's
``train_config.seed``). Per strategy the numbers are the mean over its seeds, with the sample
standard deviation. What it computes:

* per-task primary metric (``ple_adatt.metrics.PRIMARY_METRIC``) of every strategy and of
  the single-task baselines;
* ``delta_m`` (Maninis et al., CVPR 2019; Vandenhende et al. 2021): the mean relative gain
  over single-task, ``100/T * sum_t (-1)^{l_t} (M_t - B_t) / B_t`` with ``l_t = 1`` where
  lower is better, so positive = better than training each task alone;
* the Pareto front over the task metrics: a strategy is on it when no other strategy (or
  the single-task set) is at least as good on every task and better on one;
* training cost: Phase 1 seconds (the strategy runs in Phase 1 only), optimizer steps and
  steps per second, plus the wall time of the whole run when the stage measured it;
* TCI per task (``analysis.tci``): (L_alone - L_joint) / L_alone of the validation loss;
  negative = the task does worse jointly than alone (conflict);
* over seeds: delta-m of seed s against the baselines of seed s (paired) when the baselines
  ran every seed, a paired t interval of delta-m(reference) - delta-m(other) per strategy
  (reference: adatt when present), and the order by mean delta-m with each strategy's verdict
  against the reference beside it (the same verdicts as the paired table, so the two cannot
  disagree; pairs without the reference are not tested). Fewer than three seeds: a warning
  that the intervals rest on n - 1 degrees of freedom; several comparisons: a note on how many
  verdicts chance alone gives. One seed: a caveat instead of an interval.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import Any

from ..artifacts import ArtifactError, read_manifest
from ..metrics import PRIMARY_METRIC
from .analysis import tci

__all__ = ["COMPARE_SCHEMA_VERSION", "compare_numbers", "delta_m", "paired_difference", "pareto_front",
           "render_markdown", "render_html", "read_run", "read_runs", "t_quantile_975", "check_comparable"]

#: 2: several seeds per strategy (``seeds``, mean / sd, paired comparisons, median timings);
#: 3: ``ranking`` (order by mean delta-m with each strategy's verdict against the reference)
#: replaces the adjacent-pair ``>`` / ``≈`` chain in ``ranking_text``; ``few_seeds_warning``,
#: ``multiplicity_note``
COMPARE_SCHEMA_VERSION = 3
SINGLE = "single-task"
DELTA_M_DEFINITION = ("delta-m = 100/T * sum_t s_t (M_t - B_t) / B_t over the tasks with a single-task "
                      "baseline B_t, s_t = +1 where higher is better, -1 where lower is better "
                      "(Maninis et al. 2019); positive = better than single-task")
TCI_DEFINITION = ("TCI_t = (L_alone - L_joint) / L_alone of the validation loss, mean over seeds; "
                  "negative = conflict")
PAIRED_DEFINITION = ("paired over seeds: d_s = delta-m(reference, seed s) - delta-m(other, seed s); mean of d with "
                     "the t-based 95 % interval mean ± t(0.975, n-1)·sd/√n; 'better' / 'worse' when the interval "
                     "excludes 0, 'within noise' when it holds 0")
COST_DEFINITION = ("wall-clock on the machine that ran the compare, median over seeds (min-max in brackets). "
                   "phase-1 s: Phase 1 epoch times summed (training + validation; the strategy runs in Phase 1 "
                   "only); steps/s: Phase 1 optimizer steps / those seconds; steady steps/s: the same from the "
                   "second epoch on (the first epoch's set-up excluded; '-' with one epoch); wall: both phases "
                   "including data loading. A training compare runs one short untimed warm-up before the first "
                   "timed run, so one-time start-up (imports, first kernels) is not charged to whichever strategy "
                   "trains first. Other load on the machine shows up in these numbers")
SINGLE_SEED_CAVEAT = ("One seed: the differences between strategies below include run-to-run noise of the same "
                      "size (changing only the seed can move delta-m by points and reorder the ranking), and one "
                      "seed cannot separate them. Train several seeds, e.g. `ple-adatt compare ... --seeds 3` "
                      "(`make compare SEEDS=3`), for mean ± sd and paired intervals")
#: with n = 2 paired seeds (the only case below 3 that has an interval)
FEW_SEEDS_WARNING = ("each paired interval rests on n = {n} seeds, n - 1 = {df} degree of freedom (t(0.975, {df}) = "
                     "{t:.2f}) and an sd estimated from {n} differences: {n} seeds that happen to agree give a narrow "
                     "interval and a confident verdict. Treat the verdicts as fragile; train 3 or more seeds "
                     "(`--seeds 5`) before acting on them")
MULTIPLICITY_NOTE = ("{k} comparisons at 95 % each, no multiple-comparison correction: even if no strategy truly "
                     "differed from {ref}, about k/20 = {e:.2f} of these verdicts would read 'better' or 'worse' "
                     "by chance")
RANKING_DEFINITION = ("strategies in the order of their mean delta-m; beside each, the paired verdict of the "
                      "reference against it (the table of paired intervals). Only pairs with the reference are "
                      "tested: two strategies next to each other in this order may or may not differ")
GATES_NOTE = ("only adaTT freezes the CGC gates during Phase 1, at its freeze epoch (with its affinity freeze, "
              "as the seed specifies); every other strategy keeps training them until Phase 2 freezes them, so "
              "part of a difference between adaTT and another strategy can come from the gates. The 'gates "
              "frozen from' column shows what each run did")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_run(path: str | Path) -> dict[str, Any]:
    """The manifest of a run's final checkpoint: ``path`` is a checkpoint dir or a run dir
    holding ``phase2`` (preferred) or ``phase1``."""
    p = Path(path)
    for cand in (p / "phase2", p / "phase1", p):
        if (cand / "manifest.json").exists():
            man = read_manifest(cand, "checkpoint", (1,))
            man["_dir"] = str(cand)
            timing = cand.parent / "timing.json"
            if timing.exists():
                man["_timing"] = json.loads(timing.read_text())
            return man
    raise ArtifactError(f"{p}: holds no checkpoint (manifest.json, phase2/ or phase1/); pass the output "
                        "directory of `ple-adatt train` or of one compare run")


def read_runs(path: str | Path) -> list[dict[str, Any]]:
    """The runs under ``path``: one per ``seed-<n>/`` subdirectory (a several-seed compare),
    else the one run ``read_run`` finds."""
    p = Path(path)
    seeded = sorted((d for d in p.glob("seed-*") if d.is_dir()), key=lambda d: d.name) if p.is_dir() else []
    return [read_run(d) for d in seeded] if seeded else [read_run(p)]


#: provenance keys that belong to the run, not to one task
RUN_KEYS = ("data_hash", "split", "max_rows")
COMPARABLE_HINT = ("the strategy, `transfer.*` and the seed may differ; differences in how a run was trained "
                   "(`model`, `training`) are warnings")


def _where(role: str, name: str, man: dict[str, Any]) -> str:
    return f"{role} {name!r} ({man.get('_dir')})"


def check_comparable(runs: dict[str, list[dict[str, Any]]],
                     singles: dict[str, list[dict[str, Any]]] | None = None) -> list[str]:
    """Refuse runs whose numbers cannot be compared; return warnings for what only differs in training.

    ``runs``: strategy -> checkpoint manifests (one per seed); ``singles``: task -> single-task
    manifests. Every run must train the same tasks as the first one, and every run and every
    single-task baseline must agree with every run on what the validation losses and metrics
    depend on (:func:`~ple_adatt.reporting.inputs.loss_provenance`: data hash, split,
    ``max_rows``, target spec, loss and its parameters), the same check ``ple-adatt report
    --baselines`` applies. The strategy, ``transfer.*`` and the seed may differ (they are what
    a comparison varies); other ``model`` / ``training`` differences (epochs, learning rate,
    ...) are returned as warnings, as ``report --baselines`` warns about them.
    """
    from .inputs import _show, _training_diffs, loss_provenance, provenance_difference

    every = [(name, man) for name, ms in runs.items() for man in ms]
    if not every:
        return []
    ref_name, ref = every[0]

    def refuse(this: str, that: str, key: str, what: str, a: Any, b: Any, la: str, lb: str, why: str) -> None:
        raise ArtifactError(f"{this} is not comparable with {that}: `{key}` ({what}) is {_show(a)} in {la}, "
                            f"{_show(b)} in {lb}; {why}")

    run_why = ("compare runs trained on the same data, split, max_rows, tasks and loss definitions ("
               + COMPARABLE_HINT + ")")
    base_why = ("delta-m and TCI need single-task baselines trained on the same data, split and max_rows with the "
                "same loss definitions as the runs (e.g. `ple-adatt compare` with the runs' data and config; "
                + COMPARABLE_HINT + ")")
    # every run against every other: same tasks, same loss provenance per task
    for i, (name, man) in enumerate(every):
        for oname, oman in every[:i]:
            this, that = _where("run", name, man), _where("run", oname, oman)
            if list(man.get("tasks") or []) != list(oman.get("tasks") or []):
                raise ArtifactError(f"{this} is not comparable with {that}: it trains tasks {list(man.get('tasks') or [])}"
                                    f", {oname!r} trains {list(oman.get('tasks') or [])}; {run_why}")
            for t in man.get("tasks") or []:
                a, b = loss_provenance(man, t), loss_provenance(oman, t)
                diff = provenance_difference(a, b)[2]
                if diff:
                    key, what = diff
                    la, lb = (repr(name), repr(oname)) if name != oname else (man.get("_dir"), oman.get("_dir"))
                    refuse(this, that, key, what if key in RUN_KEYS else f"{what} of task {t!r}", a[key], b[key],
                           str(la), str(lb), run_why)
    # every single-task baseline against every run
    for t, ms in (singles or {}).items():
        for bman in ms:
            b = loss_provenance(bman, t)
            for name, man in every:
                a = loss_provenance(man, t)
                diff = provenance_difference(b, a)[2]
                if diff:
                    refuse(_where("single-task baseline", t, bman), _where("run", name, man), diff[0], diff[1],
                           b[diff[0]], a[diff[0]], "the baseline", "the run", base_why)
    warnings = []
    trained: dict[str, dict[tuple[str, str, str], None]] = {}
    for name, man in every[1:]:
        if name != ref_name:
            for key, a, b in _training_diffs(man, ref):
                if key != "seed":
                    trained.setdefault(name, {})[(key, _show(a), _show(b))] = None
    for name, diffs in trained.items():
        warnings.append(f"run {name!r} was trained differently from run {ref_name!r} ({name} vs {ref_name}): "
                        + "; ".join(f"{k} {a} vs {b}" for k, a, b in diffs)
                        + "; the comparison then also reflects these differences")
    by_diff: dict[tuple[str, str, str], list[str]] = {}
    for t, ms in (singles or {}).items():
        for bman in ms:
            for key, a, b in _training_diffs(bman, ref):
                ts = by_diff.setdefault((key, _show(a), _show(b)), []) if key != "seed" else None
                if ts is not None and t not in ts:
                    ts.append(t)
    if by_diff:
        n = len(singles or {})
        warnings.append(f"the single-task baselines were trained differently from run {ref_name!r} (baseline vs run): "
                        + "; ".join(f"{k} {a} vs {b} ({', '.join(ts) if len(ts) < n else 'every task'})"
                                    for (k, a, b), ts in by_diff.items())
                        + "; delta-m and TCI then also reflect these differences")
    return warnings


def _kinds(man: dict[str, Any]) -> dict[str, str]:
    return {s["name"]: s["type"] for s in man.get("task_specs", [])}


def _cost(man: dict[str, Any]) -> dict[str, Any]:
    p1 = [h for h in man.get("history", []) if h.get("phase") == "phase1"]
    seconds = sum(float(h.get("seconds", 0.0)) for h in p1)
    steps = int(p1[-1]["step"]) if p1 else 0
    timing = man.get("_timing") or {}
    later = p1[1:]  # steady state: from the second epoch on (the first carries the run's set-up)
    later_s = sum(float(h.get("seconds", 0.0)) for h in later)
    later_steps = steps - int(p1[0]["step"]) if later else 0
    return {"phase1_seconds": seconds, "phase1_epochs": len(p1), "phase1_steps": steps,
            "steps_per_second": steps / seconds if seconds > 0 else None,
            "steady_steps_per_second": later_steps / later_s if later_s > 0 and later_steps > 0 else None,
            "wall_seconds": timing.get("wall_seconds")}


def _negative_pairs(man: dict[str, Any]) -> list[str]:
    """Task pairs whose last measured affinity is below adaTT's negative-transfer threshold
    (measured the same way for every strategy)."""
    hist = man.get("affinity_history") or []
    if not hist:
        return []
    A = hist[-1]["matrix"]
    thr = ((man.get("train_config") or {}).get("transfer") or {}).get("adatt", {}).get(
        "negative_transfer_threshold", -0.1)
    names = man["tasks"]
    return [f"{names[i]}<->{names[j]}" for i in range(len(names)) for j in range(i + 1, len(names))
            if _finite(A[i][j]) and A[i][j] < thr]


def delta_m(metrics: dict[str, float | None], baseline: dict[str, float | None],
            higher_better: dict[str, bool]) -> float | None:
    """Mean relative gain over the baseline in percent (see the module docstring)."""
    terms = []
    for t, b in baseline.items():
        m = metrics.get(t)
        if not (_finite(m) and _finite(b)) or b == 0:
            continue
        sign = 1.0 if higher_better[t] else -1.0
        terms.append(sign * (m - b) / abs(b))
    return 100.0 * sum(terms) / len(terms) if terms else None


def pareto_front(points: dict[str, dict[str, float | None]], higher_better: dict[str, bool]) -> list[str]:
    """Names of the non-dominated points over the tasks every point has a value for."""
    tasks = [t for t in higher_better if all(_finite(p.get(t)) for p in points.values())]

    def better_eq(a: dict[str, Any], b: dict[str, Any], t: str) -> bool:
        return a[t] >= b[t] if higher_better[t] else a[t] <= b[t]

    def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return all(better_eq(a, b, t) for t in tasks) and any(a[t] != b[t] for t in tasks)

    return [n for n, p in points.items() if not any(dominates(q, p) for m, q in points.items() if m != n)]


def _mean(xs: list[Any]) -> float | None:
    v = [float(x) for x in xs if _finite(x)]
    return sum(v) / len(v) if v else None


def _sd(xs: list[Any]) -> float | None:
    """Sample standard deviation (n - 1); None below two finite values."""
    v = [float(x) for x in xs if _finite(x)]
    if len(v) < 2:
        return None
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def _median(xs: list[Any]) -> float | None:
    v = sorted(float(x) for x in xs if _finite(x))
    if not v:
        return None
    k = len(v) // 2
    return v[k] if len(v) % 2 else (v[k - 1] + v[k]) / 2


# two-sided 95 % quantiles of Student's t, df 1..30
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table to 30, then the
    Cornish-Fisher expansion around z = 1.96, within 1e-3 there)."""
    if df < 1:
        raise ValueError(f"t quantile: degrees of freedom {df} < 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_difference(a: dict[int, float | None], b: dict[int, float | None]) -> dict[str, Any]:
    """``a - b`` over the seeds both have: mean, sd, the t-based 95 % interval of the mean and
    the verdict (``better`` / ``worse`` when the interval excludes 0, else ``within noise``;
    ``one seed`` when fewer than two seeds pair)."""
    seeds = sorted(s for s in a if s in b and _finite(a[s]) and _finite(b[s]))
    d = [float(a[s]) - float(b[s]) for s in seeds]  # type: ignore[arg-type]
    out: dict[str, Any] = {"seeds": seeds, "n": len(d), "differences": d, "mean": _mean(d), "sd": _sd(d),
                           "ci95": None}
    if len(d) < 2:
        out["verdict"] = "one seed" if d else "no pairs"
        return out
    half = t_quantile_975(len(d) - 1) * out["sd"] / math.sqrt(len(d))
    lo, hi = out["mean"] - half, out["mean"] + half
    out["ci95"] = [lo, hi]
    out["verdict"] = "better" if lo > 0 else "worse" if hi < 0 else "within noise"
    return out


def _as_list(x: Any) -> list[dict[str, Any]]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _by_seed(mans: list[dict[str, Any]], what: str) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for man in mans:
        seed = int((man.get("train_config") or {}).get("seed", 0))
        if seed in out:
            raise ArtifactError(f"{what}: two runs with seed {seed} ({out[seed].get('_dir')} and {man.get('_dir')}); "
                                "each seed of a strategy or task once")
        out[seed] = man
    return dict(sorted(out.items()))


def _gate_freeze(man: dict[str, Any]) -> str:
    """When this run's CGC gates stopped training, read from its history."""
    for h in man.get("history", []):
        if h.get("phase") == "phase1" and h.get("cgc_frozen"):
            return f"phase 1 epoch {int(h.get('epoch', 0)) + 1}"
    return "phase 2"


def _cost_summary(costs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and range over the seeds of each timing (one seed: its values, range of one)."""
    out: dict[str, Any] = {"phase1_epochs": costs[0]["phase1_epochs"], "phase1_steps": costs[0]["phase1_steps"],
                           "n": len(costs)}
    for k in ("phase1_seconds", "steps_per_second", "steady_steps_per_second", "wall_seconds"):
        v = [c[k] for c in costs if _finite(c.get(k))]
        out[k] = _median(v)
        out[f"{k}_range"] = [min(v), max(v)] if v else None
    return out


def compare_numbers(runs: dict[str, Any], singles: dict[str, Any] | None = None,
                    *, data: str | None = None, command: str | None = None,
                    machine: dict[str, Any] | None = None, warnings: list[str] | None = None) -> dict[str, Any]:
    """Everything the comparison shows. ``runs``: strategy -> checkpoint manifest, or a list
    of them (one per seed, the seed read from each manifest's config); ``singles``: task ->
    single-task manifest or list of them (may be empty). ``machine``: where the timed runs
    ran (shown beside the cost table). ``warnings``: what :func:`check_comparable` found
    (shown at the top of both pages)."""
    if not runs:
        raise ArtifactError("nothing to compare: no strategy run was given")
    by_run = {name: _by_seed(_as_list(m), f"strategy {name!r}") for name, m in runs.items()}
    by_single = {t: _by_seed(_as_list(m), f"single-task {t!r}") for t, m in (singles or {}).items()}
    first = next(iter(next(iter(by_run.values())).values()))
    tasks = list(first["tasks"])
    for name, seeds in by_run.items():
        for man in seeds.values():
            if list(man["tasks"]) != tasks:
                raise ArtifactError(f"run {name!r} trains tasks {man['tasks']}, the others {tasks}; compare runs of "
                                    "the same data and tasks")
    kinds = _kinds(first)
    metric = {t: PRIMARY_METRIC[kinds[t]][0] for t in tasks}
    higher = {t: PRIMARY_METRIC[kinds[t]][1] for t in tasks}
    all_seeds = sorted({s for seeds in by_run.values() for s in seeds})
    # single-task baselines per seed; Δm is paired (seed s against the baseline of seed s) when
    # every task has a baseline for every seed a strategy ran, else against the baselines' mean
    base_seed: dict[int, dict[str, float | None]] = {}
    base_loss_seed: dict[int, dict[str, float]] = {}
    single_cost: dict[str, Any] = {}
    for t, seeds in by_single.items():
        for seed, man in seeds.items():
            m = man["metrics"]["tasks"].get(t, {})
            base_seed.setdefault(seed, {})[t] = m.get(metric[t])
            if _finite(m.get("loss")) and m["loss"] > 0:
                base_loss_seed.setdefault(seed, {})[t] = float(m["loss"])
        single_cost[t] = _cost_summary([_cost(man) for man in seeds.values()])
    base = {t: _mean([base_seed[s].get(t) for s in base_seed]) for t in by_single}
    base_sd = {t: _sd([base_seed[s].get(t) for s in base_seed]) for t in by_single}
    base_loss = {t: v for t in by_single
                 if (v := _mean([base_loss_seed.get(s, {}).get(t) for s in base_loss_seed])) is not None}
    paired = bool(by_single) and all(set(seeds) <= set(by_single[t]) for seeds in by_run.values()
                                     for t in by_single)

    def baseline_of(seed: int) -> tuple[dict[str, Any], dict[str, float]]:
        return (base_seed[seed], base_loss_seed.get(seed, {})) if paired else (base, base_loss)

    strategies = []
    for name, seeds in by_run.items():
        per_seed = []
        for seed, man in seeds.items():
            mt = man["metrics"]["tasks"]
            mets = {t: mt.get(t, {}).get(metric[t]) for t in tasks}
            loss = {t: mt.get(t, {}).get("loss") for t in tasks}
            b, bl = baseline_of(seed) if by_single else ({}, {})
            rows = tci(loss, bl) if bl else []
            per_seed.append({"seed": seed, "checkpoint": man.get("_dir"), "metrics": mets, "val_loss": loss,
                             "delta_m": delta_m(mets, b, higher) if b else None, "cost": _cost(man), "tci": rows,
                             "negative_transfer_pairs": _negative_pairs(man), "gates_frozen_from": _gate_freeze(man)})
        mean_metrics = {t: _mean([p["metrics"][t] for p in per_seed]) for t in tasks}
        mean_tci = {t: _mean([r["tci"] for p in per_seed for r in p["tci"] if r["task"] == t]) for t in by_single}
        neg: dict[str, int] = {}
        for p in per_seed:
            for pair in p["negative_transfer_pairs"]:
                neg[pair] = neg.get(pair, 0) + 1
        dms = [p["delta_m"] for p in per_seed]
        strategies.append({
            "name": name,
            "strategy": first_of(seeds).get("strategy"),
            "checkpoint": per_seed[0]["checkpoint"],
            "n_seeds": len(per_seed),
            "metrics": mean_metrics,
            "metrics_sd": {t: _sd([p["metrics"][t] for p in per_seed]) for t in tasks},
            "val_loss": {t: _mean([p["val_loss"][t] for p in per_seed]) for t in tasks},
            "delta_m": _mean(dms) if by_single else None,
            "delta_m_sd": _sd(dms) if by_single else None,
            "wins_vs_single": sum(1 for t in tasks if _finite(mean_metrics[t]) and _finite(base.get(t)) and (
                mean_metrics[t] > base[t] if higher[t] else mean_metrics[t] < base[t])) if by_single else None,
            "cost": _cost_summary([p["cost"] for p in per_seed]),
            "tci": [{"task": t, "tci": v, "conflict": (v < 0) if _finite(v) else None} for t, v in mean_tci.items()],
            "tci_conflicts": [t for t, v in mean_tci.items() if _finite(v) and v < 0],
            "negative_transfer_pairs": sorted(neg, key=lambda k: (-neg[k], k)),
            "negative_transfer_seeds": neg,
            "gates_frozen_from": sorted({p["gates_frozen_from"] for p in per_seed}),
            "seeds": per_seed,
        })
    points = {s["name"]: s["metrics"] for s in strategies}
    if base and all(_finite(base.get(t)) for t in tasks):
        points[SINGLE] = {t: base[t] for t in tasks}
    front = pareto_front(points, higher)
    for s in strategies:
        s["pareto"] = s["name"] in front
    best = {}
    for t in tasks:
        vals = [(s["metrics"][t], s["name"]) for s in strategies if _finite(s["metrics"][t])]
        if vals:
            best[t] = (max(vals) if higher[t] else min(vals))[1]
    ranked = sorted((s for s in strategies if s["delta_m"] is not None), key=lambda s: -s["delta_m"])
    dm_by_seed = {s["name"]: {p["seed"]: p["delta_m"] for p in s["seeds"]} for s in strategies}
    names = [s["name"] for s in strategies]
    reference = "adatt" if "adatt" in names else names[0]
    comparisons = []
    if by_single:
        for other in names:
            if other != reference:
                comparisons.append({"other": other, **paired_difference(dm_by_seed[reference], dm_by_seed[other])})
    # the order by mean delta-m, each strategy with the reference's paired verdict against it: the
    # same verdicts as the paired table (an adjacent-pair chain of '>' / '≈' read as 'nothing
    # differs' while the table showed significant differences between non-adjacent strategies)
    by_other = {c["other"]: c for c in comparisons}
    ranking = [{"name": s["name"], "delta_m": s["delta_m"],
                "vs_reference": "reference" if s["name"] == reference
                else by_other[s["name"]]["verdict"] if s["name"] in by_other else None} for s in ranked]
    n_seeds = len(all_seeds)
    ranking_text = ", ".join(_ranking_entry(e, reference, n_seeds) for e in ranking)
    tested = [c for c in comparisons if c.get("ci95")]
    fewest = min((c["n"] for c in tested), default=None)
    return {
        "kind": "strategy_comparison",
        "schema_version": COMPARE_SCHEMA_VERSION,
        "data": data,
        "command": command,
        "seeds": all_seeds,
        "n_seeds": n_seeds,
        "baselines_paired": paired,
        "single_seed_caveat": SINGLE_SEED_CAVEAT if n_seeds < 2 else None,
        "tasks": [{"name": t, "type": kinds[t], "metric": metric[t], "higher_is_better": higher[t],
                   "single_task": base.get(t), "single_task_sd": base_sd.get(t), "single_task_loss": base_loss.get(t),
                   "best_strategy": best.get(t)} for t in tasks],
        "strategies": strategies,
        "single_task": {"present": True, "seeds": sorted(base_seed), "cost": single_cost,
                        "on_pareto_front": SINGLE in front} if by_single else None,
        "pareto_front": front,
        "ranking_by_delta_m": [s["name"] for s in ranked],
        "ranking": ranking,
        "ranking_text": ranking_text,
        "warnings": list(warnings or []),
        "few_seeds_warning": (FEW_SEEDS_WARNING.format(n=fewest, df=fewest - 1, t=t_quantile_975(fewest - 1))
                              if fewest is not None and fewest < 3 else None),
        "multiplicity_note": (MULTIPLICITY_NOTE.format(k=len(tested), ref=reference, e=len(tested) / 20)
                              if tested else None),
        "paired_vs_reference": {"reference": reference, "comparisons": comparisons},
        "machine": ({**machine, "device": (first.get("train_config") or {}).get("device")} if machine else None),
        "notes": {"gates": GATES_NOTE},
        "definitions": {"delta_m": DELTA_M_DEFINITION, "tci": TCI_DEFINITION, "paired": PAIRED_DEFINITION,
                        "pareto": "non-dominated over every task's primary metric (mean over seeds; direction-aware)",
                        "cost": COST_DEFINITION, "ranking": RANKING_DEFINITION},
    }


def _ranking_entry(e: dict[str, Any], reference: str, n_seeds: int) -> str:
    """``pcgrad +1.20% (adatt worse)``: a strategy of the order with the reference's verdict."""
    text = f"{e['name']} {_signed_pct(e['delta_m'])}"
    v = e["vs_reference"]
    if v == "reference":
        return text + " (reference)"
    if n_seeds < 2 or v is None:
        return text
    return text + f" ({reference} {v})" if v in ("better", "worse") else text + f" ({v})"


def first_of(seeds: dict[int, dict[str, Any]]) -> dict[str, Any]:
    return next(iter(seeds.values()))


# ------------------------------------------------------------------------------ rendering


def _num(x: Any, nd: int = 4) -> str:
    return f"{x:.{nd}f}" if _finite(x) else "-"


def _signed_pct(x: Any) -> str:
    return f"{x:+.2f}%" if _finite(x) else "-"


def _pm(x: Any, sd: Any, nd: int = 4) -> str:
    """``mean ± sd``, or the value alone when there is no sd (one seed)."""
    return f"{_num(x, nd)} ± {sd:.{nd}f}" if _finite(x) and _finite(sd) else _num(x, nd)


def _dm_pm(s: dict[str, Any]) -> str:
    dm, sd = s["delta_m"], s.get("delta_m_sd")
    return f"{dm:+.2f} ± {sd:.2f}%" if _finite(dm) and _finite(sd) else _signed_pct(dm)


def _range(c: dict[str, Any], k: str, nd: int = 1) -> str:
    """Median with [min-max] when several seeds timed it."""
    r = c.get(f"{k}_range")
    if not _finite(c.get(k)):
        return "-"
    return f"{c[k]:.{nd}f}" + (f" [{r[0]:.{nd}f}-{r[1]:.{nd}f}]" if r and c.get("n", 1) > 1 else "")


def verdict_text(reference: str, comp: dict[str, Any]) -> str:
    v = comp["verdict"]
    if v in ("better", "worse"):
        return f"{reference} {v}"
    if v == "one seed":
        return "one seed: cannot tell"
    return v


def _ci_text(comp: dict[str, Any]) -> str:
    ci = comp.get("ci95")
    return f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "-"


def _ranking_line(r: dict[str, Any]) -> str:
    if not r["ranking_by_delta_m"]:
        return ""
    if r["n_seeds"] < 2:
        return ("Order by Δm (one seed: not a ranking, the differences are not separated from noise): "
                + r["ranking_text"])
    ref = r["paired_vs_reference"]["reference"]
    return (f"Order by mean Δm over {r['n_seeds']} seeds, with {ref}'s paired verdict against each (only pairs "
            f"with {ref} are tested; neighbours in this order may or may not differ): {r['ranking_text']}")


def render_markdown(r: dict[str, Any]) -> str:
    tasks = r["tasks"]
    ref = r["paired_vs_reference"]["reference"]
    comps = {c["other"]: c for c in r["paired_vs_reference"]["comparisons"]}
    lines = ["# Strategy comparison", ""]
    if r.get("single_seed_caveat"):
        lines += [f"> **Caveat: {r['single_seed_caveat']}.**", ""]
    if r.get("command"):
        lines += [f"Command: `{r['command']}`", ""]
    seeds = ", ".join(str(x) for x in r["seeds"])
    lines += [f"Seeds: {seeds} (n = {r['n_seeds']}); values are means over seeds"
              + (" ± sample sd" if r["n_seeds"] > 1 else "")
              + ("; Δm paired with the single-task baselines of the same seed" if r.get("baselines_paired")
                 else "; Δm against the mean single-task baseline" if r.get("single_task") else "") + ".", ""]
    if r.get("few_seeds_warning"):
        lines += [f"> **Few seeds: {r['few_seeds_warning']}.**", ""]
    for text in r.get("warnings") or []:
        lines += [f"> **Warning: {text}.**", ""]
    head = ("| strategy | " + " | ".join(f"{t['name']} {t['metric']}{'↑' if t['higher_is_better'] else '↓'}"
                                        for t in tasks)
            + f" | Δm % vs single | {ref} − this, Δm (paired) | Pareto | gates frozen from |")
    lines += [head, "|" + "---|" * (len(tasks) + 5)]
    for s in r["strategies"]:
        cells = []
        for t in tasks:
            v = _pm(s["metrics"][t["name"]], s["metrics_sd"].get(t["name"]))
            cells.append(f"**{v}**" if t.get("best_strategy") == s["name"] else v)
        comp = comps.get(s["name"])
        vs = "(reference)" if s["name"] == ref else (
            f"{_signed_pct(comp['mean'])}" + (f" {_ci_text(comp)}" if comp.get("ci95") else "")
            + f" ({verdict_text(ref, comp)})" if comp else "-")
        lines.append(f"| {s['name']} | " + " | ".join(cells) + f" | {_dm_pm(s)} | {vs} | "
                     f"{'yes' if s['pareto'] else ''} | {', '.join(s['gates_frozen_from'])} |")
    if r.get("single_task"):
        lines.append("| single-task | " + " | ".join(_pm(t["single_task"], t.get("single_task_sd")) for t in tasks)
                     + " | 0 (reference) | | "
                     f"{'yes' if r['single_task']['on_pareto_front'] else ''} | |")
    lines += ["", f"Best per task (mean) in bold. {r['definitions']['delta_m']}.", ""]
    if comps:
        lines += [f"{ref} − this: {r['definitions']['paired']}.", ""]
    lines.append("Pareto front: " + ", ".join(r["pareto_front"]))
    if r["ranking_by_delta_m"]:
        lines.append(_ranking_line(r))
    if r.get("multiplicity_note"):
        lines += ["", f"Note: {r['multiplicity_note']}."]
    lines += ["", f"CGC gates: {r['notes']['gates']}.", "", "## Training cost", "",
              "| strategy | phase-1 s | epochs | steps | steps/s | steady steps/s | wall s (both phases) |",
              "|---|---|---|---|---|---|---|"]
    for s in r["strategies"]:
        c = s["cost"]
        lines.append(f"| {s['name']} | {_range(c, 'phase1_seconds')} | {c['phase1_epochs']} | {c['phase1_steps']} | "
                     f"{_range(c, 'steps_per_second')} | {_range(c, 'steady_steps_per_second')} | "
                     f"{_range(c, 'wall_seconds')} |")
    lines += ["", f"Cost: {r['definitions']['cost']}."]
    if r.get("machine"):
        lines.append("Machine: " + ", ".join(f"{k} {v}" for k, v in r["machine"].items()) + ".")
    if r.get("single_task"):
        lines += ["", "## TCI per task (validation loss, joint vs alone; negative = conflict)", "",
                  "| strategy | " + " | ".join(t["name"] for t in tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
        for s in r["strategies"]:
            by = {row["task"]: row["tci"] for row in s["tci"]}
            lines.append(f"| {s['name']} | " + " | ".join(f"{by[t['name']]:+.3f}" if _finite(by.get(t["name"]))
                                                          else "-" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;
color:#1d2430;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #dde1e8;padding:4px 8px;text-align:right}th{background:#f4f6f9}
td.l,th.l{text-align:left}.best{font-weight:700;background:#e6f0fb}.pos{color:#1b5e20}.neg{color:#b71c1c}
.muted{color:#667}.caveat{background:#fff4e5;border:2px solid #e65100;padding:10px 14px;margin:12px 0;font-size:15px}.note{background:#f7f7fa;border-left:3px solid #9aa;padding:6px 10px;margin:8px 0}
code{background:#f2f3f6;padding:1px 4px}.chart text.t{font-weight:600;font-size:13px}.chart text.l{font-size:12px}
"""


def _dm_chart(r: dict[str, Any]) -> str:
    rows = [(s["name"], s["delta_m"]) for s in r["strategies"]]
    sds = {s["name"]: s.get("delta_m_sd") for s in r["strategies"]}
    vals = [abs(v) + (sds[n] if _finite(sds[n]) else 0.0) for n, v in rows if _finite(v)]
    vm = max(vals) if vals and max(vals) > 0 else 1.0
    left, bar_h, gap, top, width = 130, 16, 6, 28, 680
    half = (width - left - 140) / 2
    zero = left + half
    height = top + len(rows) * (bar_h + gap) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" aria-label="delta-m per strategy" '
           f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
           f'<text x="{left}" y="16" class="t">Δm % vs single-task (right = better than alone; whiskers ± 1 sd over seeds)</text>']
    for k, (name, v) in enumerate(rows):
        y = top + k * (bar_h + gap)
        out.append(f'<text x="{left - 6}" y="{y + bar_h - 4}" class="l" text-anchor="end">{escape(name)}</text>')
        if _finite(v):
            w = half * abs(v) / vm
            x = zero if v >= 0 else zero - w
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                       f'fill="{"#2e7d32" if v >= 0 else "#c62828"}"/>')
            sd = sds[name]
            if _finite(sd):  # ± one sd over seeds
                x0, x1 = zero + half * (v - sd) / vm, zero + half * (v + sd) / vm
                yc = y + bar_h / 2
                out.append(f'<line x1="{x0:.1f}" x2="{x1:.1f}" y1="{yc}" y2="{yc}" stroke="#222"/>'
                           f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="{y + 3}" y2="{y + bar_h - 3}" stroke="#222"/>'
                           f'<line x1="{x1:.1f}" x2="{x1:.1f}" y1="{y + 3}" y2="{y + bar_h - 3}" stroke="#222"/>')
            label = f"{v:+.2f} ± {sd:.2f}%" if _finite(sd) else f"{v:+.2f}%"
            out.append(f'<text x="{zero + half + 8:.1f}" y="{y + bar_h - 4}" class="l">{label}</text>')
    out.append(f'<line x1="{zero:.1f}" x2="{zero:.1f}" y1="{top - 4}" y2="{height - 4}" stroke="#333"/>')
    out.append("</svg>")
    return "".join(out)


def render_html(r: dict[str, Any]) -> str:
    tasks = r["tasks"]
    ref = r["paired_vs_reference"]["reference"]
    comps = r["paired_vs_reference"]["comparisons"]
    w = ['<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Strategy comparison</title>',
         f"<style>{_CSS}</style></head><body><h1>Strategy comparison</h1>"]
    if r.get("single_seed_caveat"):
        w.append(f'<div class="caveat" id="single-seed-caveat"><b>Caveat:</b> {escape(r["single_seed_caveat"])}.</div>')
    if r.get("command"):
        w.append(f'<p class="muted">Made by <code>{escape(r["command"])}</code></p>')
    w.append(f"<p>Seeds: {escape(', '.join(str(x) for x in r['seeds']))} (n = {r['n_seeds']}); values are means "
             f"over seeds{' ± sample sd' if r['n_seeds'] > 1 else ''}"
             + ("; Δm paired with the single-task baselines of the same seed" if r.get("baselines_paired")
                else "; Δm against the mean single-task baseline" if r.get("single_task") else "") + ".</p>")
    if r.get("few_seeds_warning"):
        w.append(f'<div class="caveat" id="few-seeds-warning"><b>Few seeds:</b> {escape(r["few_seeds_warning"])}.'
                 "</div>")
    for text in r.get("warnings") or []:
        w.append(f'<div class="caveat input-warning"><b>Warning:</b> {escape(text)}.</div>')
    w.append("<h2>Per-task validation metrics (Phase 2 checkpoints)</h2><table><tr><th class=l>strategy</th>")
    w += [f"<th>{escape(t['name'])}<br><span class=muted>{escape(t['metric'])} "
          f"{'↑' if t['higher_is_better'] else '↓'}</span></th>" for t in tasks]
    w.append("<th>Δm %</th><th>Pareto</th></tr>")
    for s in r["strategies"]:
        w.append(f"<tr><td class=l>{escape(s['name'])}</td>")
        for t in tasks:
            v = s["metrics"][t["name"]]
            base = t.get("single_task")
            cls = "best" if t.get("best_strategy") == s["name"] else ""
            if _finite(v) and _finite(base):
                good = v > base if t["higher_is_better"] else v < base
                cls += " pos" if good else " neg"
            w.append(f'<td class="{cls.strip()}">{escape(_pm(v, s["metrics_sd"].get(t["name"])))}</td>')
        dm = s["delta_m"]
        w.append(f'<td class="{"pos" if _finite(dm) and dm >= 0 else "neg"}">{escape(_dm_pm(s))}</td>'
                 f"<td>{'●' if s['pareto'] else ''}</td></tr>")
    if r.get("single_task"):
        w.append("<tr><td class=l><i>single-task</i></td>"
                 + "".join(f"<td>{escape(_pm(t['single_task'], t.get('single_task_sd')))}</td>" for t in tasks)
                 + f"<td>reference</td><td>{'●' if r['single_task']['on_pareto_front'] else ''}</td></tr>")
    w.append("</table><p class=muted>Bold: best strategy on the task (mean). Green / red: better / worse than the "
             "task trained alone.</p>")
    if any(_finite(s["delta_m"]) for s in r["strategies"]):
        w.append(_dm_chart(r))
    w.append(f'<div class="note">{escape(r["definitions"]["delta_m"])}</div>')
    if r["ranking_by_delta_m"]:
        w.append(f"<p><b>{escape(_ranking_line(r))}</b></p>")
    if comps:
        w.append(f"<h2>{escape(ref)} against each strategy (paired over seeds)</h2><table><tr><th class=l>strategy"
                 f"</th><th>mean Δm({escape(ref)}) − Δm(strategy)</th><th>95 % interval</th><th>seeds</th>"
                 "<th class=l>verdict</th></tr>")
        for c in comps:
            w.append(f"<tr><td class=l>{escape(c['other'])}</td><td>{_signed_pct(c['mean'])}</td>"
                     f"<td>{escape(_ci_text(c))}</td><td>{c['n']}</td>"
                     f"<td class=l>{escape(verdict_text(ref, c))}</td></tr>")
        w.append(f'</table><p class="muted">{escape(r["definitions"]["paired"])}</p>')
        if r.get("multiplicity_note"):
            w.append(f'<div class="note" id="multiplicity-note">{escape(r["multiplicity_note"])}.</div>')
    w.append("<h2>Pareto front</h2><p>" + ", ".join(f"<b>{escape(n)}</b>" for n in r["pareto_front"])
             + f'</p><p class="muted">{escape(r["definitions"]["pareto"])}</p>')
    w.append("<h2>Training cost</h2><table><tr><th class=l>strategy</th><th>phase-1 s</th><th>epochs</th>"
             "<th>steps</th><th>steps/s</th><th>steady steps/s</th><th>wall s (both phases)</th></tr>")
    for s in r["strategies"]:
        c = s["cost"]
        w.append(f"<tr><td class=l>{escape(s['name'])}</td><td>{_range(c, 'phase1_seconds')}</td>"
                 f"<td>{c['phase1_epochs']}</td><td>{c['phase1_steps']}</td><td>{_range(c, 'steps_per_second')}</td>"
                 f"<td>{_range(c, 'steady_steps_per_second')}</td><td>{_range(c, 'wall_seconds')}</td></tr>")
    w.append(f'</table><p class="muted">{escape(r["definitions"]["cost"])}.</p>')
    if r.get("machine"):
        w.append('<p class="muted">Machine: ' + escape(", ".join(f"{k} {v}" for k, v in r["machine"].items()))
                 + ".</p>")
    w.append("<h2>CGC gates during Phase 1</h2><table><tr><th class=l>strategy</th><th class=l>gates frozen from"
             "</th></tr>")
    for s in r["strategies"]:
        w.append(f"<tr><td class=l>{escape(s['name'])}</td><td class=l>"
                 f"{escape(', '.join(s['gates_frozen_from']))}</td></tr>")
    w.append(f'</table><div class="note">{escape(r["notes"]["gates"])}.</div>')
    if r.get("single_task"):
        w.append("<h2>TCI per task</h2><table><tr><th class=l>strategy</th>"
                 + "".join(f"<th>{escape(t['name'])}</th>" for t in tasks) + "</tr>")
        for s in r["strategies"]:
            by = {row["task"]: row["tci"] for row in s["tci"]}
            w.append(f"<tr><td class=l>{escape(s['name'])}</td>")
            for t in tasks:
                v = by.get(t["name"])
                w.append(f'<td class="{"neg" if _finite(v) and v < 0 else "pos"}">'
                         f'{f"{v:+.3f}" if _finite(v) else "-"}</td>')
            w.append("</tr>")
        w.append(f'</table><div class="note">{escape(r["definitions"]["tci"])}</div>')
    w.append("<h2>Negative-transfer pairs (affinity below the threshold)</h2><table>"
             "<tr><th class=l>strategy</th><th class=l>pairs (seeds in which the pair was below)</th></tr>")
    for s in r["strategies"]:
        counts = s.get("negative_transfer_seeds") or {}
        pairs = ", ".join(f"{p} ({counts.get(p, 1)}/{s['n_seeds']})" for p in s["negative_transfer_pairs"])
        w.append(f"<tr><td class=l>{escape(s['name'])}</td><td class=l>{escape(pairs or 'none')}</td></tr>")
    w.append("</table></body></html>\n")
    return "".join(w)
