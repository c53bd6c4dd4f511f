"""``ple-adatt compare``: train the same data with several strategies and single-task baselines,
then write the comparison report.

    ple-adatt compare --data data/synthetic.parquet --data-config configs/data/synthetic.yaml \\
        --config configs/train/compare_small.yaml --out runs/compare \\
        [--strategies adatt,pcgrad,mgda] [--no-single-task] [--seeds 3 | --seeds 0,1,2] \\
        [--set training.shared_expert_epochs=2]
    ple-adatt compare --out runs/compare-again --runs adatt=runs/a --runs pcgrad=runs/b --singles runs/compare/single_task

Writes into ``OUT``:

* ``runs/<strategy>/phase1``, ``runs/<strategy>/phase2``: the checkpoints of each strategy
  (the same artifacts as ``ple-adatt train``; ``timing.json`` beside them);
* ``single_task/<task>/phase1|phase2``: one model per task trained alone (the same model
  and config with only that task enabled, strategy ``equal``);
* with several ``--seeds``, one level more: ``runs/<strategy>/seed-<n>/...`` and
  ``single_task/<task>/seed-<n>/...`` (every strategy and every baseline trains every seed,
  on the same split, so delta-m is paired by seed);
* ``baselines.json``: the single-task validation losses (mean over seeds) in the format
  ``ple-adatt report --baselines`` reads (so a run's report shows TCI);
* ``compare.json`` (every number), ``compare.md``, ``compare.html`` (self-contained) and
  ``manifest.json`` (kind ``comparison``).

Every training run is tracked like ``ple-adatt train`` (nested MLflow runs tagged with
``strategy`` and ``compare_role``); ``--no-tracking`` turns that off.

Before the first timed run, one short untimed warm-up (one Phase 1 epoch of the first
strategy, discarded) absorbs the process's one-time start-up, so the cost table does not charge
it to whichever strategy trains first; each seed also trains the strategies in a rotated order.

Before the report, every run is checked against every other and every baseline against every
run, as ``ple-adatt report --baselines`` checks its baselines: a difference in the data, split,
``max_rows``, tasks, a target or a loss definition is refused (one line naming both runs, the
key and both values); strategy, ``transfer.*`` and seed may differ; other training differences
are warnings. With ``--runs`` (report only) the training options (``--data``, ``--config``, ...)
are refused, as ``--seeds`` is: nothing trains.

Every strategy's config (and the single-task baselines') is loaded and validated before the
first one trains, so a bad combination fails in seconds, not after the earlier strategies.
``OUT`` is written like every stage output: into a temporary sibling directory renamed into
place at the end, so a failed or interrupted compare leaves no partial ``OUT``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..artifacts import is_within
from ..config import STRATEGY_NAMES
from .common import StageError, add_set_argument, add_tracking_arguments, stage_tracking

STAGE = "compare"
COMPARE_KIND = "comparison"
FILES = ("compare.json", "compare.md", "compare.html")
SINGLE_STRATEGY = "equal"  # a model with one task has nothing to transfer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="dataset: a Parquet file or directory (needed to train)")
    parser.add_argument("--data-config", help="data contract YAML (configs/data/*.yaml)")
    parser.add_argument("--config", help="train config YAML (configs/train/*.yaml); each strategy overrides "
                                         "`transfer.strategy`")
    parser.add_argument("--validation", help="output directory of `ple-adatt validate`: train only enabled tasks")
    parser.add_argument("--out", required=True, help="comparison directory (runs, baselines and the report)")
    parser.add_argument("--strategies", default=",".join(STRATEGY_NAMES),
                        help=f"comma-separated strategies to train (default: all: {','.join(STRATEGY_NAMES)})")
    parser.add_argument("--tasks", help="comma-separated subset of tasks to train (joint and single-task); "
                                        "default: every task (or every task --validation enabled)")
    parser.add_argument("--no-single-task", action="store_true",
                        help="skip the single-task baselines (no delta-m and no TCI then)")
    parser.add_argument("--seeds", metavar="N|S1,S2,...",
                        help="train every strategy and baseline under several seeds (the config's `seed`, and "
                             "PCGrad's / MoCoGrad's task-order seeds) on the same split: a count N (the config's "
                             "seed and the next N-1) or a comma-separated list; the report then shows mean ± sd "
                             "and paired 95%% intervals. Default: one run at the config's seed")
    parser.add_argument("--runs", action="append", default=[], metavar="NAME=DIR",
                        help="report only: compare existing runs (a `ple-adatt train` output directory); repeatable")
    parser.add_argument("--singles", help="report only: directory of single-task runs, one subdirectory per task")
    add_set_argument(parser)
    add_tracking_arguments(parser)


def parse_strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in STRATEGY_NAMES]
    if bad or not names:
        raise StageError(f"--strategies: unknown {bad or 'empty list'}; valid: {', '.join(STRATEGY_NAMES)}")
    if len(set(names)) != len(names):
        raise StageError(f"--strategies: {text!r} names a strategy twice")
    return names


MAX_SEEDS = 100


def parse_seeds(text: str | None, base_seed: int) -> list[int] | None:
    """``--seeds``: a count N (``base_seed`` .. ``base_seed + N - 1``) or a comma-separated list;
    None when not given (one run at the config's seed)."""
    if text is None:
        return None
    t = text.strip()
    try:
        if "," in t:
            seeds = [int(x) for x in t.split(",") if x.strip()]
        else:
            n = int(t)
            if not 1 <= n <= MAX_SEEDS:
                raise StageError(f"--seeds {text!r}: a count must be 1..{MAX_SEEDS}")
            seeds = list(range(base_seed, base_seed + n))
    except ValueError:
        raise StageError(f"--seeds {text!r}: expected a count (e.g. 3) or a comma-separated list of seeds "
                         "(e.g. 0,1,2)") from None
    if not seeds:
        raise StageError(f"--seeds {text!r}: no seed given")
    bad = [x for x in seeds if not 0 <= x < 2 ** 32]
    if bad:
        raise StageError(f"--seeds {text!r}: seeds {bad} are outside [0, 2**32 - 1]")
    if len(set(seeds)) != len(seeds):
        raise StageError(f"--seeds {text!r}: names a seed twice")
    return seeds


def seed_overrides(seed: int | None) -> list[str]:
    """What one seed of a compare sets: the trainer's seed (weights, batch order) and the random
    task orders of PCGrad and MoCoGrad (ignored by the other strategies)."""
    if seed is None:
        return []
    return [f"seed={seed}", f"transfer.pcgrad.seed={seed}", f"transfer.mocograd.seed={seed}"]


def check_configs(args: argparse.Namespace, strategies: list[str], single_task: bool, data_cfg: Any) -> None:
    """Load and validate the train config of every run ``train_all`` will make, before any trains."""
    from ..config import ConfigError, load_train_config

    base = list(args.overrides or [])
    runs = [(s, f"strategy {s!r}") for s in strategies]
    if single_task:
        runs.append((SINGLE_STRATEGY, f"the single-task baselines (strategy {SINGLE_STRATEGY!r})"))
    for strategy, what in runs:
        try:
            load_train_config(args.config, base + [f"transfer.strategy={strategy}"], data=data_cfg)
        except ConfigError as e:
            raise ConfigError(f"{e} [config of {what}; compare checks every run's config first, "
                              "nothing was trained]") from None


def _train_one(args: argparse.Namespace, out: Path, overrides: list[str], tags: dict[str, str],
               only_tasks: list[str] | None, log: Any) -> Path:
    """Both phases of one run into ``out`` (phase1, phase2, timing.json), tracked like ``train``."""
    from .train_common import run_phase1, run_phase2

    ns = copy.copy(args)
    ns.overrides = overrides  # the tracker reads the strategy from the config + overrides
    t0 = time.perf_counter()
    with stage_tracking("train-phase1", ns, tags=tags) as tracker:
        run_phase1(data=args.data, data_config=args.data_config, config=args.config, out=out / "phase1",
                   validation=args.validation, overrides=overrides, stage="compare", log=log,
                   on_epoch=tracker.log_epoch, only_tasks=only_tasks)
        tracker.log_artifact(out / "phase1", "checkpoint")
    t1 = time.perf_counter()
    with stage_tracking("train-phase2", ns, tags=tags) as tracker:
        run_phase2(checkpoint=out / "phase1", data=args.data, out=out / "phase2", overrides=overrides,
                   stage="compare", log=log, on_epoch=tracker.log_epoch)
        tracker.log_artifact(out / "phase2", "checkpoint")
    t2 = time.perf_counter()
    args.pipeline_run_id = ns.pipeline_run_id  # every run of one compare shares the MLflow parent run
    (out / "timing.json").write_text(json.dumps({"wall_seconds": t2 - t0, "phase1_wall_seconds": t1 - t0,
                                                 "phase2_wall_seconds": t2 - t1}, indent=1) + "\n")
    return out


def _warm_up(args: argparse.Namespace, out: Path, overrides: list[str], only: list[str] | None, log: Any) -> None:
    """One untimed Phase 1 epoch, discarded, so that the process's one-time start-up (imports,
    first data load, first kernels) is not timed as part of the first strategy's run."""
    from .train_common import run_phase1

    t0 = time.perf_counter()
    run_phase1(data=args.data, data_config=args.data_config, config=args.config, out=out / "phase1",
               validation=args.validation, overrides=overrides + ["training.shared_expert_epochs=1"],
               stage="compare", log=lambda *a, **k: None, only_tasks=only)
    shutil.rmtree(out, ignore_errors=True)
    log(f"warm-up (untimed, discarded): one Phase 1 epoch in {time.perf_counter() - t0:.1f}s")


def train_all(args: argparse.Namespace, strategies: list[str], single_task: bool,
              log: Any = print, *, out: str | Path | None = None,
              warm_up: bool = True) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Train every strategy and (optionally) one single-task model per task into ``out``
    (default ``args.out``), for every seed of ``args.seeds``, after checking every run's config.
    Returns strategy -> run dirs and task -> run dirs, one per seed."""
    from ..config import load_data_config, load_train_config
    from .train_common import enabled_tasks_from_validation

    missing = [f"--{k.replace('_', '-')}" for k in ("data", "data_config", "config") if not getattr(args, k)]
    if missing:
        raise StageError(f"training needs {', '.join(missing)} (or pass --runs NAME=DIR to compare existing runs)")
    out = Path(args.out if out is None else out)
    base = list(args.overrides or [])
    data_cfg = load_data_config(args.data_config)
    tasks = (enabled_tasks_from_validation(args.validation, data_cfg, None) if args.validation
             else data_cfg.task_names)
    only = None
    if getattr(args, "tasks", None):
        only = [t.strip() for t in args.tasks.split(",") if t.strip()]
        bad = [t for t in only if t not in tasks]
        if bad:
            raise StageError(f"--tasks: {bad} are not trainable tasks of {args.data_config}; tasks: {', '.join(tasks)}")
        tasks = [t for t in tasks if t in only]
    check_configs(args, strategies, single_task, data_cfg)
    seeds: list[int | None] = list(parse_seeds(getattr(args, "seeds", None),
                                               load_train_config(args.config, base, data=data_cfg).seed) or [None])
    several = len(seeds) > 1
    total = (len(strategies) + (len(tasks) if single_task else 0)) * len(seeds)
    if warm_up:
        _warm_up(args, out / ".warmup", base + [f"transfer.strategy={strategies[0]}"] + seed_overrides(seeds[0]),
                 only, log)
    t0, done = time.perf_counter(), 0

    def header(what: str) -> None:
        """k/N, the time so far and, once a run has finished, a rough estimate of what is left."""
        elapsed = time.perf_counter() - t0
        left = f", about {elapsed / done * (total - done) / 60:.0f} min left" if done else ""
        log(f"=== compare {done + 1}/{total}: {what} ({elapsed / 60:.1f} min so far{left}) ===")

    def where(root: Path, seed: int | None) -> Path:
        return root / f"seed-{seed}" if several else root

    runs: dict[str, list[Path]] = {s: [] for s in strategies}
    singles: dict[str, list[Path]] = {t: [] for t in tasks} if single_task else {}
    for k, seed in enumerate(seeds):
        at = f", seed {seed}" if seed is not None else ""
        seed_tags = {"seed": str(seed)} if seed is not None else {}
        # rotate the order per seed, so no strategy always trains first (or last) in a session
        order = strategies[k % len(strategies):] + strategies[:k % len(strategies)]
        for s in order:
            header(f"strategy {s}{at}")
            runs[s].append(_train_one(args, where(out / "runs" / s, seed),
                                      base + [f"transfer.strategy={s}"] + seed_overrides(seed),
                                      {"strategy": s, "compare_role": "joint", **seed_tags}, only, log))
            done += 1
        if single_task:
            for t in tasks:
                header(f"single-task baseline {t}{at}")
                singles[t].append(_train_one(
                    args, where(out / "single_task" / t, seed),
                    base + [f"transfer.strategy={SINGLE_STRATEGY}"] + seed_overrides(seed),
                    {"strategy": SINGLE_STRATEGY, "compare_role": "single_task", "task": t, **seed_tags}, [t], log))
                done += 1
    return runs, singles


def machine_info() -> dict[str, Any]:
    """Where the timed runs ran: shown beside the cost table (the report adds the device)."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(terse=True)}


def write_comparison(runs: dict[str, Any], singles: dict[str, Any], out: str | Path, *,
                     command: str | None = None, data: str | None = None,
                     final_out: str | Path | None = None, machine: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read the runs' manifests and write baselines.json, compare.{json,md,html} and manifest.json.

    ``runs``: strategy -> a run directory or a list of them (one per seed; a directory holding
    ``seed-<n>/`` subdirectories counts as all of them); ``singles``: task -> the same.

    Every input is read and checked before the first file is written. ``final_out``: where
    ``out`` (a temporary directory) will be renamed to; the report names the runs' checkpoints
    under it.
    """
    from ..artifacts import make_manifest, path_sha256, write_json
    from ..reporting.compare import (
        COMPARE_SCHEMA_VERSION,
        check_comparable,
        compare_numbers,
        read_runs,
        render_html,
        render_markdown,
    )

    out = Path(out)

    def read_all(paths: Any) -> list[dict[str, Any]]:
        return [m for p in (paths if isinstance(paths, (list, tuple)) else [paths]) for m in read_runs(p)]

    mans = {n: read_all(p) for n, p in runs.items()}
    single_mans = {t: read_all(p) for t, p in singles.items()}
    for t, ms in single_mans.items():
        for man in ms:
            if list(man["tasks"]) != [t]:
                raise StageError(f"single-task run {man['_dir']} trains {man['tasks']}, expected only {t!r}")
    every = [m for ms in (*mans.values(), *single_mans.values()) for m in ms]
    if final_out is not None:
        for man in every:
            man["_dir"] = str(_relocate(Path(man["_dir"]), out, Path(final_out)))
    # the same comparability checks as `report --baselines`, between every run and every other
    # run and between every run and every baseline: a difference in data, split, max_rows, tasks
    # or loss definition is refused; one only in how a run was trained is a warning
    warnings = check_comparable(mans, single_mans)
    for w in warnings:
        print(f"ple-adatt compare: warning: {w}", file=sys.stderr)
    report = compare_numbers(mans, single_mans, data=data, command=command, machine=machine, warnings=warnings)
    out.mkdir(parents=True, exist_ok=True)
    if single_mans:  # the mean over seeds of each task's single-task validation loss
        losses = {t: sum(m["metrics"]["tasks"][t]["loss"] for m in ms) / len(ms) for t, ms in single_mans.items()}
        phase = "phase2" if all(m.get("phase") == "phase2" for ms in single_mans.values() for m in ms) else "phase1"
        from ..reporting.inputs import loss_provenance

        # what each loss depends on (data, split, loss definition; the same for every seed), so that
        # `report --baselines` can check a copied-away baselines.json against the joint run
        provenance = {t: loss_provenance(ms[0], t) for t, ms in single_mans.items()}
        write_json(out / "baselines.json", {"kind": "single_task_baselines", "phase": phase, "val_loss": losses,
                                            "seeds": report["single_task"]["seeds"], "provenance": provenance})
    for name, text in (("compare.md", render_markdown(report)), ("compare.html", render_html(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
    write_json(out / "compare.json", report)
    manifest = make_manifest(
        COMPARE_KIND, STAGE, schema_version=COMPARE_SCHEMA_VERSION,
        inputs={**{_input_key(f"run.{n}", m, len(ms)): m["files"]["checkpoint.pt"]
                   for n, ms in mans.items() for m in ms},
                **{_input_key(f"single_task.{t}", m, len(ms)): m["files"]["checkpoint.pt"]
                   for t, ms in single_mans.items() for m in ms}},
        extra={"strategies": list(mans), "tasks": [t["name"] for t in report["tasks"]], "seeds": report["seeds"],
               "pareto_front": report["pareto_front"], "ranking_by_delta_m": report["ranking_by_delta_m"],
               "ranking": report["ranking_text"],
               "files": {f: path_sha256(out / f) for f in FILES}},
    )
    write_json(out / "manifest.json", manifest)
    return report


def _input_key(prefix: str, man: dict[str, Any], n: int) -> str:
    return f"{prefix}.seed-{(man.get('train_config') or {}).get('seed', 0)}" if n > 1 else prefix


def _relocate(path: Path, src: Path, dst: Path) -> Path:
    """``path`` as it will be named once ``src`` is renamed to ``dst``."""
    try:
        return dst / path.relative_to(src)
    except ValueError:
        return path


def _pairs(items: list[str], flag: str) -> dict[str, list[str]]:
    """NAME=DIR items; a NAME given again adds another seed of that strategy."""
    out: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise StageError(f"{flag} {item!r}: expected NAME=DIR")
        k, v = item.split("=", 1)
        out.setdefault(k.strip(), []).append(v.strip())
    return out


def run(args: argparse.Namespace) -> int:
    from ..artifacts import atomic_output_dir

    command = "ple-adatt " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["compare"] else None
    out = Path(args.out)
    if args.runs:
        refuse_training_options(args)
        runs: dict[str, Any] = _pairs(args.runs, "--runs")
        singles: dict[str, Any] = {}
        if args.singles:
            root = Path(args.singles)
            if not root.is_dir():
                raise StageError(f"--singles {root}: not a directory of single-task runs")
            singles = {d.name: d for d in sorted(root.iterdir()) if d.is_dir()}
        if out.is_dir() and any(is_within(p, out) for ps in runs.values() for p in ps) or (
                out.is_dir() and any(is_within(p, out) for p in singles.values())):
            # a new report beside the runs it reads: add the report files, keep the runs
            _report(args, runs, singles, out, command)
        else:
            with atomic_output_dir(out) as tmp:
                _report(args, runs, singles, tmp, command, final_out=out)
    else:
        strategies = parse_strategies(args.strategies)
        parse_seeds(args.seeds, 0)  # a bad --seeds fails before anything else
        refuse_foreign_contents(out)
        with atomic_output_dir(out) as tmp:  # a failed compare leaves no partial OUT
            runs, singles = train_all(args, strategies, not args.no_single_task, out=tmp)
            _report(args, runs, singles, tmp, command, final_out=out,
                    machine=machine_info())
    print((out / "compare.md").read_text())
    print(f"wrote {args.out}/compare.html, compare.md, compare.json"
          + (f" and {args.out}/baselines.json (for `ple-adatt report --baselines`)" if singles else ""))
    return 0


#: options that only a training compare uses (argparse dest -> option)
TRAINING_OPTIONS = {"data": "--data", "data_config": "--data-config", "config": "--config",
                    "validation": "--validation", "tasks": "--tasks", "no_single_task": "--no-single-task",
                    "overrides": "--set"}


def refuse_training_options(args: argparse.Namespace) -> None:
    """With ``--runs`` nothing trains: refuse the options that would only be ignored."""
    if getattr(args, "seeds", None) is not None:
        raise StageError(f"--seeds {args.seeds}: trains new runs; with --runs the seeds are read from the runs' "
                         "manifests (repeat --runs NAME=DIR once per seed)")
    given = [opt for dest, opt in TRAINING_OPTIONS.items() if getattr(args, dest, None)]
    if getattr(args, "strategies", None) not in (None, ",".join(STRATEGY_NAMES)):
        given.append("--strategies")
    if given:
        raise StageError(f"{', '.join(given)}: only used to train new runs; with --runs (report only) nothing "
                         "trains and the runs' manifests record their data and config, so drop "
                         f"{'it' if len(given) == 1 else 'them'} (or drop --runs to train)")


#: what a compare writes into OUT; a new compare replaces OUT whole
OWN_FILES = {"runs", "single_task", "baselines.json", "compare.html", "compare.md", "compare.json", "manifest.json"}


def refuse_foreign_contents(out: Path) -> None:
    """A training compare replaces OUT whole: refuse an OUT that holds anything a compare does
    not write (``--out runs`` would otherwise delete other stages' outputs)."""
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_FILES and not p.name.startswith("."))
    if foreign:
        raise StageError(f"--out {out}: holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which "
                         "a compare did not write; a compare replaces its output directory whole, so pass a new "
                         "or an earlier compare's directory")


def _report(args: argparse.Namespace, runs: dict[str, Any], singles: dict[str, Any], out: Path,
            command: str | None, final_out: Path | None = None,
            machine: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the comparison into ``out`` and log it as the ``compare`` MLflow run."""
    with stage_tracking(STAGE, args) as tracker:
        report = write_comparison(runs, singles, out, command=command, data=args.data, final_out=final_out,
                                  machine=machine)
        tracker.log_metrics({f"compare/delta_m/{s['name']}": s["delta_m"] for s in report["strategies"]
                             if s["delta_m"] is not None})
        tracker.log_metrics({f"compare/delta_m_sd/{s['name']}": s["delta_m_sd"] for s in report["strategies"]
                             if s.get("delta_m_sd") is not None})
        tracker.set_tags({"pareto_front": ",".join(report["pareto_front"]), "seeds": ",".join(map(str, report["seeds"])),
                          "ranking": report["ranking_text"]})
        for f in (*FILES, "baselines.json"):
            if (out / f).exists():
                tracker.log_artifact(out / f, "comparison")
    return report
