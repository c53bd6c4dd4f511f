"""MLflow tracking: one MLflow run per pipeline run, one nested run per stage.

Every stage wraps its work in :func:`ple_adatt.stages.common.stage_tracking`, which calls
:func:`stage_run` here. The layout in MLflow:

* experiment ``tracking.experiment`` (default ``ple-adatt``);
* a **parent run** per pipeline run, found (or created) by its tag ``pipeline_run_id``;
  RUNNING while stages run, FAILED as soon as a stage fails, KILLED when one is interrupted
  (Ctrl-C, SIGTERM), and FINISHED only when the run's last stage finishes. As a step of a KFP
  pipeline (on a cluster every step is its own container; kfp's executor marks it with
  ``_KFP_RUNTIME=true``) a stage cannot see whether more steps follow, so only the pipeline's
  last stage (:data:`PIPELINE_FINAL_STAGES`: ``register``, or ``compare`` in the comparison
  pipeline) finishes the parent: a pipeline that stopped between steps is not shown as
  complete. A one-process command (``ple-adatt train``, ``ple-adatt compare``, a
  ``make stage`` rerun) finishes its parent with each stage it completes;
* a **nested run** per stage (tags: ``stage``, ``pipeline_run_id``, ``kfp_run_id``,
  ``component_version`` = ``ple_adatt.__version__``, ``git_commit``) holding the flattened
  configs as params, per-epoch metrics (``task_losses/<task>``, ``raw_losses/<task>``,
  ``val/<task>/<metric>``, ``val_loss``, ``lr``, ``transfer_share``, ``adatt_phase``),
  events as metrics (``adatt_freeze_epoch``, ``cgc_frozen_epoch``, ``phase2_start``; the
  value is the epoch), the affinity and transfer matrices per epoch as JSON artifacts
  (``matrices/<phase>_epoch_<NNN>.json``) and the stage's outputs as artifacts. Epochs in
  MLflow (metric steps, event values, matrix names) count from 1 within a phase, as the
  console prints them; the checkpoint manifests they come from count from 0.

Where runs go: ``$MLFLOW_TRACKING_URI``, else ``tracking.tracking_uri`` of the train config,
else the embedded default, a sqlite store in the working directory (``sqlite:///mlflow.db``,
artifacts under ``./mlartifacts``; ``make mlflow-ui`` opens it). Any sqlite store keeps the
artifacts of the experiments it creates in ``mlartifacts/`` beside its database file. A tracking server that does
not answer is retried ``tracking.retries`` times, ``tracking.retry_wait_s`` apart, then the
stage fails with :class:`TrackingError`. There is never a silent fallback to a local store;
``tracking.require_server: true`` (production) also refuses to start without a server URI.

A launcher that sets ``$MLFLOW_TRACKING_URI`` for the stages (``make run``, ``make stage``)
can say where the URI really came from in ``$PLE_ADATT_TRACKING_URI_ORIGIN`` (see
:func:`origin_env`), so that an error names the setting the user has to change, not the
variable the launcher set.

``mlflow`` is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import unmarked_runs
from .config import TrackingConfig, TrainConfig
from .errors import StageError

__all__ = [
    "restored_environ",
    "local_store_path",
    "TrackingError",
    "TrackingTarget",
    "StageTracker",
    "DEFAULT_TRACKING_URI",
    "DEFAULT_ARTIFACT_DIR",
    "resolve_target",
    "connect",
    "check_uri",
    "make_client",
    "filter_literal",
    "stage_run",
    "flatten_params",
    "metric_name",
    "parent_run",
    "epoch_metrics",
    "PIPELINE_FINAL_STAGES",
    "origin_env",
    "end_parent_run",
]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"
#: adaTT phase as a metric (MLflow metrics are numbers); the name is also a tag per epoch file
ADATT_PHASE_CODE = {"off": -1, "warmup": 0, "dynamic": 1, "frozen": 2}
#: the events the seed lists, logged as metrics whose value is the epoch they happened in (from 1)
EVENT_METRICS = ("adatt_freeze_epoch", "cgc_frozen_epoch", "phase2_start")
PARAM_VALUE_MAX = 6000  # MLflow's limit on a param value
TAG_VALUE_MAX = 5000  # model version tags are the tightest limit
#: the stages whose success finishes a KFP pipeline's parent run (training pipeline, comparison pipeline)
PIPELINE_FINAL_STAGES = frozenset({"register", "compare"})
#: set by a launcher: ``{"uri": ..., "origin": ..., "fix": ...}`` (JSON) for the URI it put in $MLFLOW_TRACKING_URI
ORIGIN_ENV = "PLE_ADATT_TRACKING_URI_ORIGIN"


class NullTracker:
    """The tracker interface; records nothing (used with ``--no-tracking``)."""

    def log_params(self, params: dict[str, Any]) -> None:  # flattened config
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_epoch(self, record: Any) -> None:  # a training.EpochRecord
        pass

    def log_event(self, name: str, value: float, step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: Any, name: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass


class TrackingError(StageError):
    """The tracking server cannot be reached or refuses a request; the message says what to do."""


# --------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class TrackingTarget:
    """Where runs and models go, and how hard to try."""

    uri: str
    experiment: str
    source: str  # "MLFLOW_TRACKING_URI" | "config" | "default"
    retries: int
    retry_wait_s: float
    artifact_location: str | None  # new experiments of a sqlite store: mlartifacts/ beside the db
    origin_note: str = ""  # a launcher's words for where the URI came from ($PLE_ADATT_TRACKING_URI_ORIGIN)
    fix_note: str = ""  # ... and for what to change

    @property
    def is_server(self) -> bool:
        return self.uri.startswith(("http://", "https://"))

    @property
    def origin(self) -> str:
        """Where the URI came from, in the words of the setting to fix."""
        return self.origin_note or _ORIGINS.get(self.source, self.source)

    @property
    def fix(self) -> str:
        """What to change for another URI."""
        if self.fix_note:
            return self.fix_note
        return {"MLFLOW_TRACKING_URI": "fix MLFLOW_TRACKING_URI", "config": "fix tracking.tracking_uri",
                "default": "set MLFLOW_TRACKING_URI"}.get(self.source, "pass another tracking URI")


@contextlib.contextmanager
def restored_environ(*names: str) -> Iterator[None]:
    """Put the environment variables ``names`` back as they were (set or unset) when the block
    ends: for code that runs a stage in this process and sets the stage's variables."""
    saved = {k: os.environ.get(k) for k in names}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def origin_env(uri: str, origin: str, fix: str) -> dict[str, str]:
    """The environment a launcher adds next to ``MLFLOW_TRACKING_URI=uri`` so that the stages'
    errors say ``(from <origin>)`` and ``<fix>`` instead of naming $MLFLOW_TRACKING_URI."""
    return {"MLFLOW_TRACKING_URI": uri, ORIGIN_ENV: json.dumps({"uri": uri, "origin": origin, "fix": fix})}


