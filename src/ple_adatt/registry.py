"""The MLflow model registry: register a Phase 2 checkpoint, gate the champion, load by alias.

A registered model version is an MLflow pyfunc model (``loader_module`` flavor: this module)
whose data directory ``data/bundle`` holds

* ``checkpoint/``: the Phase 2 checkpoint exactly as the train stage wrote it
  (``checkpoint.pt`` with the adaTT buffers, ``manifest.json``, ``preprocessing.json``);
* ``validation/``: the validate stage's result (``availability.json``, ``validation.html``);
* ``report/``: the report stage's files (``report.html``, ``report.md``, ``report.json``),
  when a report was given.

The version carries lineage tags (dataset hash, config hashes, package version, git commit,
pipeline run id, component versions, negative-transfer pairs, per-task validation metrics)
and aliases: every new version gets ``registry.candidate_alias``; ``registry.champion_alias``
moves to it only when :func:`champion_gate` holds. Registering the same checkpoint again
(a retried step) returns the existing version; a version left half-done by a failed step
is completed, not duplicated.

:func:`load_registered_model` turns ``models:/<name>@<alias>`` back into the trained model
through the project's own checkpoint loader. ``mlflow`` is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import ArtifactError, path_sha256, read_validation
from .config import RegistryConfig, TrainConfig
from .tracking import (
    TAG_VALUE_MAX,
    TrackingError,
    TrackingTarget,
    check_uri,
    filter_literal,
    local_store_path,
    make_client,
    negative_transfer_pairs,
    restored_environ,
)

__all__ = [
    "RegistryError",
    "GateDecision",
    "RegisteredModel",
    "check_inputs",
    "report_of_another_checkpoint",
    "check_registry_settings",
    "check_task_contract",
    "champion_gate",
    "declared_tasks",
    "register_checkpoint",
    "load_registered_model",
    "frame_to_tensors",
    "BUNDLE",
]

BUNDLE = "bundle"  # the model's data directory: data/bundle/{checkpoint,validation,report}
REPORT_FILES = ("report.html", "report.md", "report.json", "manifest.json")
STATUS_TAG = "registration_status"  # "complete" once aliases and the gate decision are set
DATA_TASKS_TAG = "data_tasks"  # the tasks the version's data contract declares, comma-separated


class RegistryError(TrackingError):
    """Registration cannot proceed; the message names the input or the registry and the fix."""


def _sha(s: str | None) -> str:
    return (s or "").removeprefix("sha256:")


# ------------------------------------------------------------------------- inputs


@dataclass
class RegistrationInputs:
    """Everything registration reads, checked before anything is written to the registry."""

    checkpoint: Path
    manifest: dict[str, Any]
    checkpoint_sha256: str
    validation: Path
    validation_manifest: dict[str, Any]
    availability: dict[str, Any]
    report: Path | None
    report_files: list[str]
    report_manifest: dict[str, Any] | None = None


def check_inputs(checkpoint: str | Path, validation: str | Path, report: str | Path | None) -> RegistrationInputs:
    """Refuse what must not be registered: an incomplete or Phase 1 checkpoint, a validation
    result of other data, a report directory without report files, a report made from another
    Phase 2 checkpoint (its manifest's ``inputs.phase2`` is not this checkpoint's hash)."""
    from .checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint)  # refuses a missing manifest or missing adaTT buffers
    man = ck.manifest
    if man.get("phase") != "phase2":
        raise ArtifactError(
            f"{checkpoint}: is a {man.get('phase')} checkpoint; register the Phase 2 checkpoint "
            "(the output of `ple-adatt train-phase2`, or OUT/phase2 of `ple-adatt train`)"
        )
    _check_finite_state(ck.system.state_dict(), Path(checkpoint))
    _check_metrics(man, Path(checkpoint))
    vdir = Path(validation)
    vman, availability = read_validation(
        vdir, data_hash=_sha(man.get("inputs", {}).get("data")), data_config=man.get("data_config"),
        data_config_hash=man.get("data_config_hash"), this=f"the data config {checkpoint} was trained with")
    rdir, rfiles, rman = None, [], None
    if report is not None:
        rdir = Path(report)
        if not rdir.is_dir():
            raise ArtifactError(f"{rdir}: report directory not found; run `ple-adatt report` or drop --report")
        rfiles = [f for f in REPORT_FILES if (rdir / f).is_file()]
        if not any(f != "manifest.json" for f in rfiles):
            raise ArtifactError(f"{rdir}: holds none of report.html, report.md, report.json; "
                                "pass the output directory of `ple-adatt report`")
        if (rdir / "manifest.json").is_file():
            with contextlib.suppress(json.JSONDecodeError):
                rman = json.loads((rdir / "manifest.json").read_text())
        mismatch = report_of_another_checkpoint(man, rman)
        if mismatch:  # its page would describe another model
            made_from, ck_sha = mismatch
            raise ArtifactError(
                f"--report {rdir}: describes the Phase 2 checkpoint {made_from[:12]} (its manifest.json "
                f"inputs.phase2), not {ck_sha[:12]} of {checkpoint} being registered; rerun report for this "
                "checkpoint: make stage STAGE=report RUN=<dir> (or ple-adatt report --phase2 "
                f"{checkpoint} ...), or leave out --report")
    return RegistrationInputs(
        checkpoint=Path(checkpoint), manifest=man, checkpoint_sha256=man["files"]["checkpoint.pt"],
        validation=vdir, validation_manifest=vman, availability=availability, report=rdir,
        report_files=rfiles, report_manifest=rman,
    )


def report_of_another_checkpoint(checkpoint_manifest: dict[str, Any],
                                 report_manifest: dict[str, Any] | None) -> tuple[str, str] | None:
    """(the report's Phase 2 checkpoint sha256, this checkpoint's) when a report was made from
    another checkpoint than ``checkpoint_manifest``'s (the report manifest's ``inputs.phase2``);
    None when they match or the report has no readable manifest to tell."""
    if not isinstance(report_manifest, dict) or not isinstance(report_manifest.get("inputs"), dict):
        return None
    made_from = report_manifest["inputs"].get("phase2")
    if not isinstance(made_from, str) or not made_from:
        return None
    ck_sha = _sha((checkpoint_manifest.get("files") or {}).get("checkpoint.pt"))
    return None if _sha(made_from) == ck_sha else (_sha(made_from), ck_sha)


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_finite_state(state: dict[str, Any], checkpoint: Path) -> None:
    """Refuse a diverged model: a parameter or buffer holding NaN or infinity."""
    import torch

    bad = [k for k, v in state.items()
           if torch.is_tensor(v) and (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise ArtifactError(
            f"{checkpoint / 'checkpoint.pt'}: {len(bad)} of {len(state)} tensors hold NaN or infinite values "
            f"({shown}); the training diverged; retrain it (e.g. with a lower training.learning_rate) "
            "instead of registering it"
        )


def _check_metrics(man: dict[str, Any], checkpoint: Path) -> None:
    """Refuse a checkpoint whose validation metrics are missing or not finite.

    A task without validation rows (``n`` 0) has no metrics; an AUC is undefined (NaN) when
    the validation rows hold one class only. Every other metric must be a finite number.
    """
    from .metrics import PRIMARY_METRIC

    where = checkpoint / "manifest.json"
    metrics = man.get("metrics")
    tasks = metrics.get("tasks") if isinstance(metrics, dict) else None
    if not isinstance(tasks, dict) or not tasks:
        raise ArtifactError(f"{where}: key `metrics.tasks` is missing or empty: the checkpoint carries no validation "
                            "metrics; register a checkpoint written by `ple-adatt train-phase2`")
    kinds = {s.get("name"): s.get("type") for s in man.get("task_specs") or [] if isinstance(s, dict)}
    bad: list[str] = []
    if not _finite_number(metrics.get("val_loss")):
        bad.append(f"`metrics.val_loss` is {metrics.get('val_loss')!r}")
    evaluated = 0
    for task in man.get("tasks") or list(tasks):
        m = tasks.get(task)
        if not isinstance(m, dict):
            bad.append(f"`metrics.tasks.{task}` is missing")
            continue
        if m.get("n") == 0:  # no validation rows: nothing to evaluate
            continue
        evaluated += 1
        primary = PRIMARY_METRIC.get(kinds.get(task, ""), (None, True))[0]
        if primary is not None and primary not in m:
            bad.append(f"`metrics.tasks.{task}.{primary}` is missing")
        for key, v in m.items():
            if key in ("n", "by_cluster") or _finite_number(v):
                continue
            if key == "auc" and m.get("positive_rate") in (0, 0.0, 1, 1.0):
                continue  # one class only: AUC is undefined, not a failure of the model
            bad.append(f"`metrics.tasks.{task}.{key}` is {v!r}")
    if not bad and evaluated == 0:
        bad.append("no task has validation rows")
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ArtifactError(
            f"{where}: validation metric {bad[0]}{more}; the model diverged or was not evaluated; retrain "
            "it instead of registering it"
        )


# ---------------------------------------------------------------------- the champion gate


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    champion_version: str | None = None
    worse: dict[str, float] = field(default_factory=dict)  # task -> relative worsening


def primary_metrics(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{task: {"metric": name, "value": v, "higher_is_better": bool}}`` of a checkpoint."""
    from .metrics import PRIMARY_METRIC

    kinds = {s["name"]: s["type"] for s in manifest.get("task_specs", [])}
    out: dict[str, dict[str, Any]] = {}
    for task, m in (manifest.get("metrics", {}).get("tasks") or {}).items():
        key, higher = PRIMARY_METRIC[kinds[task]]
        v = m.get(key)
        out[task] = {"metric": key, "value": float(v) if isinstance(v, (int, float)) else None,
                     "higher_is_better": higher}
    return out


