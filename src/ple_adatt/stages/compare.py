"""``ple-adatt compare``: train the same data with several strategies and single-task baselines,
then write the comparison report.

    ple-adatt compare --data data/synthetic.parquet --data-config configs/data/synthetic.yaml \\
        --config configs/train/compare_small.yaml --out runs/compare \\
        [--strategies adatt,pcgrad,mgda] [--no-single-task] [--set training.shared_expert_epochs=2]
    ple-adatt compare --out runs/compare-again --runs adatt=runs/a --runs pcgrad=runs/b --singles runs/compare/single_task

Writes into ``OUT``:

* ``runs/<strategy>/phase1``, ``runs/<strategy>/phase2``: the checkpoints of each strategy
  (the same artifacts as ``ple-adatt train``; ``timing.json`` beside them);
* ``single_task/<task>/phase1|phase2``: one model per task trained alone (the same model
  and config with only that task enabled, strategy ``equal``);
* ``baselines.json``: the single-task validation losses in the format
  ``ple-adatt report --baselines`` reads (so a run's report shows TCI);
* ``compare.json`` (every number), ``compare.md``, ``compare.html`` (self-contained) and
  ``manifest.json`` (kind ``comparison``).

Every training run is tracked like ``ple-adatt train`` (nested MLflow runs tagged with
``strategy`` and ``compare_role``); ``--no-tracking`` turns that off.

Every strategy's config (and the single-task baselines') is loaded and validated before the
first one trains, so a bad combination fails in seconds, not after the earlier strategies.
``OUT`` is written like every stage output: into a temporary sibling directory renamed into
place at the end, so a failed or interrupted compare leaves no partial ``OUT``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
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


def train_all(args: argparse.Namespace, strategies: list[str], single_task: bool,
              log: Any = print, *, out: str | Path | None = None) -> tuple[dict[str, Path], dict[str, Path]]:
    """Train every strategy and (optionally) one single-task model per task into ``out``
    (default ``args.out``), after checking every run's config."""
    from ..config import load_data_config
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
    total = len(strategies) + (len(tasks) if single_task else 0)
    t0, done = time.perf_counter(), 0

    def header(what: str) -> None:
        """k/N, the time so far and, once a run has finished, a rough estimate of what is left."""
        elapsed = time.perf_counter() - t0
        left = f", about {elapsed / done * (total - done) / 60:.0f} min left" if done else ""
        log(f"=== compare {done + 1}/{total}: {what} ({elapsed / 60:.1f} min so far{left}) ===")

    runs: dict[str, Path] = {}
    for s in strategies:
        header(f"strategy {s}")
        runs[s] = _train_one(args, out / "runs" / s, base + [f"transfer.strategy={s}"],
                             {"strategy": s, "compare_role": "joint"}, only, log)
        done += 1
    singles: dict[str, Path] = {}
    if single_task:
        for t in tasks:
            header(f"single-task baseline {t}")
            singles[t] = _train_one(args, out / "single_task" / t, base + [f"transfer.strategy={SINGLE_STRATEGY}"],
                                    {"strategy": SINGLE_STRATEGY, "compare_role": "single_task", "task": t}, [t], log)
            done += 1
    return runs, singles