def launcher_origin(uri: str) -> tuple[str, str]:
    """(origin, fix) a launcher recorded for ``uri`` in $PLE_ADATT_TRACKING_URI_ORIGIN, or empty strings."""
    try:
        note = json.loads(os.environ.get(ORIGIN_ENV) or "{}")
    except json.JSONDecodeError:
        return "", ""
    if not isinstance(note, dict) or str(note.get("uri", "")).strip() != uri:
        return "", ""  # about another URI: $MLFLOW_TRACKING_URI was changed after the launcher set it
    return str(note.get("origin") or ""), str(note.get("fix") or "")


_ORIGINS = {
    "MLFLOW_TRACKING_URI": "$MLFLOW_TRACKING_URI",
    "config": "tracking.tracking_uri in the train config",
    "default": "the default local store",
    "argument": "the tracking_uri argument",
}
#: URI schemes MLflow has a tracking store for ("" and one letter: a local path)
_STORE_SCHEMES = frozenset({"", "file", "http", "https", "sqlite", "postgresql", "mysql", "mssql",
                            "databricks", "databricks-uc", "uc"})


def resolve_target(cfg: TrackingConfig | None = None) -> TrackingTarget:
    """``$MLFLOW_TRACKING_URI`` > ``tracking.tracking_uri`` > the local sqlite store."""
    cfg = cfg or TrackingConfig()
    env_uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env_uri:
        uri, source = env_uri, "MLFLOW_TRACKING_URI"
    elif cfg.tracking_uri:
        uri, source = cfg.tracking_uri, "config"
    else:  # absolute: MLflow caches stores by URI, a relative one would stick to the first cwd
        uri, source = f"sqlite:///{Path(DEFAULT_TRACKING_URI.removeprefix('sqlite:///')).resolve()}", "default"
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip() or cfg.experiment
    origin_note, fix_note = launcher_origin(uri) if source == "MLFLOW_TRACKING_URI" else ("", "")
    target = TrackingTarget(
        uri=uri, experiment=experiment, source=source, retries=max(int(cfg.retries), 0),
        retry_wait_s=max(float(cfg.retry_wait_s), 0.0),
        artifact_location=_local_artifact_location(uri), origin_note=origin_note, fix_note=fix_note,
    )
    if cfg.require_server and not target.is_server:
        how = (f"{fix_note} (a server: http://<host>:<port>)" if fix_note else
               "set MLFLOW_TRACKING_URI=http://<host>:<port> (or tracking.tracking_uri in the train config)")
        raise TrackingError(
            f"tracking.require_server is true but the tracking URI is {uri!r} (from {target.origin}), not a "
            f"tracking server; {how}, or set tracking.require_server=false to use a local store"
        )
    return target