def champion_gate(candidate: dict[str, dict[str, Any]], champion: dict[str, dict[str, Any]] | None,
                  tolerance: float, champion_version: str | None = None) -> GateDecision:
    """Promote unless some task's primary metric is worse than the champion's by more than
    ``tolerance`` (relative to the champion's value), or a champion task is missing.

    Without a champion the candidate is promoted if it has a finite metric at all. A task
    whose champion value is missing or not finite is not compared; a candidate value that
    is missing or not finite where the champion's is finite fails. Nothing is promoted on a
    NaN: a tolerance that is not a finite number >= 0 fails, and so does a champion with
    which no task could be compared.
    """
    if not _finite_number(tolerance) or tolerance < 0:
        return GateDecision(False, f"registry.tolerance is {tolerance!r}, not a finite number >= 0; not promoting",
                            champion_version)
    if champion is None:
        if not any(_finite_number((c or {}).get("value")) for c in candidate.values()):
            return GateDecision(False, "the candidate has no finite validation metric; not promoting")
        return GateDecision(True, "no champion yet")
    fails: list[str] = []
    worse: dict[str, float] = {}
    for task, ch in sorted(champion.items()):
        cv = ch.get("value")
        if not _finite_number(cv):
            continue
        cand = candidate.get(task)
        if cand is None:
            fails.append(f"{task}: not in the candidate")
            continue
        v = cand.get("value")
        if not _finite_number(v):
            fails.append(f"{task}: {ch['metric']} is missing in the candidate")
            continue
        diff = (cv - v) if ch["higher_is_better"] else (v - cv)  # > 0: the candidate is worse
        rel = diff / abs(cv) if abs(cv) > 1e-12 else diff
        worse[task] = rel
        if not math.isfinite(rel) or rel > tolerance:
            fails.append(f"{task} {ch['metric']} {v:.4g} vs {cv:.4g} ({rel:.1%} worse)")
    who = f"champion v{champion_version}" if champion_version else "the champion"
    if not fails and not worse:
        return GateDecision(False, f"no task could be compared with {who} (no finite metric on both sides); "
                            "move the champion alias by hand if this version should serve", champion_version)
    if fails:
        return GateDecision(False, f"worse than {who} beyond tolerance {tolerance:.1%}: " + "; ".join(fails),
                            champion_version, worse)
    top = max(worse.items(), key=lambda kv: kv[1], default=None)
    detail = f" (largest change: {top[0]} {top[1]:+.1%} worse)" if top and top[1] > 0 else ""
    return GateDecision(True, f"no task worse than {who} by more than {tolerance:.1%}{detail}",
                        champion_version, worse)


# ---------------------------------------------------------------------- MLflow helpers


