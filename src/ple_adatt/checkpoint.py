"""The checkpoint artifact: ``checkpoint.pt`` + ``manifest.json`` + ``preprocessing.json``.

``checkpoint.pt`` is a plain ``state_dict`` of the :class:`MultiTaskSystem` (loadable with
``torch.load(..., weights_only=True)``): model weights, the CGC frozen flag, regression
target statistics, the loss weighting, and the task-transfer buffers (for adaTT:
``affinity_matrix``, ``update_count``, ``current_epoch``, ``is_frozen``, ``group_prior``,
``transfer_weights``; MoCoGrad: ``momentum``; GradNorm: ``loss_weights``; uncertainty
weighting: ``criterion.log_vars``). The manifest holds what is needed to rebuild and judge the model:
tasks, both configs, phase, epochs, per-task validation metrics and the affinity history.
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
            "history": history,
            "affinity_history": affinity_history,
            "events": events,
            "negative_transfer": transfer.detect_negative_transfer()
            if transfer is not None and hasattr(transfer, "detect_negative_transfer") else {},
            "transfer_matrix": transfer.get_transfer_matrix().cpu().tolist()
            if transfer is not None and hasattr(transfer, "get_transfer_matrix") else None,
            "files": {STATE_FILE: path_sha256(out_dir / STATE_FILE)},
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


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the system from a checkpoint directory; refuse incomplete or unknown ones."""
    d = Path(path)
    man = read_manifest(d, KIND, (CHECKPOINT_SCHEMA_VERSION,))
    state_path = d / STATE_FILE
    if not state_path.exists():
        raise ArtifactError(f"{d}: {STATE_FILE} is missing; the checkpoint is incomplete")
    expected = man.get("files", {}).get(STATE_FILE)
    if expected and path_sha256(state_path) != expected:
        raise ArtifactError(f"{state_path}: content hash does not match its manifest; the file was changed or truncated")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ArtifactError(f"{state_path}: cannot load the state_dict ({e})") from e
    missing = [k for k in required_state_keys(man.get("strategy", "adatt")) if k not in state]
    if missing:
        raise ArtifactError(f"{state_path}: checkpoint lacks required buffers {missing}; refusing it")
    data_cfg = data_config_from_dict(man["data_config"], f"{d}/manifest.json")
    train_cfg = train_config_from_dict(man["train_config"], f"{d}/manifest.json")
    pre = Preprocessor.load(d / PREPROCESSING_FILE)
    tasks = [data_cfg.task(n) for n in man["tasks"]]
    m = man["model"]
    system = build_system(train_cfg, tasks, m["num_numeric"], m["cardinalities"], m["num_clusters"])
    try:
        system.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{state_path}: state_dict does not fit the model its manifest describes: "
                            f"{str(e).splitlines()[0]}") from e
    if bool(system.model._cgc_frozen):  # requires_grad is not part of a state_dict
        system.model.set_cgc_frozen(True)
    system.to(device)
    return LoadedCheckpoint(system, man, data_cfg, train_cfg, pre, d)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