def _local_artifact_location(uri: str) -> str | None:
    """A sqlite store keeps its artifacts beside the database file, in ``mlartifacts/``
    (``sqlite:///mlflow.db`` -> ``./mlartifacts``), not in MLflow's ``./mlruns`` of the cwd."""
    db = local_store_path(uri) if uri.startswith("sqlite:") else None
    return None if db is None else (db.resolve().parent / DEFAULT_ARTIFACT_DIR).as_uri()


def local_store_path(uri: str) -> Path | None:
    """The file or directory of a local store URI (``sqlite:///x.db``, ``file:///x``, a path);
    None for a server, a database server or an in-memory sqlite store."""
    from urllib.parse import unquote, urlparse

    if uri.startswith("sqlite:"):  # sqlite:///rel.db, sqlite:////abs.db; sqlite:// is in memory
        db = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
        if not db or db == ":memory:" or "mode=memory" in uri or db.startswith("file:"):
            return None
        return Path(db)
    if uri.startswith("file:"):
        return Path(unquote(urlparse(uri).path))
    if uri in ("databricks", "databricks-uc", "uc"):  # profiles, not paths
        return None
    if re.match(r"^[A-Za-z][\w+.-]*:", uri) and not re.match(r"^[A-Za-z]:[\\/]", uri):
        return None  # http(s), postgresql, databricks, ...
    return Path(uri)


def _bound_mlflow_http_retries(target: TrackingTarget) -> None:
    """MLflow's own HTTP retry backs off for minutes by default; keep it within our budget."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max(target.retries, 0)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.5")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def _probe(target: TrackingTarget) -> None:
    """Wait (bounded) until a tracking server answers ``/health``; raise TrackingError if not."""
    import urllib.error
    import urllib.request

    url = target.uri.rstrip("/") + "/health"
    last = ""
    for attempt in range(target.retries + 1):
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - http(s) only
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        if attempt < target.retries:
            time.sleep(target.retry_wait_s)
    raise TrackingError(
        f"MLflow tracking server {target.uri} (from {target.origin}) did not answer after "
        f"{target.retries + 1} attempts {target.retry_wait_s:g}s apart ({last}); start it or "
        f"{target.fix}{_SKIP if not target.fix_note else ''}"
    )


def _wrap(target: TrackingTarget, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call an MLflow client function; turn its failures into one clear TrackingError."""
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args, **kwargs)
    except MlflowException as e:  # also a server that stopped answering mid-stage (MLflow's retries ran out)
        msg = (str(e.message if hasattr(e, "message") else e).splitlines() or [type(e).__name__])[0][:300]
        raise TrackingError(f"MLflow at {target.uri} (from {target.origin}): {what} failed: {msg}") from e
    except OSError as e:  # requests' ConnectionError is an OSError
        raise TrackingError(
            f"MLflow at {target.uri} (from {target.origin}): {what} failed: "
            f"{(str(e).splitlines() or [type(e).__name__])[0][:300]}; is the tracking server up?"
        ) from e


_SKIP = ", or rerun with --no-tracking to skip tracking for a local stage"


def _bad_uri(target: TrackingTarget, why: str) -> TrackingError:
    fix = target.fix
    # a stage can do without tracking; loading a registered model (a URI argument) cannot
    skip = "" if target.source == "argument" or target.fix_note else _SKIP
    return TrackingError(
        f"MLflow tracking URI {target.uri!r} (from {target.origin}) cannot be used: {why}; {fix} "
        f"(a server: http://<host>:<port>, a local store: sqlite:///<path>/mlflow.db){skip}"
    )


def check_uri(target: TrackingTarget) -> None:
    """Refuse a tracking URI MLflow has no store for (``localhost:5000``), or a sqlite store in a
    directory that does not exist (MLflow would create it, and an empty store), with one clear line."""
    if re.match(r"^[\w.-]+:\d+(/.*)?$", target.uri):
        raise _bad_uri(target, f"it is a host and port without a scheme (did you mean http://{target.uri}?)")
    scheme = target.uri.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][\w+.-]*:", target.uri) else ""
    if len(scheme) > 1 and scheme.split("+", 1)[0] not in _STORE_SCHEMES:
        raise _bad_uri(target, f"{scheme!r} is not a scheme MLflow can track to")
    db = local_store_path(target.uri) if scheme == "sqlite" else None
    if db is not None and not db.parent.is_dir():
        # MLflow would create the directories and a new, empty store there: a typo must not
        # send the runs (and the registered models) to a store nobody looks at
        where = db.parent if db.parent.is_absolute() else f"{db.parent} (resolved: {db.parent.absolute()})"
        raise _bad_uri(target, f"the directory {where} of its database does not exist, and a new empty store "
                       "is not created there (a mistyped path?)")