@contextlib.contextmanager
def _fluent_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for the block, then restore exactly what was there.

    ``mlflow.set_tracking_uri`` / ``set_registry_uri`` also write $MLFLOW_TRACKING_URI and
    $MLFLOW_REGISTRY_URI; both the module state and the environment are put back.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    with restored_environ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            tracking_utils._tracking_uri, registry_utils._registry_uri = saved


def _call(target: TrackingTarget, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args, **kwargs)
    except MlflowException as e:
        msg = (str(e.message).splitlines() or [type(e).__name__])[0][:300]
        raise RegistryError(f"MLflow registry at {target.uri} (from {target.origin}): {what} failed: {msg}") from e
    except OSError as e:
        msg = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise RegistryError(f"MLflow registry at {target.uri} (from {target.origin}): {what} failed: {msg}; "
                            f"is the tracking server up? ({target.fix})") from e


def _registered_model(client: Any, target: TrackingTarget, name: str) -> Any | None:
    """The registered model ``name``, or None when there is none yet."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise RegistryError(f"MLflow registry at {target.uri} (from {target.origin}): reading model {name!r} "
                            f"failed: {(str(e.message).splitlines() or [''])[0][:300]}") from e
    except OSError as e:
        raise RegistryError(f"MLflow registry at {target.uri} (from {target.origin}): reading model {name!r} "
                            f"failed: {(str(e).splitlines() or [''])[0][:300]}; is the tracking server up?") from e


def _search_versions(client: Any, target: TrackingTarget, name: str, what: str, filt: str) -> list[Any]:
    """Versions of ``name`` matching ``filt``. The filter never holds the model name (MLflow's
    filter grammar cannot quote every name); the versions are picked by name here."""
    out: list[Any] = []
    token = None
    while True:
        page = _call(target, what, client.search_model_versions, filt, max_results=1000, page_token=token)
        out.extend(v for v in page if v.name == name)
        token = getattr(page, "token", None)
        if not token:
            return out


def _versions(client: Any, target: TrackingTarget, name: str, checkpoint_sha256: str) -> list[Any]:
    """The versions of ``name`` that hold the checkpoint with this content hash."""
    return _search_versions(client, target, name, "listing versions",
                            f"tags.checkpoint_sha256 = {filter_literal(checkpoint_sha256, 'checkpoint hash')}")


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _signature(inputs: RegistrationInputs) -> Any:
    """Inputs: the raw feature columns (types as the validate stage saw them), the cluster
    column; outputs: one column per task (arrays for multiclass and retrieval)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    dtype_map = {"Float32": "float", "Float64": "double", "Int64": "long", "Int32": "integer",
                 "Int16": "integer", "Int8": "integer", "UInt8": "integer", "UInt16": "integer",
                 "UInt32": "long", "String": "string", "Utf8": "string", "Boolean": "boolean",
                 "Categorical": "string", "Enum": "string"}
    data_cfg = inputs.manifest["data_config"]
    seen = inputs.availability.get("features") or {}

    def col_type(col: str, default: str) -> str:
        info = seen.get(col) or {}
        t = dtype_map.get(str(info.get("dtype", "")), default)
        # pandas holds an integer column with nulls as float64
        return "double" if t in ("integer", "long") and info.get("nulls") else t

    cols = [ColSpec(col_type(c, "double"), c) for c in data_cfg.get("numeric_features", [])]
    cols += [ColSpec(col_type(c, "string"), c) for c in data_cfg.get("categorical_features", [])]
    if data_cfg.get("cluster_column"):
        unknown = ((inputs.availability.get("clusters") or {}).get("rows") or {}).get("unknown", 0)
        cols.append(ColSpec("double" if unknown else "long", data_cfg["cluster_column"], required=False))
    outs = []
    for spec in inputs.manifest["task_specs"]:
        if spec["type"] in ("binary", "regression"):
            outs.append(ColSpec("double", spec["name"]))
        else:
            outs.append(ColSpec(Array("double"), spec["name"]))
    return ModelSignature(inputs=Schema(cols), outputs=Schema(outs))


#: the stages whose MLflow runs a version links to (tag ``<stage>_run_id``, ``-`` as ``_``)
LINEAGE_STAGES = ("validate", "train-phase1", "train-phase2")


def _lineage_runs(client: Any, experiment_id: str, inputs: RegistrationInputs,
                  pipeline_run_id: str | None) -> dict[str, Any]:
    """The MLflow runs of the stages that made the registered inputs: ``{stage: Run}``.

    Found by content hash, not by pipeline run (``make stage`` reruns and a register step of
    another pipeline run hold the same files): a train run carries the hash of the checkpoint
    it logged (tag ``checkpoint.sha256``), a validate run that of its ``availability.json``
    (``validation.sha256``). Of several matches a FINISHED run of this pipeline run wins,
    then the newest FINISHED one. Best effort: a stage run without tracking, in another
    experiment or store, or a search that fails leaves that stage out.
    """
    wanted = {
        "train-phase2": ("checkpoint.sha256", inputs.checkpoint_sha256),
        "train-phase1": ("checkpoint.sha256", _sha(inputs.manifest.get("inputs", {}).get("checkpoint"))),
        "validate": ("validation.sha256", path_sha256(inputs.validation / "availability.json")),
    }
    found: dict[str, Any] = {}
    for stage, (tag, sha) in wanted.items():
        if not sha or not re.fullmatch(r"[0-9a-f]{64}", sha):
            continue
        try:
            runs = client.search_runs([experiment_id], f"tags.`{tag}` = '{sha}' and tags.stage = '{stage}'",
                                      max_results=50, order_by=["attributes.start_time DESC"])
        except Exception:  # lineage is a courtesy: the registration itself does not depend on it
            continue
        runs = [r for r in runs if r.info.status == "FINISHED"] or list(runs)
        if runs:
            same = [r for r in runs if pipeline_run_id and r.data.tags.get("pipeline_run_id") == pipeline_run_id]
            found[stage] = (same or runs)[0]
    return found


