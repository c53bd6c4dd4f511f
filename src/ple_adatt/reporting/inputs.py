"""Read and cross-check the report's inputs: two checkpoints, a validation result, baselines.

Every problem is an :class:`~ple_adatt.artifacts.ArtifactError` whose message names the
path, what is wrong and what to run instead; the CLI prints it as one line.

Single-task baselines (``--baselines``, for TCI) come in one of two forms:

* a JSON file::

      {"kind": "single_task_baselines", "phase": "phase2",
       "val_loss": {"ctr": 0.0712, "cvr": 0.0981}}

  ``val_loss`` maps a task to its validation loss when trained alone (the unweighted
  per-task loss, the ``metrics.tasks.<task>.loss`` of a checkpoint manifest); ``phase``
  (``phase1`` or ``phase2``, default ``phase2``) says which joint checkpoint to compare with.
* a directory holding single-task checkpoint directories (``ple-adatt train`` outputs with
  one task: ``DIR/<name>/manifest.json`` of kind ``checkpoint``, or ``DIR/<name>/phase2``
  and ``DIR/<name>/phase1``), and optionally a ``baselines.json`` of the form above. A
  checkpoint contributes ``metrics.tasks.<task>.loss`` at its own phase (phase2 preferred).
  ``DIR/<name>/seed-<n>/`` (the ``single_task`` directory of a several-seed ``ple-adatt
  compare``) holds one such run per seed: the task's loss is the mean over the seeds, as in
  the compare's baselines.json, and every seed's provenance is checked.

A validation loss is only comparable with the joint run's when both were computed on the
same data and split with the same loss definition. Every baseline's provenance
(:func:`loss_provenance`: data hash, split, ``max_rows``, the task's target spec, loss and
its parameters, for InfoNCE the evaluation batch) is therefore checked against the joint
checkpoint of the same phase: a difference is an error naming the key and both values.
Single-task checkpoints record it in their manifests; a baselines JSON may carry it as
``"provenance": {"<task>": {...}}``. A JSON without it that sits in a ``ple-adatt compare``
output is checked against the ``single_task/<task>`` checkpoints beside it (when their losses
are the JSON's); otherwise the report warns that the baselines are unchecked. Differences in
how the baselines were trained (``model``, ``training``, ``seed``) are warnings, not errors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import ArtifactError, read_manifest, read_validation
from ..config import EVAL_BATCH_MIN

CHECKPOINT_KIND = "checkpoint"
CHECKPOINT_SCHEMAS = (1,)
BASELINES_KIND = "single_task_baselines"
PHASES = ("phase1", "phase2")


@dataclass
class Baselines:
    """Single-task validation losses by phase: ``{"phase2": {"ctr": 0.07}}``.

    ``checked``: per phase and task, the provenance keys found equal to the joint run's;
    ``warnings``: what could not be checked, or differs only in how the baseline was trained.
    """

    val_loss: dict[str, dict[str, float]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    checked: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class ReportInputs:
    phase1_dir: Path
    phase2_dir: Path
    validation_dir: Path
    phase1: dict[str, Any]  # manifests
    phase2: dict[str, Any]
    validation: dict[str, Any]
    availability: dict[str, Any]
    transfer: Any  # the phase-1 checkpoint's transfer module (None for no strategy)
    transfer2: Any  # the phase-2 checkpoint's transfer module
    loss_weights: list[float] | None  # fixed per-task loss weights, None with uncertainty weighting
    baselines: Baselines | None


def _strip(h: Any) -> str | None:
    return h.split(":", 1)[1] if isinstance(h, str) and h.startswith("sha256:") else h


def _checkpoint_manifest(path: Path, flag: str, phase: str) -> dict[str, Any]:
    if not path.is_dir():
        hint = f"; pass the `{phase}` directory written by `ple-adatt train` or `ple-adatt train-{phase}`"
        raise ArtifactError(f"{flag} {path}: {'not a directory' if path.exists() else 'does not exist'}{hint}")
    man = read_manifest(path, CHECKPOINT_KIND, CHECKPOINT_SCHEMAS)
    if man.get("phase") != phase:
        raise ArtifactError(
            f"{flag} {path}: is a {man.get('phase')} checkpoint, expected {phase}; "
            f"pass the {phase} checkpoint directory (e.g. runs/train/{phase})"
        )
    return man


def load_inputs(*, phase1: str | Path, phase2: str | Path, validation: str | Path,
                baselines: str | Path | None = None) -> ReportInputs:
    """Read, verify and cross-check every input; raise ArtifactError on the first problem."""
    from ..checkpoint import load_checkpoint

    p1_dir, p2_dir, v_dir = Path(phase1), Path(phase2), Path(validation)
    m1 = _checkpoint_manifest(p1_dir, "--phase1", "phase1")
    m2 = _checkpoint_manifest(p2_dir, "--phase2", "phase2")
    if m1.get("tasks") != m2.get("tasks"):
        only1 = [t for t in m1.get("tasks", []) if t not in m2.get("tasks", [])]
        only2 = [t for t in m2.get("tasks", []) if t not in m1.get("tasks", [])]
        raise ArtifactError(
            f"--phase1 {p1_dir} and --phase2 {p2_dir} come from different runs: their tasks differ "
            f"(only in phase1: {only1 or '-'}, only in phase2: {only2 or '-'}, or a different order); "
            "pass the phase1 and phase2 directories of the same `ple-adatt train` run"
        )
    p1_hash = (m1.get("files") or {}).get("checkpoint.pt")
    p2_from = (m2.get("inputs") or {}).get("checkpoint")
    if p1_hash and p2_from and _strip(p2_from) != _strip(p1_hash):
        raise ArtifactError(
            f"--phase2 {p2_dir} was not trained from --phase1 {p1_dir} (its input checkpoint hash "
            f"{_strip(p2_from)[:12]} != {_strip(p1_hash)[:12]}); pass the phase1 and phase2 directories "
            "of the same run"
        )
    vman, avail = read_validation(v_dir, data_hash=_strip((m1.get("inputs") or {}).get("data")),
                                  data_config=m1.get("data_config"), data_config_hash=m1.get("data_config_hash"),
                                  this=f"the data config --phase1 {p1_dir} was trained with")
    missing = [t for t in m1["tasks"] if t not in (avail.get("tasks") or {})]
    if missing:
        raise ArtifactError(f"--validation {v_dir}: has no availability for the trained tasks {missing}; "
                            "pass the validation result of this run's data and data config")

    ck1 = load_checkpoint(p1_dir)  # verifies the content hash and every required buffer
    ck2 = load_checkpoint(p2_dir)
    weighting = ck1.train_cfg.effective_loss_weighting
    weights = [float(w) for w in ck1.system.criterion.weights.tolist()] if weighting == "fixed" else None
    base = (load_baselines(baselines, m1["tasks"], joint={"phase1": (p1_dir, m1), "phase2": (p2_dir, m2)})
            if baselines is not None else None)
    return ReportInputs(p1_dir, p2_dir, v_dir, m1, m2, vman, avail, ck1.system.transfer, ck2.system.transfer,
                        weights, base)


# ------------------------------------------------------------------------------- baselines

#: the parameters each loss depends on (besides its name)
LOSS_PARAMS = {"focal": ("alpha", "gamma"), "huber": ("delta",), "infonce": ("temperature",)}
#: the target spec fields a task's loss depends on
TARGET_FIELDS = ("column", "type", "num_classes", "vocab_size", "bounds")
#: training settings that do not change what a run learns (how it runs, what it logs)
EXECUTION_KEYS = {"log_every", "compile", "compile_mode", "cuda_graph", "fused_mixture"}


def loss_provenance(man: dict[str, Any], task: str) -> dict[str, Any]:
    """What ``task``'s validation loss in the checkpoint manifest ``man`` depends on.

    Flat keys: ``data_hash`` (bare hex), ``split`` (the data config's split), ``max_rows``,
    ``target`` (the task's column, type, classes, vocabulary, bounds), ``loss`` (the loss
    name, defaults resolved) and its parameters (``alpha``/``gamma`` for focal, ``delta`` for
    huber, ``temperature`` and ``eval_batch_size`` for infonce). A key the manifest does not
    record is left out. ``ple-adatt compare`` can write this per task into baselines.json
    (``"provenance": {"<task>": ...}``) so the report can check a baselines JSON as well.
    """
    from ..config import DEFAULT_LOSS, TaskLossConfig

    out: dict[str, Any] = {}
    data = (man.get("inputs") or {}).get("data")
    if data:
        out["data_hash"] = _strip(data)
    dc = man.get("data_config")
    if isinstance(dc, dict) and "split" in dc:
        out["split"] = dc["split"]
    tc = man.get("train_config")
    spec = next((t for t in man.get("task_specs") or [] if isinstance(t, dict) and t.get("name") == task), None)
    if spec is not None:
        out["target"] = {k: spec.get(k) for k in TARGET_FIELDS}
    if isinstance(tc, dict):
        out["max_rows"] = tc.get("max_rows")
        cfg = (tc.get("tasks") or {}).get(task) or {}
        loss = cfg.get("loss") or (DEFAULT_LOSS.get(spec.get("type")) if spec else None)
        if loss:
            out["loss"] = loss
            default = TaskLossConfig()
            for k in LOSS_PARAMS.get(loss, ()):
                out[k] = cfg.get(k, getattr(default, k))
            if loss == "infonce" and isinstance((tc.get("training") or {}).get("batch_size"), int):
                out["eval_batch_size"] = max(tc["training"]["batch_size"], EVAL_BATCH_MIN)
    return out


#: checked in this order, so a different loss is named before its parameters
PROVENANCE_KEYS = ("data_hash", "split", "max_rows", "target", "loss", "alpha", "gamma", "delta", "temperature",
                   "eval_batch_size")
WHAT = {"data_hash": "the data hash", "split": "the data split", "max_rows": "train_config.max_rows",
        "target": "the target spec", "loss": "the loss", "eval_batch_size": "the InfoNCE evaluation batch"}


def _show(v: Any) -> str:
    if isinstance(v, str) and len(v) == 64 and all(ch in "0123456789abcdef" for ch in v):
        return v[:12]
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else repr(v)


def provenance_difference(a: dict[str, Any], b: dict[str, Any]
                          ) -> tuple[list[str], list[str], tuple[str, str] | None]:
    """Compare two :func:`loss_provenance` records key by key (``PROVENANCE_KEYS`` order).

    Returns (keys found equal, keys only one side records, the first differing key with what
    it is, e.g. ``("max_rows", "train_config.max_rows")``, or None). Shared by ``report
    --baselines`` and ``ple-adatt compare``, so both refuse the same differences.
    """
    checked, missing = [], []
    for key in PROVENANCE_KEYS:
        if key not in a and key not in b:
            continue
        if key not in a or key not in b:
            missing.append(key)
            continue
        if a[key] != b[key]:
            return checked, missing, (key, WHAT.get(key, f"the {a.get('loss', b.get('loss'))} loss parameter {key}"))
        checked.append(key)
    return checked, missing, None


def _check_provenance(source: str, task: str, phase: str, base: dict[str, Any],
                      joint: tuple[Path, dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Refuse a baseline whose loss is not comparable; return (keys checked, keys unrecorded)."""
    jdir, jman = joint
    want = loss_provenance(jman, task)
    checked, missing, diff = provenance_difference(base, want)
    if diff is not None:
        key, what = diff
        raise ArtifactError(
            f"--baselines {source}: task {task!r} is not comparable with --{phase} {jdir}: `{key}` "
            f"({what}) is {_show(base[key])} in the baseline, {_show(want[key])} in the joint run; TCI "
            "needs baselines trained on the same data and split with the same loss definition (e.g. "
            "`ple-adatt compare` with the joint run's data and config)")
    return checked, missing


#: what the model reads from the data config besides the tasks and the split (those are in the loss provenance)
INPUT_KEYS = ("numeric_features", "categorical_features", "cluster_column", "num_clusters")


def _training_diffs(bman: dict[str, Any], jman: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Settings of ``model``, ``training``, ``seed`` and the model's inputs (features, clusters)
    in which a baseline was trained differently."""
    bt, jt = bman.get("train_config") or {}, jman.get("train_config") or {}
    out = []
    if bt.get("seed") != jt.get("seed"):
        out.append(("seed", bt.get("seed"), jt.get("seed")))
    bd, jd = bman.get("data_config") or {}, jman.get("data_config") or {}
    for k in INPUT_KEYS:
        if bd.get(k) != jd.get(k):
            out.append((f"data_config.{k}", bd.get(k), jd.get(k)))
    for section in ("model", "training"):
        b, j = bt.get(section) or {}, jt.get(section) or {}
        for k in sorted(set(b) | set(j)):
            if k not in EXECUTION_KEYS and b.get(k) != j.get(k):
                out.append((f"{section}.{k}", b.get(k), j.get(k)))
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _baselines_json(path: Path, tasks: list[str]) -> tuple[str, dict[str, float], dict[str, dict[str, Any]]]:
    """(phase, val_loss, provenance per task) of a baselines JSON."""
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"--baselines {path}: not valid JSON ({e})") from e
    fix = ('; expected {"kind": "single_task_baselines", "phase": "phase2", '
           '"val_loss": {"<task>": <loss>, ...}} (see docs/report.md)')
    if not isinstance(obj, dict) or obj.get("kind") != BASELINES_KIND:
        raise ArtifactError(f"--baselines {path}: `kind` is {obj.get('kind') if isinstance(obj, dict) else None!r}, "
                            f"expected {BASELINES_KIND!r}{fix}")
    phase = obj.get("phase", "phase2")
    if phase not in PHASES:
        raise ArtifactError(f"--baselines {path}: `phase` is {phase!r}; allowed: {', '.join(PHASES)}")
    losses = obj.get("val_loss")
    if not isinstance(losses, dict) or not losses:
        raise ArtifactError(f"--baselines {path}: `val_loss` is missing or empty{fix}")
    unknown = [t for t in losses if t not in tasks]
    if unknown:
        raise ArtifactError(f"--baselines {path}: tasks {unknown} are not tasks of this run ({', '.join(tasks)})")
    bad = [t for t, v in losses.items() if not _finite(v) or v <= 0]
    if bad:
        raise ArtifactError(f"--baselines {path}: val_loss of {bad} must be positive numbers")
    prov = obj.get("provenance", {})
    if not isinstance(prov, dict) or not all(isinstance(v, dict) for v in prov.values()):
        raise ArtifactError(f"--baselines {path}: `provenance` must map a task to an object of the keys "
                            f"{', '.join(PROVENANCE_KEYS)}")
    return phase, {t: float(v) for t, v in losses.items()}, prov


def _single_task_checkpoint(d: Path, tasks: list[str]) -> tuple[str, str, float, dict[str, Any], Path] | None:
    """(phase, task, val loss, manifest, dir) of a single-task checkpoint dir (or its phase2/phase1 subdir)."""
    for cand in (d, d / "phase2", d / "phase1"):
        if (cand / "manifest.json").exists():
            man = read_manifest(cand, CHECKPOINT_KIND, CHECKPOINT_SCHEMAS)
            ts = man.get("tasks") or []
            if len(ts) != 1:
                raise ArtifactError(f"--baselines {cand}: a baseline checkpoint must train one task, this one "
                                    f"trains {len(ts)} ({', '.join(ts)})")
            t = ts[0]
            if t not in tasks:
                raise ArtifactError(f"--baselines {cand}: task {t!r} is not a task of this run")
            loss = ((man.get("metrics") or {}).get("tasks") or {}).get(t, {}).get("loss")
            if not _finite(loss) or loss <= 0:
                raise ArtifactError(f"--baselines {cand}: manifest has no positive metrics.tasks.{t}.loss")
            return man.get("phase", "phase2"), t, float(loss), man, cand
    return None


def _seeded_single_task(d: Path, tasks: list[str]) -> tuple[str, str, float, list[tuple[dict[str, Any], Path]]] | None:
    """(phase, task, mean val loss, [(manifest, dir)] per seed) of ``d/seed-<n>/`` single-task runs
    (a several-seed ``ple-adatt compare``'s ``single_task/<task>``), None without ``seed-*`` dirs."""
    seeds = sorted((q for q in d.glob("seed-*") if q.is_dir()),
                   key=lambda q: (0, int(q.name[5:]), "") if q.name[5:].isdigit() else (1, 0, q.name))
    if not seeds:
        return None
    found = []
    for q in seeds:
        one = _single_task_checkpoint(q, tasks)
        if one is None:
            raise ArtifactError(f"--baselines {q}: holds no single-task checkpoint (manifest.json, phase2/ or "
                                f"phase1/); each seed-<n>/ of {d} must hold one run of the same task")
        found.append(one)
    names, phases = sorted({f[1] for f in found}), sorted({f[0] for f in found})
    if len(names) > 1:
        raise ArtifactError(f"--baselines {d}: its seed-<n>/ runs train different tasks ({', '.join(names)}); "
                            "one task per directory")
    if len(phases) > 1:
        raise ArtifactError(f"--baselines {d}: its seed-<n>/ runs mix {' and '.join(phases)} checkpoints; give "
                            "every seed the same phase")
    return phases[0], names[0], sum(f[2] for f in found) / len(found), [(f[3], f[4]) for f in found]


def _compare_sibling(path: Path, task: str, phase: str, loss: float) -> dict[str, Any] | None:
    """The manifest of the ``single_task/<task>/<phase>`` checkpoint a ``ple-adatt compare`` output
    holds beside its baselines.json, when its loss is the JSON's (so the JSON was made from it)."""
    mpath = path.parent / "single_task" / task / phase / "manifest.json"
    if not mpath.is_file():
        return None
    try:
        man = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    got = ((man.get("metrics") or {}).get("tasks") or {}).get(task, {}).get("loss") if isinstance(man, dict) else None
    if man.get("kind") != CHECKPOINT_KIND or not _finite(got) or not math.isclose(got, loss, rel_tol=1e-9):
        return None
    return man


def load_baselines(path: str | Path, tasks: list[str],
                   joint: dict[str, tuple[Path, dict[str, Any]]] | None = None) -> Baselines:
    """Read ``--baselines`` (a JSON file or a directory; see the module docstring).

    ``joint``: the joint run's checkpoints by phase, ``{"phase2": (dir, manifest)}``; with it
    every baseline's provenance is checked against the checkpoint of its phase (an error when
    a loss is not comparable, a warning in ``Baselines.warnings`` when it cannot be checked).
    """
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"--baselines {p}: does not exist; pass a baselines JSON file or a directory of "
                            "single-task checkpoints (see docs/report.md)")
    out = Baselines()
    unchecked: dict[str, list[str]] = {}  # source -> tasks without any provenance
    partly: dict[tuple[str, ...], list[str]] = {}  # unrecorded keys -> tasks
    trained: dict[tuple[str, str, str], list[str]] = {}  # (key, baseline value, joint value) -> tasks

    def add(phase: str, task: str, loss: float, source: str, prov: dict[str, Any] | None = None,
            man: dict[str, Any] | None = None) -> None:
        record(phase, task, loss, source)
        check(phase, task, source, prov, man)

    def record(phase: str, task: str, loss: float, source: str) -> None:
        have = out.val_loss.setdefault(phase, {})
        if task in have:
            raise ArtifactError(f"--baselines {p}: task {task!r} ({phase}) is given twice (again in {source})")
        have[task] = loss

    def check(phase: str, task: str, source: str, prov: dict[str, Any] | None, man: dict[str, Any] | None,
              skip: tuple[str, ...] = ()) -> None:
        if joint is None:
            return
        if not prov:
            unchecked.setdefault(source, []).append(task)
            return
        checked, missing = _check_provenance(source, task, phase, prov, joint[phase])
        out.checked.setdefault(phase, {})[task] = checked
        if missing and task not in partly.get(tuple(missing), []):
            partly.setdefault(tuple(missing), []).append(task)
        if man is not None:
            for key, b, j in _training_diffs(man, joint[phase][1]):
                ts = trained.setdefault((key, _show(b), _show(j)), []) if key not in skip else None
                if ts is not None and task not in ts:
                    ts.append(task)

    def add_json(jpath: Path) -> None:
        phase, losses, prov = _baselines_json(jpath, tasks)
        for t, v in losses.items():
            man = None if t in prov else _compare_sibling(jpath, t, phase, v)
            add(phase, t, v, str(jpath), prov.get(t) or (loss_provenance(man, t) if man else None), man)
        out.sources.append(str(jpath))

    if p.is_file():
        add_json(p)
    else:
        if (p / "baselines.json").exists():
            add_json(p / "baselines.json")
        for sub in sorted(q for q in p.iterdir() if q.is_dir() and not q.name.startswith(".")):
            found = _single_task_checkpoint(sub, tasks)
            if found:
                phase, t, loss, man, cand = found
                add(phase, t, loss, str(cand), loss_provenance(man, t), man)
                out.sources.append(str(sub))
            elif seeded := _seeded_single_task(sub, tasks):  # several seeds: their mean, each seed checked
                phase, t, loss, runs = seeded
                record(phase, t, loss, str(sub))
                for man, cand in runs:
                    check(phase, t, str(cand), loss_provenance(man, t), man, skip=("seed",) if len(runs) > 1 else ())
                if joint is not None and len(runs) > 1:
                    seeds = ", ".join(str((m.get("train_config") or {}).get("seed")) for m, _ in runs)
                    jseed = (joint[phase][1].get("train_config") or {}).get("seed")
                    trained.setdefault(("seed", f"{seeds} (mean over {len(runs)} seeds)", _show(jseed)), []).append(t)
                out.sources.append(str(sub))
        if not out.val_loss:
            raise ArtifactError(
                f"--baselines {p}: holds no baselines.json and no single-task checkpoint directory; expected "
                "DIR/<task>/ or DIR/<task>/phase2|phase1 (a one-seed compare's single_task/), DIR/<task>/seed-<n>/"
                "phase2|phase1 (a several-seed compare's) or a compare OUT holding baselines.json (see "
                "docs/report.md)")
    for source, ts in unchecked.items():
        out.warnings.append(
            f"baselines {source} record no provenance (data hash, split, loss definition) for {', '.join(ts)}: "
            "their comparability with this run is unchecked; TCI assumes they were trained on the same data and "
            "split with the same loss definition")
    for keys, ts in partly.items():
        out.warnings.append(f"baselines of {', '.join(ts)} do not record {', '.join(keys)} (or the joint run does "
                            "not): those were not checked")
    if trained:
        diffs = "; ".join(f"{k} {b} vs {j} ({', '.join(ts) if len(ts) < len(tasks) else 'every task'})"
                          for (k, b, j), ts in trained.items())
        out.warnings.append(f"the single-task baselines were trained differently from the joint run (baseline vs "
                            f"joint): {diffs}; TCI then also reflects these differences")
    return out
