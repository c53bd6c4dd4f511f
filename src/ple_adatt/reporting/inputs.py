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
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import ArtifactError, read_manifest, read_validation

CHECKPOINT_KIND = "checkpoint"
CHECKPOINT_SCHEMAS = (1,)
BASELINES_KIND = "single_task_baselines"
PHASES = ("phase1", "phase2")


@dataclass
class Baselines:
    """Single-task validation losses by phase: ``{"phase2": {"ctr": 0.07}}``."""

    val_loss: dict[str, dict[str, float]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)


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
    base = load_baselines(baselines, m1["tasks"]) if baselines is not None else None
    return ReportInputs(p1_dir, p2_dir, v_dir, m1, m2, vman, avail, ck1.system.transfer, ck2.system.transfer,
                        weights, base)


# ------------------------------------------------------------------------------- baselines


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _baselines_json(path: Path, tasks: list[str]) -> tuple[str, dict[str, float]]:
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
    return phase, {t: float(v) for t, v in losses.items()}


def _single_task_checkpoint(d: Path, tasks: list[str]) -> tuple[str, str, float] | None:
    """(phase, task, val loss) of a single-task checkpoint dir (or its phase2/phase1 subdir)."""
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
            return man.get("phase", "phase2"), t, float(loss)
    return None


def load_baselines(path: str | Path, tasks: list[str]) -> Baselines:
    """Read ``--baselines`` (a JSON file or a directory; see the module docstring)."""
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"--baselines {p}: does not exist; pass a baselines JSON file or a directory of "
                            "single-task checkpoints (see docs/report.md)")
    out = Baselines()

    def add(phase: str, task: str, loss: float, source: str) -> None:
        have = out.val_loss.setdefault(phase, {})
        if task in have:
            raise ArtifactError(f"--baselines {p}: task {task!r} ({phase}) is given twice (again in {source})")
        have[task] = loss

    if p.is_file():
        phase, losses = _baselines_json(p, tasks)
        for t, v in losses.items():
            add(phase, t, v, str(p))
        out.sources.append(str(p))
        return out
    if (p / "baselines.json").exists():
        phase, losses = _baselines_json(p / "baselines.json", tasks)
        for t, v in losses.items():
            add(phase, t, v, str(p / "baselines.json"))
        out.sources.append(str(p / "baselines.json"))
    for sub in sorted(q for q in p.iterdir() if q.is_dir() and not q.name.startswith(".")):
        found = _single_task_checkpoint(sub, tasks)
        if found:
            add(*found, str(sub))
            out.sources.append(str(sub))
    if not out.val_loss:
        raise ArtifactError(f"--baselines {p}: holds no baselines.json and no single-task checkpoint directory "
                            "(see docs/report.md for the accepted forms)")
    return out