def _lineage_tags(inputs: RegistrationInputs, pipeline_run_id: str | None,
                  runs: dict[str, Any] | None = None) -> dict[str, str]:
    from . import __version__
    from .artifacts import git_commit

    runs = runs or {}
    man = inputs.manifest
    producer = man.get("producer") or {}
    previous = man.get("previous") if isinstance(man.get("previous"), dict) else {}
    phase1_run = runs.get("train-phase1")
    # keyed by the pipeline's stage names (a manifest written by `ple-adatt train` says "train"
    # for both phases); Phase 1's version from the Phase 2 manifest when it records its source,
    # else from the Phase 1 run found by its checkpoint hash, else unknown (trained untracked)
    components = {
        "validate": (inputs.validation_manifest.get("producer") or {}).get("component_version"),
        "train-phase1": ((previous.get("producer") or {}).get("component_version")
                         or (phase1_run.data.tags.get("component_version") if phase1_run is not None else None)
                         or "unknown"),
        "train-phase2": producer.get("component_version"),
        "register": __version__,
    }
    if inputs.report_manifest:
        components["report"] = (inputs.report_manifest.get("producer") or {}).get("component_version")
    pairs = negative_transfer_pairs(man.get("negative_transfer"))
    metrics = {t: {m["metric"]: m["value"]} for t, m in primary_metrics(man).items()}
    train_run = runs.get("train-phase2") or phase1_run
    tags = {
        "checkpoint_sha256": inputs.checkpoint_sha256,
        "phase1_checkpoint_sha256": _sha(man.get("inputs", {}).get("checkpoint")),
        "data_sha256": _sha(man.get("inputs", {}).get("data")),
        "validation_sha256": path_sha256(inputs.validation / "availability.json"),
        "config_hash": man.get("config_hash") or "",
        "data_config_hash": man.get("data_config_hash") or "",
        **{f"{stage.replace('-', '_')}_run_id": run.info.run_id for stage, run in runs.items()},
        "train_pipeline_run_id": (train_run.data.tags.get("pipeline_run_id") or "") if train_run is not None else "",
        "package_version": __version__,
        "git_commit": producer.get("git_commit") or git_commit() or "unknown",
        "register_git_commit": git_commit() or "unknown",
        "pipeline_run_id": pipeline_run_id or "",
        "component_versions": json.dumps({k: v for k, v in components.items() if v}, sort_keys=True),
        "negative_transfer_pairs": ",".join(f"{a}<->{b}" for a, b in pairs) or "none",
        "tasks": ",".join(man.get("tasks") or []),
        DATA_TASKS_TAG: ",".join(declared_tasks(man)),
        "strategy": str(man.get("strategy", "")),
        "validation_enabled_tasks": ",".join(inputs.availability.get("enabled_tasks") or []),
        "val_metrics": json.dumps(metrics, sort_keys=True),
        "has_report": "true" if inputs.report else "false",
    }
    return {k: v[:TAG_VALUE_MAX] for k, v in tags.items() if v != ""}


def declared_tasks(manifest: dict[str, Any]) -> list[str]:
    """The task names the checkpoint's data contract declares (the model's task set; validation
    may have disabled some of them for this training run)."""
    specs = (manifest.get("data_config") or {}).get("tasks") or []
    names = [t["name"] for t in specs if isinstance(t, dict) and isinstance(t.get("name"), str)]
    return names or list(manifest.get("tasks") or [])


def _tag_tasks(tags: dict[str, str]) -> tuple[list[str], bool] | None:
    """A version's task set from its tags and whether it is the declared set (``data_tasks``)
    or, on versions registered before that tag, the trained tasks; None when unknown."""
    for key, declared in ((DATA_TASKS_TAG, True), ("tasks", False)):
        raw = tags.get(key)
        if raw and len(raw) < TAG_VALUE_MAX:  # a value cut at the limit is not a task list
            return [t for t in raw.split(",") if t], declared
    return None


def _names(tasks: list[str]) -> str:
    return f"{len(tasks)} tasks: {', '.join(tasks)}"


def check_task_contract(client: Any, target: TrackingTarget, name: str, registered: Any | None,
                        inputs: RegistrationInputs) -> None:
    """Refuse a checkpoint whose task set differs from the registered model's versions.

    One registered model serves one data contract: its versions predict the same tasks, so a
    consumer of ``@champion`` gets the columns it expects and the champion gate compares like
    with like. Compared with the versions the model's aliases point to and its latest
    version. Versions registered before the ``data_tasks`` tag carry only the trained tasks:
    those must all be tasks of the new contract.
    """
    if registered is None:
        return
    new = declared_tasks(inputs.manifest)
    labels: dict[str, list[str]] = {}
    for alias, version in (getattr(registered, "aliases", None) or {}).items():
        labels.setdefault(str(version), []).append(f"@{alias}")
    for mv in getattr(registered, "latest_versions", None) or []:
        labels.setdefault(str(mv.version), [])
    for version in sorted(labels, key=lambda v: -int(v) if v.isdigit() else 0):
        mv = _call(target, f"reading {name} v{version}", client.get_model_version, name, version)
        tags = dict(mv.tags or {})
        if tags.get("checkpoint_sha256") == inputs.checkpoint_sha256:
            continue  # this very checkpoint: registered again (a retried step)
        known = _tag_tasks(tags)
        if known is None:
            continue
        theirs, declared = known
        if (set(theirs) == set(new)) if declared else set(theirs) <= set(new):
            continue
        held = f" ({', '.join(sorted(labels[version]))})" if labels[version] else ""
        contract = (inputs.manifest.get("data_config") or {}).get("name")
        suggest = f"{name}-{contract}" if isinstance(contract, str) and contract else f"{name}-2"
        raise RegistryError(
            f"registered model {name!r}: v{version}{held} predicts {_names(theirs)}; this checkpoint's data "
            f"contract{f' {contract!r}' if contract else ''} declares {_names(new)}. One registered model holds "
            f"one task set: nothing was registered; register this model under its own name, e.g. "
            f"--set registry.model_name={suggest} (or registry.model_name in its train config)"
        )


def _bundle(inputs: RegistrationInputs, tmp: Path) -> Path:
    b = tmp / BUNDLE
    shutil.copytree(inputs.checkpoint, b / "checkpoint")
    shutil.copytree(inputs.validation, b / "validation")
    if inputs.report is not None:
        (b / "report").mkdir()
        for f in inputs.report_files:
            shutil.copy2(inputs.report / f, b / "report" / f)
    return b