def make_client(target: TrackingTarget) -> Any:
    """An MlflowClient on ``target``; a URI MLflow cannot open is a TrackingError naming it."""
    from mlflow.tracking import MlflowClient

    check_uri(target)
    try:  # the client opens its stores here: a bad path, a missing driver, MLflow's refusals
        return MlflowClient(tracking_uri=target.uri, registry_uri=target.uri)
    except Exception as e:
        msg = str(getattr(e, "message", None) or e).strip()
        if "MLFLOW_ALLOW_FILE_STORE" in msg:
            msg = ("MLflow 3 refuses its deprecated file store unless MLFLOW_ALLOW_FILE_STORE=true; "
                   "a sqlite:/// store is the local alternative")
        why = " ".join(msg.split())[:300] or type(e).__name__
        raise _bad_uri(target, why) from e


def connect(target: TrackingTarget) -> tuple[Any, str]:
    """An MlflowClient on ``target`` (server probed with bounded retry) and the experiment id."""
    check_uri(target)
    _bound_mlflow_http_retries(target)
    if target.is_server:
        _probe(target)
    client = make_client(target)
    unmarked_runs.mark_recorded(client, target.uri)  # runs an earlier stage's outage left RUNNING
    exp = _wrap(target, f"reading experiment {target.experiment!r}", client.get_experiment_by_name,
                target.experiment)
    if exp is None:
        try:
            return client, _wrap(target, f"creating experiment {target.experiment!r}", client.create_experiment,
                                 target.experiment, artifact_location=target.artifact_location)
        except TrackingError:  # created concurrently by another stage
            exp = client.get_experiment_by_name(target.experiment)
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise TrackingError(
            f"MLflow at {target.uri}: experiment {target.experiment!r} is deleted; restore it in the UI "
            "or set tracking.experiment (or $MLFLOW_EXPERIMENT_NAME) to another name"
        )
    return client, exp.experiment_id


# ------------------------------------------------------------------------------ params


