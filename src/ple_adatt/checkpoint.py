"""The checkpoint artifact: ``checkpoint.pt`` + ``manifest.json`` + ``preprocessing.json``.

``checkpoint.pt`` is a plain ``state_dict`` of the :class:`MultiTaskSystem` (loadable with
``torch.load(..., weights_only=True)``): model weights, the CGC frozen flag, regression
target statistics, the loss weighting, and the task-transfer buffers (for adaTT:
``affinity_matrix``, ``update_count``, ``current_epoch``, ``is_frozen``, ``group_prior``,
``transfer_weights``; MoCoGrad: ``momentum``; GradNorm: ``loss_weights``; uncertainty
weighting: ``criterion.log_vars``). The manifest holds what is needed to rebuild and judge the model:
tasks, both configs, phase, epochs, per-task validation metrics and the affinity history.

The manifest's ``files`` holds the content hash of ``checkpoint.pt`` and of
``preprocessing.json``; :func:`load_checkpoint` refuses a file whose bytes do not match. A
checkpoint written before ``preprocessing.json`` was hashed has no such entry: it still loads,
and its vocabularies and numeric statistics are checked against the manifest's model shape
(categorical features, cardinalities, numeric features), which is what an edited or swapped
file would break. Every malformed manifest or preprocessing file is an :class:`ArtifactError`
naming the file and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .artifacts import ArtifactError, make_manifest, path_sha256, read_manifest, write_json
from .config import (
    DataConfig,
    TrainConfig,
    config_hash,
    data_config_from_dict,
    to_dict,
    train_config_from_dict,
)
from .data.dataset import Preprocessor
from .training import MultiTaskSystem, build_system

__all__ = ["CHECKPOINT_SCHEMA_VERSION", "save_checkpoint", "load_checkpoint", "LoadedCheckpoint",
           "required_state_keys"]

CHECKPOINT_SCHEMA_VERSION = 1
KIND = "checkpoint"
STATE_FILE = "checkpoint.pt"
PREPROCESSING_FILE = "preprocessing.json"

#: state keys every checkpoint must carry, by transfer strategy
_TRANSFER_KEYS = {
    "adatt": [
        "transfer.affinity_computer.affinity_matrix",
        "transfer.affinity_computer.update_count",
        "transfer.current_epoch",
        "transfer.is_frozen",
        "transfer.group_prior",
        "transfer.transfer_weights",
    ],
    "pcgrad": ["transfer.affinity_computer.affinity_matrix"],
    "mocograd": ["transfer.affinity_computer.affinity_matrix", "transfer.momentum", "transfer.momentum_count"],
    "gradnorm": ["transfer.affinity_computer.affinity_matrix", "transfer.loss_weights", "transfer.initial_losses"],
    "mgda": ["transfer.affinity_computer.affinity_matrix", "transfer.last_weights"],
    "uncertainty": ["transfer.affinity_computer.affinity_matrix", "criterion.log_vars"],
    "equal": ["transfer.affinity_computer.affinity_matrix"],
}
_MODEL_KEYS = ["model._cgc_frozen", "model.target_loc", "model.target_scale"]


def required_state_keys(strategy: str) -> list[str]:
    return _MODEL_KEYS + _TRANSFER_KEYS.get(strategy, ["transfer.affinity_computer.affinity_matrix"])


def train_config_hash(cfg: TrainConfig) -> str:
    return config_hash(cfg)


def save_checkpoint(
    out_dir: Path,
    system: MultiTaskSystem,
    *,
    stage: str,
    phase: str,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    preprocessor: Preprocessor,
    num_numeric: int,
    history: list[dict[str, Any]],
    events: list[dict[str, Any]],
    metrics: dict[str, Any],
    previous: dict[str, Any] | None = None,
    inputs: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write the checkpoint files into ``out_dir`` (a temporary directory of the stage)."""
    out_dir = Path(out_dir)
    state = {k: v.detach().cpu() for k, v in system.state_dict().items()}
    torch.save(state, out_dir / STATE_FILE)
    preprocessor.save(out_dir / PREPROCESSING_FILE)
    transfer = system.transfer
    model = system.model
    affinity_history = [
        {"phase": h["phase"], "epoch": h["epoch"], "step": h["step"], "transfer_phase": h["transfer_phase"],
         "matrix": h["affinity"]}
        for h in history if h.get("affinity")
    ]
    manifest = make_manifest(
        KIND, stage, schema_version=CHECKPOINT_SCHEMA_VERSION, config_hash=config_hash(train_cfg),
        inputs=inputs,
        extra={
            "phase": phase,
            "strategy": train_cfg.transfer.strategy,
            "tasks": model.task_names,
            "task_specs": [to_dict(data_cfg.task(n)) for n in model.task_names],
            "data_config": to_dict(data_cfg),
            "train_config": to_dict(train_cfg),
            "data_config_hash": config_hash(data_cfg),
            "model": {
                "num_numeric": num_numeric,
                "cardinalities": preprocessor.cardinalities(data_cfg),
                "num_clusters": data_cfg.num_clusters,
                "parameters": sum(p.numel() for p in system.parameters()),
            },
            "epochs": _epochs(history),
            "metrics": metrics,
            "metrics_by_phase": {**((previous or {}).get("metrics_by_phase", {})), phase: metrics},
            # the checkpoint this one continues (Phase 2 from Phase 1): who made it, for lineage
            **({"previous": {"producer": previous.get("producer"),
                             "checkpoint_sha256": (previous.get("files") or {}).get(STATE_FILE)}}
               if previous else {}),
            "history": history,
            "affinity_history": affinity_history,
            "events": events,
            "negative_transfer": transfer.detect_negative_transfer()
            if transfer is not None and hasattr(transfer, "detect_negative_transfer") else {},
            "transfer_matrix": transfer.get_transfer_matrix().cpu().tolist()
            if transfer is not None and hasattr(transfer, "get_transfer_matrix") else None,
            "files": {STATE_FILE: path_sha256(out_dir / STATE_FILE),
                      PREPROCESSING_FILE: path_sha256(out_dir / PREPROCESSING_FILE)},
        },
    )
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def _epochs(history: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for h in history:
        out[h["phase"]] = max(out.get(h["phase"], 0), h["epoch"] + 1)
    return out


@dataclass
class LoadedCheckpoint:
    system: MultiTaskSystem
    manifest: dict[str, Any]
    data_cfg: DataConfig
    train_cfg: TrainConfig
    preprocessor: Preprocessor
    path: Path


def _check_hash(path: Path, expected: Any) -> None:
    if expected and path_sha256(path) != expected:
        raise ArtifactError(f"{path}: content hash does not match its manifest; the file was changed or truncated")


def _manifest_fields(man: dict[str, Any], where: str) -> dict[str, Any]:
    """The keys of a checkpoint manifest that rebuilding the model needs, type-checked."""

    def need(key: str, ok: Any, what: str) -> Any:
        if key not in man:
            raise ArtifactError(f"{where}: key `{key}` is missing; the manifest is incomplete or was edited "
                                "(rerun the stage that wrote this checkpoint)")
        if not ok(man[key]):
            raise ArtifactError(f"{where}: key `{key}` must be {what}, got {type(man[key]).__name__}")
        return man[key]

    tasks = need("tasks", lambda v: isinstance(v, list) and v and all(isinstance(t, str) for t in v),
                 "a non-empty list of task names")
    need("data_config", lambda v: isinstance(v, dict), "a mapping (the data config)")
    need("train_config", lambda v: isinstance(v, dict), "a mapping (the train config)")
    model = need("model", lambda v: isinstance(v, dict), "a mapping")
    files = need("files", lambda v: isinstance(v, dict), "a mapping of file name to sha256")
    if not isinstance(files.get(STATE_FILE), str):  # later stages record it as their input
        raise ArtifactError(f"{where}: key `files.{STATE_FILE}` (the sha256 of the state_dict) is missing")
    for key, ok, what in (
        ("num_numeric", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
        ("cardinalities", lambda v: isinstance(v, list) and all(isinstance(c, int) and c >= 1 for c in v),
         "a list of integers >= 1"),
        ("num_clusters", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    ):
        if key not in model:
            raise ArtifactError(f"{where}: key `model.{key}` is missing; the manifest is incomplete or was edited")
        if not ok(model[key]):
            raise ArtifactError(f"{where}: key `model.{key}` must be {what}, got {model[key]!r}")
    return {"tasks": tasks, "model": model, "files": files}


def _load_preprocessing(path: Path, data_cfg: DataConfig, model: dict[str, Any]) -> Preprocessor:
    """Read ``preprocessing.json`` and check that it fits the model the manifest describes."""
    from .data.dataset import DataError

    if not path.exists():
        raise ArtifactError(f"{path}: {PREPROCESSING_FILE} is missing; the checkpoint is incomplete")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e}); the file was changed or truncated") from e
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    for key, kind in (("vocabularies", dict), ("numeric", dict), ("train_rows", int), ("data_config", str)):
        if key not in raw:
            raise ArtifactError(f"{path}: key `{key}` is missing; the file is incomplete or was edited")
        if not isinstance(raw[key], kind):
            raise ArtifactError(f"{path}: key `{key}` must be a {kind.__name__}, got {type(raw[key]).__name__}")
    for col, vocab in raw["vocabularies"].items():
        if not isinstance(vocab, list):
            raise ArtifactError(f"{path}: key `vocabularies.{col}` must be a list of values")
        values = [v for v in vocab if isinstance(v, (str, int, float, bool, type(None)))]
        if len(set(values)) != len(values):
            dup = next(v for i, v in enumerate(values) if v in values[:i])
            raise ArtifactError(f"{path}: key `vocabularies.{col}` lists {dup!r} twice; a vocabulary maps each value "
                                "to one id (the file was edited)")
    for col, stats in raw["numeric"].items():
        if not (isinstance(stats, dict) and all(isinstance(stats.get(k), (int, float)) for k in ("mean", "std"))):
            raise ArtifactError(f"{path}: key `numeric.{col}` must be {{mean: number, std: number}}, got {stats!r}")
    try:
        pre = Preprocessor.from_dict(raw, path)  # parsed once, above
    except DataError as e:  # schema version; already names the file
        raise ArtifactError(str(e)) from e
    absent = [c for c in data_cfg.categorical_features if c not in pre.vocabularies]
    if absent:
        raise ArtifactError(f"{path}: key `vocabularies` lacks the categorical features {absent} of the "
                            "checkpoint's data config")
    absent = [c for c in data_cfg.numeric_features if c not in pre.numeric_mean]
    if absent:
        raise ArtifactError(f"{path}: key `numeric` lacks the numeric features {absent} of the checkpoint's data config")
    cards = pre.cardinalities(data_cfg)
    expected = list(model["cardinalities"])
    if cards != expected:
        bad = [f"{c}: {n - 1} values, the model embeds {m - 1}"
               for c, n, m in zip(data_cfg.categorical_features, cards, expected, strict=False) if n != m]
        raise ArtifactError(f"{path}: key `vocabularies` does not fit the model in the manifest "
                            f"({'; '.join(bad) or f'{len(cards)} features, the model has {len(expected)}'}); "
                            "the file was changed or belongs to another checkpoint")
    return pre


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the system from a checkpoint directory; refuse incomplete, edited or unknown ones.

    Raises :class:`ArtifactError` (or ``ConfigError`` for a config in the manifest that no longer
    validates) naming the file and key; never a bare KeyError / JSONDecodeError.
    """
    d = Path(path)
    man = read_manifest(d, KIND, (CHECKPOINT_SCHEMA_VERSION,))
    where = f"{d / 'manifest.json'}"
    fields = _manifest_fields(man, where)
    state_path = d / STATE_FILE
    if not state_path.exists():
        raise ArtifactError(f"{d}: {STATE_FILE} is missing; the checkpoint is incomplete")
    _check_hash(state_path, fields["files"].get(STATE_FILE))
    pre_path = d / PREPROCESSING_FILE
    if pre_path.exists():  # hashed since preprocessing.json joined `files`; older checkpoints: checked below
        _check_hash(pre_path, fields["files"].get(PREPROCESSING_FILE))
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ArtifactError(f"{state_path}: cannot load the state_dict ({e})") from e
    strategy = man.get("strategy", "adatt")
    missing = [k for k in required_state_keys(strategy if isinstance(strategy, str) else "adatt") if k not in state]
    if missing:
        raise ArtifactError(f"{state_path}: checkpoint lacks required buffers {missing}; refusing it")
    data_cfg = data_config_from_dict(man["data_config"], where)
    train_cfg = train_config_from_dict(man["train_config"], where)
    unknown = [n for n in fields["tasks"] if n not in data_cfg.task_names]
    if unknown:
        raise ArtifactError(f"{where}: key `tasks` names {unknown}, which its `data_config` does not declare "
                            f"(tasks: {', '.join(data_cfg.task_names)})")
    m = fields["model"]
    if len(m["cardinalities"]) != len(data_cfg.categorical_features):
        raise ArtifactError(f"{where}: key `model.cardinalities` has {len(m['cardinalities'])} entries, but "
                            f"`data_config` declares {len(data_cfg.categorical_features)} categorical features")
    pre = _load_preprocessing(pre_path, data_cfg, m)
    tasks = [data_cfg.task(n) for n in fields["tasks"]]
    system = build_system(train_cfg, tasks, m["num_numeric"], m["cardinalities"], m["num_clusters"])
    try:
        system.load_state_dict(state, strict=True)
    except RuntimeError as e:
        details = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]  # the first names the tensor
        raise ArtifactError(f"{state_path}: state_dict does not fit the model its manifest describes "
                            f"({details[0] if details else str(e).splitlines()[0]}); the manifest's `tasks`, "
                            "`model` or configs were edited, or the files come from different runs") from e
    if bool(system.model._cgc_frozen):  # requires_grad is not part of a state_dict
        system.model.set_cgc_frozen(True)
    system.to(device)
    return LoadedCheckpoint(system, man, data_cfg, train_cfg, pre, d)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