def write_comparison(runs: dict[str, str | Path], singles: dict[str, str | Path], out: str | Path, *,
                     command: str | None = None, data: str | None = None,
                     final_out: str | Path | None = None) -> dict[str, Any]:
    """Read the runs' manifests and write baselines.json, compare.{json,md,html} and manifest.json.

    Every input is read and checked before the first file is written. ``final_out``: where
    ``out`` (a temporary directory) will be renamed to; the report names the runs' checkpoints
    under it.
    """
    from ..artifacts import make_manifest, path_sha256, write_json
    from ..reporting.compare import (
        COMPARE_SCHEMA_VERSION,
        compare_numbers,
        read_run,
        render_html,
        render_markdown,
    )

    out = Path(out)
    mans = {n: read_run(p) for n, p in runs.items()}
    single_mans = {t: read_run(p) for t, p in singles.items()}
    for t, man in single_mans.items():
        if list(man["tasks"]) != [t]:
            raise StageError(f"single-task run {man['_dir']} trains {man['tasks']}, expected only {t!r}")
    if final_out is not None:
        for man in (*mans.values(), *single_mans.values()):
            man["_dir"] = str(_relocate(Path(man["_dir"]), out, Path(final_out)))
    report = compare_numbers(mans, single_mans, data=data, command=command)
    out.mkdir(parents=True, exist_ok=True)
    if single_mans:
        losses = {t: m["metrics"]["tasks"][t]["loss"] for t, m in single_mans.items()}
        phase = "phase2" if all(m.get("phase") == "phase2" for m in single_mans.values()) else "phase1"
        write_json(out / "baselines.json", {"kind": "single_task_baselines", "phase": phase, "val_loss": losses})
    for name, text in (("compare.md", render_markdown(report)), ("compare.html", render_html(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
    write_json(out / "compare.json", report)
    manifest = make_manifest(
        COMPARE_KIND, STAGE, schema_version=COMPARE_SCHEMA_VERSION,
        inputs={**{f"run.{n}": m["files"]["checkpoint.pt"] for n, m in mans.items()},
                **{f"single_task.{t}": m["files"]["checkpoint.pt"] for t, m in single_mans.items()}},
        extra={"strategies": list(mans), "tasks": [t["name"] for t in report["tasks"]],
               "pareto_front": report["pareto_front"], "ranking_by_delta_m": report["ranking_by_delta_m"],
               "files": {f: path_sha256(out / f) for f in FILES}},
    )
    write_json(out / "manifest.json", manifest)
    return report


def _relocate(path: Path, src: Path, dst: Path) -> Path:
    """``path`` as it will be named once ``src`` is renamed to ``dst``."""
    try:
        return dst / path.relative_to(src)
    except ValueError:
        return path


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise StageError(f"{flag} {item!r}: expected NAME=DIR")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def run(args: argparse.Namespace) -> int:
    from ..artifacts import atomic_output_dir

    command = "ple-adatt " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["compare"] else None
    out = Path(args.out)
    if args.runs:
        runs: dict[str, Any] = _pairs(args.runs, "--runs")
        singles: dict[str, Any] = {}
        if args.singles:
            root = Path(args.singles)
            if not root.is_dir():
                raise StageError(f"--singles {root}: not a directory of single-task runs")
            singles = {d.name: d for d in sorted(root.iterdir()) if d.is_dir()}
        if out.is_dir() and any(is_within(p, out) for p in (*runs.values(), *singles.values())):
            # a new report beside the runs it reads: add the report files, keep the runs
            _report(args, runs, singles, out, command)
        else:
            with atomic_output_dir(out) as tmp:
                _report(args, runs, singles, tmp, command, final_out=out)
    else:
        strategies = parse_strategies(args.strategies)
        refuse_foreign_contents(out)
        with atomic_output_dir(out) as tmp:  # a failed compare leaves no partial OUT
            runs, singles = train_all(args, strategies, not args.no_single_task, out=tmp)
            _report(args, runs, singles, tmp, command, final_out=out)
    print((out / "compare.md").read_text())
    print(f"wrote {args.out}/compare.html, compare.md, compare.json"
          + (f" and {args.out}/baselines.json (for `ple-adatt report --baselines`)" if singles else ""))
    return 0


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
            command: str | None, final_out: Path | None = None) -> dict[str, Any]:
    """Write the comparison into ``out`` and log it as the ``compare`` MLflow run."""
    with stage_tracking(STAGE, args) as tracker:
        report = write_comparison(runs, singles, out, command=command, data=args.data, final_out=final_out)
        tracker.log_metrics({f"compare/delta_m/{s['name']}": s["delta_m"] for s in report["strategies"]
                             if s["delta_m"] is not None})
        tracker.set_tags({"pareto_front": ",".join(report["pareto_front"])})
        for f in (*FILES, "baselines.json"):
            if (out / f).exists():
                tracker.log_artifact(out / f, "comparison")
    return report