def _scalar(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= PARAM_VALUE_MAX else s[: PARAM_VALUE_MAX - 3] + "..."


def flatten_params(obj: Any, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists of named dicts are keyed by name.

    Lists of scalars become one JSON value (``model.logit_transfer_edges``); values longer
    than MLflow's limit are cut with ``...``.
    """
    from .config import to_dict

    obj = to_dict(obj)
    out: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list) and node and all(isinstance(x, dict) and "name" in x for x in node):
            for x in node:
                walk({k: v for k, v in x.items() if k != "name"}, f"{key}.{x['name']}")
        else:
            out[metric_name(key)] = _scalar(node)

    walk(obj, prefix)
    return out


_BAD_CHARS = re.compile(r"[^/\w.\- :]")


def metric_name(name: str) -> str:
    """A name MLflow accepts (``recall@10`` -> ``recall_at_10``)."""
    return _BAD_CHARS.sub("_", str(name).replace("@", "_at_"))


def _finite(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(float(v)):
        return float(v)
    return None


def epoch_metrics(record: Any) -> dict[str, float]:
    """The per-epoch metrics of a ``training.EpochRecord`` (or its ``as_dict()``)."""
    r = record if isinstance(record, dict) else record.as_dict()
    m: dict[str, float | None] = {
        "lr": _finite(r.get("lr")),
        "transfer_share": _finite(r.get("transfer_share")),
        "adatt_phase": float(ADATT_PHASE_CODE.get(r.get("transfer_phase", "off"), -1)),
        "cgc_frozen": _finite(bool(r.get("cgc_frozen"))),
        "transfer_frozen": _finite(bool(r.get("transfer_frozen"))),
        "skipped_batches": _finite(r.get("skipped_batches", 0)),
        "epoch_seconds": _finite(r.get("seconds")),
        "global_step": _finite(r.get("step")),
    }
    for t, v in (r.get("task_losses") or {}).items():
        m[f"task_losses/{t}"] = _finite(v)
    for t, v in (r.get("raw_losses") or {}).items():
        m[f"raw_losses/{t}"] = _finite(v)
    val = r.get("val") or {}
    m["val_loss"] = _finite(val.get("val_loss"))
    for t, tm in (val.get("tasks") or {}).items():
        for k, v in (tm or {}).items():
            if k != "by_cluster":
                m[f"val/{t}/{k}"] = _finite(v)
    return {metric_name(k): v for k, v in m.items() if v is not None}


def _final_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float | None] = {"final/val_loss": _finite(metrics.get("val_loss"))}
    for t, tm in (metrics.get("tasks") or {}).items():
        for k, v in (tm or {}).items():
            if k != "by_cluster":
                out[f"final/{t}/{k}"] = _finite(v)
    return {metric_name(k): v for k, v in out.items() if v is not None}


def negative_transfer_pairs(neg: dict[str, list[str]] | None) -> list[tuple[str, str]]:
    """``{a: [b], b: [a]}`` -> ``[(a, b)]`` (unordered pairs, sorted)."""
    return sorted({tuple(sorted((a, b))) for a, bs in (neg or {}).items() for b in bs})  # type: ignore[misc]


# ----------------------------------------------------------------------------- tracker


class StageTracker(NullTracker):
    """Logs one stage into its nested MLflow run (the interface of ``NullTracker``)."""

    def __init__(self, client: Any, target: TrackingTarget, run_id: str, parent_run_id: str, stage: str):
        self.client = client
        self.target = target
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.stage = stage
        self._params: dict[str, str] = {}
        self._events: set[tuple[str, str, int]] = set()
        self._cgc_frozen: bool | None = None
        self._phases_seen: set[str] = set()

    # -- the NullTracker interface
    def log_params(self, params: dict[str, Any]) -> None:
        """Log params once; a key already logged with another value is kept as it was."""
        from mlflow.entities import Param

        flat = {k: _scalar(v) for k, v in params.items()}
        new = {k: v for k, v in flat.items() if k not in self._params}
        if not new:
            return
        items = list(new.items())
        for i in range(0, len(items), 100):
            batch = [Param(k, v) for k, v in items[i:i + 100]]
            self._call("logging params", self.client.log_batch, self.run_id, params=batch)
        self._params.update(new)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [(metric_name(k), _finite(v)) for k, v in metrics.items()]
        batch = [Metric(k, v, ts, step or 0) for k, v in items if v is not None]
        for i in range(0, len(batch), 1000):
            self._call("logging metrics", self.client.log_batch, self.run_id, metrics=batch[i:i + 1000])

    def log_epoch(self, record: Any) -> None:
        r = record if isinstance(record, dict) else record.as_dict()
        phase, epoch = str(r.get("phase", "")), int(r.get("epoch", 0))  # 0-based, as in the manifest
        if phase == "phase2" and phase not in self._phases_seen:
            self._event_once("phase2_start", phase, 0)
        self._phases_seen.add(phase)
        self.log_metrics(epoch_metrics(r), step=epoch + 1)  # MLflow shows epochs as the console does: from 1
        for ev in r.get("events") or []:
            self._event_once(str(ev), phase, epoch)
        frozen = bool(r.get("cgc_frozen"))
        if frozen and self._cgc_frozen is False:  # flipped during this epoch
            self._event_once("cgc_frozen_epoch", phase, epoch)
        self._cgc_frozen = frozen
        tasks = list((r.get("task_losses") or {}).keys())
        if r.get("affinity") or r.get("transfer_matrix") is not None:
            self.log_dict(
                {"phase": phase, "epoch": epoch + 1, "manifest_epoch": epoch, "step": r.get("step"),
                 "transfer_phase": r.get("transfer_phase"), "tasks": tasks, "affinity": r.get("affinity"),
                 "transfer_matrix": r.get("transfer_matrix")},
                f"matrices/{phase}_epoch_{epoch + 1:03d}.json",
            )

    def log_event(self, name: str, value: float, step: int | None = None) -> None:
        self.log_metrics({name: value}, step=step if step is not None else int(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if not p.exists():
            raise TrackingError(f"cannot log {p} to MLflow: it does not exist")
        if p.is_dir():
            self._call(f"uploading {p}", self.client.log_artifacts, self.run_id, str(p), artifact_path)
            self._from_manifest(p)
        else:
            self._call(f"uploading {p}", self.client.log_artifact, self.run_id, str(p), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        self._call(f"writing {name}", self.client.log_dict, self.run_id, obj, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)[:TAG_VALUE_MAX]) for k, v in tags.items() if v is not None]
        if batch:
            self._call("setting tags", self.client.log_batch, self.run_id, tags=batch)

    # -- helpers
    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return _wrap(self.target, what, fn, *args, **kwargs)

    def _event_once(self, name: str, phase: str, epoch: int) -> None:
        """Log event ``name`` of 0-based ``epoch`` (the manifests' numbering) once, as the
        1-based epoch the console printed (``event: adatt_freeze_epoch (phase1, epoch 5)``)."""
        key = (name, phase, epoch)
        if key in self._events:
            return
        self._events.add(key)
        self.log_metrics({name: float(epoch + 1)}, step=epoch + 1)

    def _from_manifest(self, d: Path) -> None:
        """A logged artifact directory with a manifest: lineage tags, final metrics, events."""
        man_path = d / "manifest.json"
        if not man_path.exists():
            return
        try:
            man = json.loads(man_path.read_text())
        except json.JSONDecodeError:
            return
        kind = man.get("kind")
        inputs = man.get("inputs") or {}
        tags = {f"input.{k}": str(v).removeprefix("sha256:") for k, v in inputs.items()}
        if kind == "validation":
            # one meaning per tag name: ``input.data_config`` is the normalised data config hash
            # on every run (the train runs' manifests record that one); the validation manifest's
            # input is the hash of the YAML file's bytes, kept as ``input.data_config_file``
            if "data_config" in inputs:
                tags["input.data_config_file"] = tags.pop("input.data_config")
            tags["input.data_config"] = str(man.get("config_hash") or "")
            tags["data_config_hash"] = str(man.get("config_hash") or "")
            if (d / "availability.json").is_file():  # what the training and registry manifests record
                from .artifacts import path_sha256

                tags["validation.sha256"] = path_sha256(d / "availability.json")
        if kind == "checkpoint":
            phase = str(man.get("phase", ""))
            for ev in man.get("events") or []:
                if ev.get("phase") == phase and ev.get("event") in EVENT_METRICS:
                    self._event_once(ev["event"], phase, int(ev.get("epoch", 0)))
            self.log_metrics(_final_metrics(man.get("metrics") or {}))
            pairs = negative_transfer_pairs(man.get("negative_transfer"))
            tags.update({
                "checkpoint.phase": phase,
                "checkpoint.sha256": (man.get("files") or {}).get("checkpoint.pt", ""),
                "config_hash": man.get("config_hash") or "",
                "data_config_hash": man.get("data_config_hash") or "",
                "tasks": ",".join(man.get("tasks") or []),
                "strategy": str(man.get("strategy") or ""),
                "negative_transfer_pairs": ",".join(f"{a}<->{b}" for a, b in pairs) or "none",
            })
            # a Phase 2 manifest's input is the Phase 1 checkpoint; its data config is the same one
            tags.setdefault("input.data_config", str(man.get("data_config_hash") or ""))
            cfgs = {}
            if man.get("train_config"):
                cfgs.update(flatten_params(man["train_config"]))
            if man.get("data_config"):
                cfgs.update(flatten_params(man["data_config"], "data"))
            self.log_params(cfgs)
        self.set_tags({k: v for k, v in tags.items() if v})


# ------------------------------------------------------------------------- parent run


def filter_literal(value: str, what: str) -> str:
    """``value`` as a string literal of an MLflow search filter.

    MLflow's filter grammar has no escape inside a literal: a value with a single quote is
    written in double quotes; one holding both quote characters cannot be searched for.
    """
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise TrackingError(f"{what} {value!r}: holds both a single and a double quote, which MLflow's search "
                        "filters cannot express; drop one of them")


def _local_pipeline_run_id() -> str:
    return f"local-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def parent_run(client: Any, target: TrackingTarget, experiment_id: str, pipeline_run_id: str,
               kfp_run_id: str | None) -> str:
    """The run id of the pipeline run's parent run (created on first use)."""
    filt = (f"tags.pipeline_run_id = {filter_literal(pipeline_run_id, '--pipeline-run-id')} "
            "and tags.ple_adatt_role = 'pipeline'")

    def find() -> list[Any]:
        return _wrap(target, "searching the pipeline run", client.search_runs, [experiment_id], filt,
                     max_results=10, order_by=["attributes.start_time ASC"])

    runs = find()
    if runs:
        return runs[0].info.run_id
    tags = {"pipeline_run_id": pipeline_run_id, "ple_adatt_role": "pipeline",
            "component_version": _package_version()}
    if kfp_run_id:
        tags["kfp_run_id"] = kfp_run_id
    run = _wrap(target, "creating the pipeline run", client.create_run, experiment_id,
                run_name=f"pipeline {pipeline_run_id}", tags=tags)
    runs = find()  # two stages racing: the earliest parent wins, the other one is removed
    winner = runs[0].info.run_id if runs else run.info.run_id
    if winner != run.info.run_id:
        with contextlib.suppress(Exception):
            client.delete_run(run.info.run_id)
    return winner


def _package_version() -> str:
    from . import __version__

    return __version__


def _config_from_args(stage: str, args: argparse.Namespace | None) -> tuple[TrainConfig | None, Any]:
    """Best effort: the train and data configs this stage runs with, from its CLI args.

    Errors are left to the stage itself (it fails with the clear message); here they mean
    "no params yet" and the default tracking settings.
    """
    from .config import (
        ConfigError,
        apply_overrides,
        load_data_config,
        load_train_config,
        train_config_from_dict,
    )

    if args is None:
        return None, None
    overrides = list(getattr(args, "overrides", None) or [])
    train_cfg = data_cfg = None
    try:
        if stage == "validate":
            data_cfg = load_data_config(args.config, overrides) if getattr(args, "config", None) else None
            return None, data_cfg
        if getattr(args, "config", None):
            train_cfg = load_train_config(args.config, overrides)
        elif getattr(args, "checkpoint", None):
            man = json.loads((Path(args.checkpoint) / "manifest.json").read_text())
            raw = apply_overrides(man["train_config"], overrides)
            train_cfg = train_config_from_dict(raw, f"{args.checkpoint}/manifest.json")
        if getattr(args, "data_config", None):
            data_cfg = load_data_config(args.data_config)
    except ConfigError:
        raise  # an argument error (a typo, a data config as --config): no MLflow run for it
    except (OSError, KeyError, ValueError):
        pass
    return train_cfg, data_cfg


#: the stages' input options (argparse dest -> option): local paths that must exist
_INPUT_OPTIONS = {"data": "--data", "config": "--config", "data_config": "--data-config", "checkpoint": "--checkpoint",
                  "validation": "--validation", "report": "--report", "phase1": "--phase1", "phase2": "--phase2",
                  "singles": "--singles"}


def _check_inputs_exist(args: argparse.Namespace | None) -> None:
    """A missing input is an argument error: say so before MLflow is touched (no failed run, and
    no empty store created in the working directory for it)."""
    for dest, option in _INPUT_OPTIONS.items():
        value = getattr(args, dest, None) if args is not None else None
        if isinstance(value, (str, Path)) and value and "://" not in str(value) and not Path(value).exists():
            raise StageError(f"{option} {value}: not found")


# --------------------------------------------------------------------------- stage run


@contextlib.contextmanager
def stage_run(stage: str, args: argparse.Namespace | None = None, **context: Any) -> Iterator[Any]:
    """Yield the tracker of one stage: a nested run under the pipeline run's parent run.

    ``args`` is the stage's argparse namespace (``pipeline_run_id``, ``no_tracking``, its
    ``config`` / ``checkpoint`` / ``overrides``). ``context`` may give ``train_config`` (a
    TrainConfig; its ``tracking`` section is used), ``data_config``, ``params`` and ``tags``.
    Without a pipeline run id a ``local-...`` id is made and stored on ``args``, so stages
    run by one command (``ple-adatt train``) share a parent run.
    """
    if args is not None and getattr(args, "no_tracking", False):
        yield NullTracker()
        return
    _check_inputs_exist(args)
    train_cfg, data_cfg = _config_from_args(stage, args)
    train_cfg = context.get("train_config") or train_cfg
    data_cfg = context.get("data_config") or data_cfg
    target = resolve_target(train_cfg.tracking if train_cfg is not None else None)
    client, exp_id = connect(target)

    pipeline_run_id = getattr(args, "pipeline_run_id", None) if args is not None else None
    kfp_run_id = context.get("kfp_run_id") or os.environ.get("KFP_RUN_ID") or (
        pipeline_run_id if pipeline_run_id else None)
    if not pipeline_run_id:
        pipeline_run_id = _local_pipeline_run_id()
        if args is not None:
            args.pipeline_run_id = pipeline_run_id
    parent_id = parent_run(client, target, exp_id, pipeline_run_id, kfp_run_id)

    from .artifacts import git_commit

    tags = {
        "mlflow.parentRunId": parent_id,
        "ple_adatt_role": "stage",
        "stage": stage,
        "pipeline_run_id": pipeline_run_id,
        "component_version": _package_version(),
        "git_commit": git_commit() or "unknown",
        **({"kfp_run_id": kfp_run_id} if kfp_run_id else {}),
        **({"strategy": train_cfg.transfer.strategy} if train_cfg is not None and stage.startswith("train") else {}),
        **{k: str(v) for k, v in (context.get("tags") or {}).items()},
    }
    run = _wrap(target, f"creating the {stage} run", client.create_run, exp_id, run_name=stage, tags=tags)
    run_id = run.info.run_id
    _wrap(target, "marking the pipeline run running", client.update_run, parent_id, status="RUNNING")
    # the parent shows which component versions ran
    _wrap(target, "tagging the pipeline run", client.set_tag, parent_id, f"component_version.{stage}",
          _package_version())
    tracker = StageTracker(client, target, run_id, parent_id, stage)
    params: dict[str, Any] = {}
    if train_cfg is not None:
        params.update(flatten_params(train_cfg))
    if data_cfg is not None:
        params.update(flatten_params(data_cfg, "data"))
    if args is not None:  # the CLI args as ``args.<name>``: they never collide with config keys
        params.update({f"args.{k}": v for k, v in vars(args).items() if v is not None and v != []})
    params.update(context.get("params") or {})
    tracker.log_params({metric_name(k): v for k, v in params.items()})
    print(f"MLflow: stage {stage} -> run {run_id} (pipeline run {pipeline_run_id}) at {target.uri}")
    try:
        yield tracker
    except BaseException as e:
        # Ctrl-C, or SIGTERM (a stopped pod, `timeout`; the CLI raises it as ple_adatt.cli.Terminated)
        status = "KILLED" if isinstance(e, KeyboardInterrupt) or type(e).__name__ == "Terminated" else "FAILED"
        try:
            client.set_tag(run_id, "error", f"{type(e).__name__}: {e}"[:TAG_VALUE_MAX])
            client.set_terminated(run_id, status)
            client.set_tag(parent_id, "failed_stage" if status == "FAILED" else "interrupted_stage", stage)
            client.set_terminated(parent_id, status)
        except Exception as mark_error:  # noqa: BLE001 - the stage's own error is the one raised
            ids = [run_id, parent_id]
            kept = unmarked_runs.record(target.uri, ids, status, _first_line(mark_error))
            print(unmarked_runs_line(target.uri, ids, status, mark_error, kept), file=sys.stderr)
        raise
    _wrap(target, f"finishing the {stage} run", client.set_terminated, run_id, "FINISHED")
    if ends_parent(stage):
        _wrap(target, "finishing the pipeline run", client.set_terminated, parent_id, "FINISHED")


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines()[0] if str(e) else type(e).__name__)[:200]


def unmarked_runs_line(uri: str, run_ids: list[str], status: str, why: BaseException,
                       recorded: Path | None = None) -> str:
    """One line for runs that a failed stage could not mark ``status`` (the server stopped
    answering): which runs stay RUNNING, where they are recorded for the next stage that reaches
    ``uri`` to mark (:mod:`ple_adatt.unmarked_runs`), and the call that marks them by hand."""
    calls = "; ".join(f"c.set_terminated({r!r}, {status!r})" for r in run_ids)
    later = (f"recorded in {recorded}: the next stage that reaches {uri} marks them. "
             if recorded is not None else "")
    return (f"MLflow: could not mark runs {', '.join(run_ids)} {status} at {uri} ({_first_line(why)}); they stay "
            f"RUNNING for now; {later}By hand, once the server answers: python -c \"from mlflow import MlflowClient; "
            f"c = MlflowClient({uri!r}); {calls}\"")


def ends_parent(stage: str) -> bool:
    """Whether ``stage`` finishing also finishes its parent run.

    A step of a KFP pipeline (kfp's executor sets ``_KFP_RUNTIME=true``; on a cluster each step
    is a container of its own) cannot see whether more steps follow: only the pipeline's last
    stage finishes the parent, every other one leaves it RUNNING. A stage of a one-process command
    (``ple-adatt train``, ``compare``, a ``make stage`` rerun) finishes it: a later stage of the
    same command sets it RUNNING again, and a failure or Ctrl-C is caught above and marks it.
    """
    if os.environ.get("_KFP_RUNTIME", "").lower() == "true":
        return stage in PIPELINE_FINAL_STAGES
    return True


def end_parent_run(uri: str, stage_run_id: str, status: str, why: str = "") -> str | None:
    """Mark the parent run of ``stage_run_id`` ``status`` (``KILLED``, ``FAILED``) if it is still
    RUNNING: for a launcher whose pipeline stopped between steps, where no stage could. Returns
    the parent's run id when it was marked, else None; best effort (never raises)."""
    try:
        target = TrackingTarget(uri, "", "argument", 0, 0.0, None)
        _bound_mlflow_http_retries(target)
        client = make_client(target)
        parent_id = client.get_run(stage_run_id).data.tags.get("mlflow.parentRunId")
        if not parent_id or client.get_run(parent_id).info.status != "RUNNING":
            return None
        if why:
            client.set_tag(parent_id, "ended_by", why[:TAG_VALUE_MAX])
        client.set_terminated(parent_id, status)
        return parent_id
    except Exception:
        return None