def _pip_requirements() -> list[str]:
    from importlib import metadata

    reqs = []
    for pkg in ("ple-adatt", "torch", "numpy", "polars", "pandas", "mlflow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            reqs.append(f"{pkg}=={metadata.version(pkg)}")
    return reqs


# --------------------------------------------------------------------------- register


def _mlflow_check(validator: str, value: str) -> str | None:
    """MLflow's own check of a model or alias name (the registry applies it later); the
    reason it fails, or None. A missing validator (another MLflow) checks nothing here."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    fn = getattr(validation, validator, None)
    if fn is None:
        return None
    try:
        fn(value)
    except MlflowException as e:
        return str(e.message).strip().splitlines()[0][:200].rstrip(".")
    return None


def check_registry_settings(registry: RegistryConfig, extra_aliases: list[str] | tuple[str, ...] = ()) -> None:
    """Refuse registry settings that would fail or register wrongly, before anything is logged:
    a model or alias name MLflow refuses (``latest``, ``v3``), a candidate alias that is the
    champion alias, an extra alias that is the champion alias, a tolerance that is not a
    finite number >= 0."""
    name = registry.model_name
    if not isinstance(name, str) or not name.strip():
        raise RegistryError(f"registry.model_name is {name!r}; name the registered model")
    why = _mlflow_check("_validate_model_name", name)
    if why:
        raise RegistryError(f"registry.model_name {name!r}: MLflow refuses it ({why}); choose another name")
    tol = registry.tolerance
    if not _finite_number(tol) or tol < 0:
        raise RegistryError(f"registry.tolerance is {tol!r}; it must be a finite number >= 0 "
                            "(0.01: a task may be 1% worse than the champion's)")
    named = [("registry.candidate_alias", registry.candidate_alias),
             ("registry.champion_alias", registry.champion_alias),
             *(("--alias", a) for a in extra_aliases)]
    for key, alias in named:
        if not isinstance(alias, str):
            raise RegistryError(f"{key} is {alias!r}; an alias is a name")
        why = (_mlflow_check("_validate_model_alias_name", alias)
               or _mlflow_check("_validate_model_alias_name_reserved", alias))
        if why is None and (alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias)):
            why = "reserved by MLflow"
        if why:
            raise RegistryError(f"{key} {alias!r}: MLflow refuses this alias ({why}); use another alias name")
    if registry.candidate_alias == registry.champion_alias:
        raise RegistryError(
            f"registry.candidate_alias and registry.champion_alias are both {registry.champion_alias!r}; the "
            "champion alias moves only through the champion gate, so give the candidate alias another name"
        )
    for alias in extra_aliases:
        if alias == registry.champion_alias:
            raise RegistryError(f"--alias {alias}: the champion alias moves only through the champion gate; "
                                "use another alias name")


def register_checkpoint(
    inputs: RegistrationInputs,
    *,
    registry: RegistryConfig,
    tracker: Any,
    pipeline_run_id: str | None = None,
    extra_aliases: list[str] | tuple[str, ...] = (),
    on_registered: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Register ``inputs`` as a version of ``registry.model_name``; returns the registration record.

    ``tracker`` is the register stage's :class:`ple_adatt.tracking.StageTracker` (its client,
    target and run id are used). Idempotent on the checkpoint's content hash.
    ``on_registered(record)`` runs last (the stage writes its outputs there). When anything
    fails, what this call did is undone: the version it created and the logged model it
    logged are deleted, the aliases it moved are put back where they were.
    """
    check_registry_settings(registry, extra_aliases)
    client, target = tracker.client, tracker.target
    name = registry.model_name
    before = _registered_model(client, target, name)
    check_task_contract(client, target, name, before, inputs)  # before anything is logged
    aliases_before = dict(getattr(before, "aliases", None) or {}) if before is not None else {}
    created = False
    try:
        _ensure_model(client, target, name, inputs, registry)  # with its description
        existing = _versions(client, target, name, inputs.checkpoint_sha256)
        if existing:
            mv = sorted(existing, key=lambda v: int(v.version))[0]
            print(f"MLflow: checkpoint {inputs.checkpoint_sha256[:12]} is already {name} v{mv.version}; "
                  "reusing it (a retried step)")
        else:
            mv = _create_version(inputs, registry, tracker, pipeline_run_id)
            created = True
        record = _finish(client, target, name, mv, inputs, registry, extra_aliases)
        record.update(registered=True, created=created, run_id=tracker.run_id, tracking_uri=target.uri)
        if on_registered is not None:
            on_registered(record)
    except BaseException:
        _undo(client, target, name, tracker.run_id, model_existed=before is not None,
              aliases_before=aliases_before, touched=[registry.candidate_alias, registry.champion_alias,
                                                      *extra_aliases])
        raise
    return record


def _undo(client: Any, target: TrackingTarget, name: str, run_id: str, *, model_existed: bool,
          aliases_before: dict[str, str], touched: list[str]) -> None:
    """Best effort: remove what the failed registration of run ``run_id`` left behind."""
    with contextlib.suppress(Exception):  # the versions this run created (none when one was reused)
        for v in _search_versions(client, target, name, "listing versions", f"run_id = '{run_id}'"):
            client.delete_model_version(name, v.version)
    with contextlib.suppress(Exception):
        if model_existed:  # the aliases this run moved go back where they were
            now = dict(client.get_registered_model(name).aliases or {})
            for alias in dict.fromkeys(touched):
                if alias in aliases_before and now.get(alias) != aliases_before[alias]:
                    with contextlib.suppress(Exception):
                        client.set_registered_model_alias(name, alias, aliases_before[alias])
                elif alias not in aliases_before and alias in now:
                    with contextlib.suppress(Exception):
                        client.delete_registered_model_alias(name, alias)
        elif not client.search_model_versions(f"name = {filter_literal(name, 'registry.model_name')}"):
            client.delete_registered_model(name)  # created by this run and empty again
    _drop_logged_models(client, target, run_id)


def _drop_logged_models(client: Any, target: TrackingTarget, run_id: str) -> None:
    """Delete the logged models of run ``run_id`` (a failed registration's bundle copies):
    their files, then the model (marked FAILED first, should the deletion not go through)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        experiment_id = client.get_run(run_id).info.experiment_id
        models = list(client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"))
    except Exception:
        return
    for lm in models:
        with contextlib.suppress(Exception):
            client.finalize_logged_model(lm.model_id, "FAILED")
        with contextlib.suppress(Exception):
            get_artifact_repository(lm.artifact_location, tracking_uri=target.uri).delete_artifacts()
        with contextlib.suppress(Exception):
            client.delete_logged_model(lm.model_id)


def _create_version(inputs: RegistrationInputs, registry: RegistryConfig, tracker: Any,
                    pipeline_run_id: str | None) -> Any:
    import mlflow

    target = tracker.target
    client = tracker.client
    try:
        experiment_id = client.get_run(tracker.run_id).info.experiment_id
    except Exception:  # the registration below reports a store that stopped answering
        experiment_id = None
    runs = _lineage_runs(client, experiment_id, inputs, pipeline_run_id) if experiment_id is not None else {}
    tags = _lineage_tags(inputs, pipeline_run_id, runs)
    with tempfile.TemporaryDirectory(prefix="ple-adatt-register-") as tmp, _fluent_uri(target.uri):
        bundle = _bundle(inputs, Path(tmp))
        with mlflow.start_run(run_id=tracker.run_id), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example.*")
            info = _call(target, "logging the model", mlflow.pyfunc.log_model,
                         name="model", loader_module="ple_adatt.registry", data_path=str(bundle),
                         signature=_signature(inputs), pip_requirements=_pip_requirements(),
                         metadata={"checkpoint_sha256": inputs.checkpoint_sha256,
                                   "tasks": inputs.manifest.get("tasks")})
        mv = _call(target, f"registering {registry.model_name}", mlflow.register_model,
                   info.model_uri, registry.model_name, tags=tags)
    return mv


def model_description(inputs: RegistrationInputs, registry: RegistryConfig | None = None) -> str:
    """The registered model's description: what it is, its tasks, how versions are gated."""
    man = inputs.manifest
    tasks = declared_tasks(man)
    champion = registry.champion_alias if registry is not None else "champion"
    candidate = registry.candidate_alias if registry is not None else "candidate"
    tol = f"{registry.tolerance:.1%}" if registry is not None else "registry.tolerance"
    return (
        f"PLE-Cluster multi-task model (progressive layered extraction with per-cluster heads) trained with "
        f"adaTT adaptive task-to-task transfer by the ple-adatt pipeline (validate, train-phase1, train-phase2, "
        f"report, register). It predicts {len(tasks)} tasks: {', '.join(tasks)}. Every registered version gets "
        f"the @{candidate} alias; @{champion} moves to a new version only when no task's primary metric (AUC, "
        f"accuracy, RMSE, recall@10) is worse than the current champion's by more than {tol} (relative), or when "
        f"there is no champion yet. Serve models:/<name>@{champion}; each version's description and tags "
        "(champion_decision, champion_decision_reason, lineage) say why it was or was not promoted."
    )


def _ensure_model(client: Any, target: TrackingTarget, name: str, inputs: RegistrationInputs,
                  registry: RegistryConfig | None = None) -> None:
    """Create the registered model with its description, or describe one that has none
    (created by an earlier version of this code, or by hand); a description someone wrote
    stays as it is."""
    from mlflow.exceptions import MlflowException

    text = model_description(inputs, registry)
    model = _registered_model(client, target, name)
    if model is None:
        try:
            client.create_registered_model(name, description=text)
            return
        except MlflowException as e:  # created meanwhile by a concurrent step: describe it below
            if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise RegistryError(f"MLflow registry at {target.uri} (from {target.origin}): creating model "
                                    f"{name!r} failed: {(str(e.message).splitlines() or [''])[0][:300]}") from e
        model = _registered_model(client, target, name)
    if model is not None and not (model.description or "").strip():
        _call(target, f"describing model {name!r}", client.update_registered_model, name, description=text)


def version_description(version: str, inputs: RegistrationInputs, decision: str, reason: str,
                        pipeline_run_id: str | None, tags: dict[str, str]) -> str:
    """One paragraph on a version: the champion decision and why, the headline metrics, the
    data and validation hashes (short), the pipeline run and the negative-transfer pairs."""
    man = inputs.manifest
    prim = primary_metrics(man)
    shown = [f"{t} {m['metric']} {m['value']:.4g}" for t, m in prim.items() if _finite_number(m["value"])]
    metrics = "; ".join(shown[:20]) + (f"; ... ({len(shown) - 20} more in the val_metrics tag)"
                                       if len(shown) > 20 else "")
    pairs = negative_transfer_pairs(man.get("negative_transfer"))

    def short(h: str | None) -> str:
        return (h or "?")[:12]

    runs = ", ".join(f"{s} run {tags[k]}" for s in LINEAGE_STAGES if (k := f"{s.replace('-', '_')}_run_id") in tags)
    text = (
        f"v{version}: {len(man.get('tasks') or [])} tasks trained with transfer strategy "
        f"{man.get('strategy', '?')}. Champion gate: {decision} ({reason}). Validation metrics (primary, "
        f"per task): {metrics or 'none'}. Negative-transfer pairs: "
        f"{', '.join(f'{a}<->{b}' for a, b in pairs) or 'none'}. Data sha256 "
        f"{short(_sha(man.get('inputs', {}).get('data')))}, data config {short(man.get('data_config_hash'))}, "
        f"validation {short(tags.get('validation_sha256'))}, checkpoint {short(inputs.checkpoint_sha256)}. "
        f"Registered by pipeline run {pipeline_run_id or tags.get('pipeline_run_id') or '?'}"
        + (f" (trained in pipeline run {tags['train_pipeline_run_id']})"
           if tags.get("train_pipeline_run_id") and tags.get("train_pipeline_run_id") != pipeline_run_id else "")
        + (f"; {runs}" if runs else "") + "."
    )
    return text[:TAG_VALUE_MAX]


def _finish(client: Any, target: TrackingTarget, name: str, mv: Any, inputs: RegistrationInputs,
            registry: RegistryConfig, extra_aliases: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Aliases and the champion decision (kept as they are when already decided).

    The champion is read before this call sets any alias: the gate compares with the version
    that held the champion alias before, never with the version being registered.
    """
    version = str(mv.version)
    mv = _call(target, "reading the version", client.get_model_version, name, version)
    tags = dict(mv.tags)
    # the champion alias moves only through the gate, never as the candidate or an extra alias
    aliases = [a for a in dict.fromkeys([registry.candidate_alias, *extra_aliases]) if a != registry.champion_alias]
    if tags.get(STATUS_TAG) == "complete" and "champion_decision" in tags:
        # registered and decided before: the decision stands, and the candidate alias, which a
        # newer version may hold by now, stays where it is; only the extra aliases asked for move
        decision = tags["champion_decision"]
        reason = f"decided when v{version} was registered: {tags.get('champion_decision_reason', '')}"
        before = tags.get("champion_before") or None
        for alias in dict.fromkeys(extra_aliases):
            if alias != registry.champion_alias:
                _call(target, f"setting alias {alias!r}", client.set_registered_model_alias, name, alias, version)
    else:
        champ = _call(target, "reading the champion", _alias_version, client, name, registry.champion_alias)
        if champ is not None and str(champ.version) == version and "champion_decision" in tags:
            # a retried step: the gate promoted this version before the step was cut off
            gate = GateDecision(tags["champion_decision"] == "promoted", tags.get("champion_decision_reason", ""),
                                tags.get("champion_before"))
            champ_before = tags.get("champion_before") or "none"
        elif champ is not None and str(champ.version) == version:
            gate = GateDecision(True, f"the {registry.champion_alias!r} alias was on this version before it "
                                "was registered again", version)
            champ_before = version
        elif champ is None:
            gate = champion_gate(primary_metrics(inputs.manifest), None, registry.tolerance)
            champ_before = "none"
        else:
            ch_metrics = _champion_metrics(champ)
            if ch_metrics is None:
                gate = GateDecision(False, f"champion v{champ.version} carries no readable val_metrics tag to "
                                    "compare with; move the champion alias by hand", str(champ.version))
            else:
                gate = champion_gate(primary_metrics(inputs.manifest), ch_metrics, registry.tolerance,
                                     str(champ.version))
            champ_before = str(champ.version)
        decision = "promoted" if gate.promote else "rejected"
        reason = gate.reason
        before = None if champ_before == "none" else champ_before
        # the decision first: a step cut off after moving the champion finds it on retry
        for k, v in {"champion_decision": decision, "champion_decision_reason": reason[:TAG_VALUE_MAX],
                     "champion_before": champ_before, "champion_tolerance": str(registry.tolerance)}.items():
            _call(target, f"tagging v{version}", client.set_model_version_tag, name, version, k, v)
        for alias in aliases:
            _call(target, f"setting alias {alias!r}", client.set_registered_model_alias, name, alias, version)
        if gate.promote:
            _call(target, f"setting alias {registry.champion_alias!r}", client.set_registered_model_alias,
                  name, registry.champion_alias, version)
        _describe_version(client, target, name, version, inputs, decision, reason, tags)
        _call(target, f"tagging v{version}", client.set_model_version_tag, name, version, STATUS_TAG, "complete")
    if not (getattr(mv, "description", None) or "").strip() and tags.get(STATUS_TAG) == "complete":
        # registered and decided by an earlier release that wrote no description
        _describe_version(client, target, name, version, inputs, decision, reason, tags)
    mv = _call(target, "reading the version", client.get_model_version, name, version)
    return {
        "model_name": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "aliases": sorted(mv.aliases),
        "decision": decision,
        "reason": reason,
        "champion_before": None if before in (None, "none") else before,
        "champion_alias": registry.champion_alias,
        "candidate_alias": registry.candidate_alias,
        "source": mv.source,
        "lineage": {k: v for k, v in mv.tags.items() if not k.startswith("champion_") and k != STATUS_TAG},
    }


def _describe_version(client: Any, target: TrackingTarget, name: str, version: str, inputs: RegistrationInputs,
                      decision: str, reason: str, tags: dict[str, str]) -> None:
    text = version_description(version, inputs, decision, reason, tags.get("pipeline_run_id"), tags)
    _call(target, f"describing v{version}", client.update_model_version, name, version, description=text)


def _champion_metrics(champ: Any) -> dict[str, dict[str, Any]] | None:
    """The champion's primary metrics from its ``val_metrics`` tag; None when it is absent or
    unreadable (then nothing is compared and the champion stays)."""
    from .metrics import PRIMARY_METRIC

    raw = champ.tags.get("val_metrics")
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    higher = {name: hb for name, hb in PRIMARY_METRIC.values()}
    out = {}
    for task, m in parsed.items():
        if not isinstance(m, dict) or len(m) != 1:
            return None
        (metric, value), = m.items()
        out[task] = {"metric": metric, "value": value if _finite_number(value) else None,
                     "higher_is_better": higher.get(metric, True)}
    return out


# ----------------------------------------------------------------------------- loading


def frame_to_tensors(df: Any, data_cfg: Any, pre: Any) -> tuple[Any, Any, Any]:
    """Raw feature rows (pandas or polars) -> ``(x_num, x_cat, cluster)`` as the trainer saw them.

    The same transforms as :func:`ple_adatt.data.dataset.load_split`: numeric features
    normalised with the train statistics (nulls -> 0), categories mapped through the train
    vocabulary (unknown -> 0), clusters outside [0, C) -> C (the global head).
    """
    import numpy as np
    import polars as pl
    import torch

    from .data.dataset import feature_exprs

    frame = df if isinstance(df, pl.DataFrame) else pl.from_pandas(df)
    n = frame.height
    exprs = feature_exprs(data_cfg, pre)
    cc = data_cfg.cluster_column
    if cc and cc in frame.columns:
        cl = pl.col(cc).cast(pl.Int64)
        exprs.append(pl.when(cl.is_null() | (cl < 0) | (cl >= data_cfg.num_clusters))
                     .then(data_cfg.num_clusters).otherwise(cl).alias("cluster"))
    missing = [c for c in (*data_cfg.numeric_features, *data_cfg.categorical_features) if c not in frame.columns]
    if missing:
        raise ArtifactError(f"input rows lack feature columns {missing}; the model needs {len(exprs)} features "
                            "as declared in its data config")
    out = frame.select(exprs)

    def block(prefix: str, names: tuple[str, ...], dtype: Any) -> Any:
        if not names:
            return torch.from_numpy(np.zeros((n, 0), dtype=dtype))
        arr = out.select([f"{prefix}::{c}" for c in names]).to_numpy().astype(dtype, copy=False)
        return torch.from_numpy(np.ascontiguousarray(arr))

    cluster = (torch.from_numpy(out["cluster"].to_numpy().astype(np.int64)) if "cluster" in out.columns
               else torch.full((n,), data_cfg.num_clusters if cc else 0, dtype=torch.int64))
    return block("n", data_cfg.numeric_features, np.float32), block("c", data_cfg.categorical_features,
                                                                   np.int64), cluster


@dataclass
class RegisteredModel:
    """A registered model version loaded through the project's checkpoint loader."""

    checkpoint: Any  # ple_adatt.checkpoint.LoadedCheckpoint
    path: Path  # the downloaded bundle: checkpoint/, validation/, report/
    name: str | None = None
    version: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def model(self) -> Any:
        return self.checkpoint.system.model

    @property
    def task_names(self) -> list[str]:
        return list(self.checkpoint.manifest["tasks"])

    def predict(self, x_num: Any, x_cat: Any, cluster: Any | None = None) -> dict[str, Any]:
        """Per-task predictions, as ``PLEClusterModel.predict`` of the trained model."""
        import torch

        self.model.eval()
        with torch.no_grad():
            return self.model.predict(x_num, x_cat, cluster)

    def predict_frame(self, df: Any, params: dict[str, Any] | None = None) -> Any:
        """Raw feature rows (pandas) -> a pandas DataFrame, one column per task."""
        import pandas as pd

        x_num, x_cat, cluster = frame_to_tensors(df, self.checkpoint.data_cfg, self.checkpoint.preprocessor)
        preds = self.predict(x_num, x_cat, cluster)
        cols = {}
        for name, p in preds.items():
            arr = p.double().cpu().numpy()
            cols[name] = arr if arr.ndim == 1 else list(arr)
        return pd.DataFrame(cols, index=getattr(df, "index", None))


class _PyfuncModel:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(pandas.DataFrame) -> DataFrame``."""

    def __init__(self, model: RegisteredModel):
        self.registered = model

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        return self.registered.predict_frame(model_input, params)


def _load_bundle(bundle: str | Path, device: str = "cpu") -> RegisteredModel:
    from .checkpoint import load_checkpoint

    b = Path(bundle)
    if not (b / "checkpoint").is_dir() and (b / BUNDLE).is_dir():
        b = b / BUNDLE
    return RegisteredModel(load_checkpoint(b / "checkpoint", device=device), b)


def _load_pyfunc(data_path: str) -> _PyfuncModel:
    """Entry point of the ``loader_module`` pyfunc flavor (``mlflow.pyfunc.load_model``)."""
    return _PyfuncModel(_load_bundle(data_path))


def load_registered_model(model_uri: str, *, tracking_uri: str | None = None, device: str = "cpu",
                          dst_path: str | Path | None = None) -> RegisteredModel:
    """Load ``models:/<name>@<alias>`` (or ``models:/<name>/<version>``) with the project's loader.

    The tracking URI is ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the local
    sqlite store ``./mlflow.db`` of the working directory; ``ple-adatt register`` prints the
    URI it registered into (also ``tracking_uri`` in its ``registration.json``). A local store
    (``sqlite:///`` or a file store) that does not exist is refused, never created empty.
    The files are downloaded to ``dst_path``; by default to a temporary directory
    that lives as long as the returned model (``model.path``) and is removed with it, or at exit.
    """
    import mlflow

    from .tracking import connect, resolve_target

    target = resolve_target(TrainConfig().tracking)
    if tracking_uri is not None:
        target = TrackingTarget(tracking_uri, target.experiment, "argument", target.retries,
                                target.retry_wait_s, None)
    check_uri(target)  # a URI MLflow has no store for: one clear line
    _check_local_store(target, model_uri)  # MLflow would create an empty store and find nothing
    if target.is_server:
        connect(target)  # bounded retry, clear error
    dst = Path(dst_path) if dst_path is not None else Path(tempfile.mkdtemp(prefix="ple-adatt-model-"))
    try:
        with _fluent_uri(target.uri):  # models:/ URIs resolve through the fluent registry URI
            local = Path(_call(target, f"downloading {model_uri}", mlflow.artifacts.download_artifacts,
                               artifact_uri=model_uri, dst_path=str(dst)))
        conf = _read_mlmodel(local)
        data = conf.get("flavors", {}).get("python_function", {}).get("data")
        if not data:
            raise ArtifactError(f"{model_uri}: not a ple-adatt model (its MLmodel has no python_function data)")
        model = _load_bundle(local / data, device=device)
        name, version, tags = _version_of(make_client(target), model_uri)
    except BaseException:
        if dst_path is None:
            shutil.rmtree(dst, ignore_errors=True)
        raise
    model.name, model.version, model.tags = name, version, tags
    if dst_path is None:  # the download goes with the model object (model.path points into it)
        weakref.finalize(model, shutil.rmtree, str(dst), True)
    return model


def _check_local_store(target: TrackingTarget, model_uri: str) -> None:
    """Refuse a local store that does not exist: MLflow would create an empty one (``mlflow.db``
    in the working directory) and then report the model as not found."""
    path = local_store_path(target.uri)
    if path is None or path.exists():
        return
    shown = path if path.is_absolute() else f"{path} (resolved: {path.absolute()})"
    raise RegistryError(
        f"{model_uri}: the MLflow store {shown} does not exist (tracking URI {target.uri!r} from {target.origin}); "
        "nothing was loaded and no store was created. Point at the store the model was registered into: "
        "load_registered_model(..., tracking_uri='sqlite:////<abs path>/mlflow.db') or $MLFLOW_TRACKING_URI "
        "(`ple-adatt register` prints it; registration.json has it as tracking_uri)"
    )


def _read_mlmodel(local: Path) -> dict[str, Any]:
    import yaml

    p = local / "MLmodel"
    if not p.exists():
        raise ArtifactError(f"{local}: no MLmodel file; this is not an MLflow model")
    return yaml.safe_load(p.read_text())


def _version_of(client: Any, model_uri: str) -> tuple[str | None, str | None, dict[str, str]]:
    rest = model_uri.removeprefix("models:/")
    with contextlib.suppress(Exception):
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = rest.rsplit("/", 1)
            mv = client.get_model_version(name, version)
        return mv.name, str(mv.version), dict(mv.tags)
    return None, None, {}


def registration_inputs_sha(inputs: RegistrationInputs) -> dict[str, str]:
    """The input hashes of the registration manifest."""
    out = {"checkpoint": inputs.checkpoint_sha256,
           "validation": path_sha256(inputs.validation / "availability.json")}
    if inputs.report is not None:
        out["report"] = path_sha256(inputs.report)
    return out
