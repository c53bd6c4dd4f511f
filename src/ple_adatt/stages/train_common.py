"""What the training stages share: inputs, the two phases as functions, checkpoint writing.

``run_phase1`` and ``run_phase2`` take paths and configs and write a checkpoint directory
atomically; the CLIs (train-phase1, train-phase2, train) and the KFP components are thin
wrappers around them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..artifacts import (
    atomic_output_dir,
    check_output_dir,
    first_difference,
    path_sha256,
    read_validation,
)
from ..config import (
    DataConfig,
    TrainConfig,
    apply_overrides,
    config_hash,
    config_source,
    load_data_config,
    load_train_config,
    to_dict,
    train_config_from_dict,
)
from .common import StageError

Log = Callable[[str], None]


def enabled_tasks_from_validation(
    validation_dir: str | Path,
    data_cfg: DataConfig,
    data_hash: str | None,
    *,
    data_config: str | Path | None = None,
) -> list[str]:
    """The tasks the validate stage enabled, checked against this dataset and data config.

    Refuses a validation result computed for other data (its manifest's ``inputs.data``)
    or under another data contract (its ``config_hash``, the hash of the data config with
    the validate stage's overrides): its enabled tasks and label checks would not hold.
    """
    d = Path(validation_dir)
    this = str(data_config) if data_config is not None else "the data config in use"
    _, avail = read_validation(d, data_hash=data_hash, data_config=to_dict(data_cfg),
                               data_config_hash=config_hash(data_cfg),
                               this=this, fix=f"rerun `ple-adatt validate --config {this}` on this data",
                               error=StageError)
    avail_path = d / "availability.json"
    enabled = avail.get("enabled_tasks")
    if not isinstance(enabled, list):
        raise StageError(f"{avail_path}: key `enabled_tasks` is missing or not a list")
    unknown = [t for t in enabled if t not in data_cfg.task_names]
    if unknown:
        raise StageError(f"{avail_path}: enabled tasks {unknown} are not declared in the data config")
    if not enabled:
        raise StageError(f"{avail_path}: no task is enabled for training; see validation.html for why")
    return [t for t in data_cfg.task_names if t in enabled]


def _seed(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _history(trainer: Any) -> list[dict[str, Any]]:
    return [r.as_dict() for r in trainer.history]


def run_phase1(
    *,
    data: str | Path,
    data_config: str | Path,
    config: str | Path,
    out: str | Path,
    validation: str | Path | None = None,
    overrides: list[str] | None = None,
    stage: str = "train-phase1",
    log: Log = print,
    on_epoch: Callable[[Any], None] | None = None,
    only_tasks: list[str] | None = None,
    final: str | Path | None = None,
) -> dict[str, Any]:
    """Phase 1: fit preprocessing, train everything with the transfer strategy, checkpoint.

    ``only_tasks`` restricts training to these tasks (single-task baselines of ``compare``).
    ``final`` is where the checkpoint ends up when ``out`` is a caller's temporary directory
    (``ple-adatt train``): the path the log names.
    """
    from ..checkpoint import save_checkpoint
    from ..data.dataset import prepare_splits
    from ..training import Trainer, build_system, resolve_training_device, set_regression_targets

    t0 = time.perf_counter()
    check_output_dir(out, kind="checkpoint", phase="phase1", inputs=(data, validation, config, data_config))  # before any training: a bad --out must not cost the run
    data_cfg = load_data_config(data_config)
    train_cfg = load_train_config(config, overrides, data=data_cfg)
    data_hash = path_sha256(data)
    if validation is not None:
        tasks = enabled_tasks_from_validation(validation, data_cfg, data_hash, data_config=data_config)
        skipped = [t for t in data_cfg.task_names if t not in tasks]
        if skipped:
            log(f"tasks disabled by validation: {', '.join(skipped)}")
    else:
        tasks = data_cfg.task_names
        if not only_tasks:
            log("no --validation given: training every declared task")
    if only_tasks:
        unknown = [t for t in only_tasks if t not in tasks]
        if unknown:
            raise StageError(f"tasks {unknown} are not declared in {data_config} or not enabled by validation; "
                             f"trainable tasks: {', '.join(tasks)}")
        tasks = [t for t in tasks if t in only_tasks]
    device = resolve_training_device(train_cfg)  # before the data: a config the device cannot run fails first
    _seed(train_cfg.seed)
    log(f"loading {data} ({len(tasks)} tasks)")
    pre, train, val = prepare_splits(data, data_cfg, tasks, max_rows=train_cfg.max_rows, config_src=data_config)
    specs = [data_cfg.task(n) for n in tasks]
    system = build_system(train_cfg, specs, train.x_num.shape[1], pre.cardinalities(data_cfg), data_cfg.num_clusters)
    set_regression_targets(system.model, train.y)
    trainer = Trainer(system, train, val, train_cfg, device, log=log, on_epoch=on_epoch)
    trainer.run_phase1()
    metrics = trainer.final_metrics(use_cluster_heads=False)
    inputs = {"data": data_hash, "data_config": config_hash(data_cfg)}
    if validation is not None:
        inputs["validation"] = path_sha256(Path(validation) / "availability.json")
    with atomic_output_dir(out) as tmp:
        manifest = save_checkpoint(
            tmp, system, stage=stage, phase="phase1", data_cfg=data_cfg, train_cfg=train_cfg, preprocessor=pre,
            num_numeric=train.x_num.shape[1], history=_history(trainer), events=trainer.events, metrics=metrics,
            inputs=inputs,
        )
    log(f"phase 1 checkpoint written to {final or out} ({time.perf_counter() - t0:.1f}s)")
    return manifest


def _phase2_config(ckpt_cfg: TrainConfig, config: str | Path | None, overrides: list[str] | None,
                   data_cfg: DataConfig, ckpt_path: Path) -> TrainConfig:
    """The checkpoint's config plus overrides; the sections that shaped the model (``model``,
    ``tasks``, ``transfer``) must stay as Phase 1 had them, whether from --config or --set."""
    if config is None:
        src = f"{ckpt_path}/manifest.json + --set"
        given = train_config_from_dict(apply_overrides(to_dict(ckpt_cfg), overrides), src)
    else:
        src = config_source(config, overrides)
        given = load_train_config(config, overrides, data=data_cfg)
    diffs = [k for k in ("model", "tasks", "transfer") if to_dict(getattr(given, k)) != to_dict(getattr(ckpt_cfg, k))]
    if diffs:
        keys = [first_difference(to_dict(getattr(given, k)), to_dict(getattr(ckpt_cfg, k)), k) or k for k in diffs]
        raise StageError(
            f"{src}: {', '.join('`' + k + '`' for k in keys[:3])} differ{'s' if len(keys) == 1 else ''} from the "
            f"config the checkpoint {ckpt_path} was trained with; Phase 2 must use the Phase 1 model. Change only "
            "`training.*` keys (drop --config to use the checkpoint's own config)"
        )
    return given


def run_phase2(
    *,
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    config: str | Path | None = None,
    data_config: str | Path | None = None,
    overrides: list[str] | None = None,
    stage: str = "train-phase2",
    log: Log = print,
    on_epoch: Callable[[Any], None] | None = None,
    final: str | Path | None = None,
) -> dict[str, Any]:
    """Phase 2: from a Phase 1 checkpoint, fine-tune the cluster heads, checkpoint again.

    ``final``: as in :func:`run_phase1`, the path the log names when ``out`` is temporary.
    """
    from ..checkpoint import load_checkpoint, save_checkpoint
    from ..data.dataset import load_split
    from ..training import Trainer, resolve_device

    t0 = time.perf_counter()
    check_output_dir(out, kind="checkpoint", phase="phase2", inputs=(checkpoint, data, config, data_config))  # before any training: a bad --out must not cost the run
    ck = load_checkpoint(checkpoint)
    if ck.manifest.get("phase") != "phase1":
        raise StageError(f"{checkpoint}: is a {ck.manifest.get('phase')} checkpoint; Phase 2 starts from a phase1 checkpoint")
    data_cfg = ck.data_cfg
    if data_config is not None:
        given = load_data_config(data_config)
        mismatch = [n for n in ck.manifest["tasks"] if n not in given.task_names
                    or to_dict(given.task(n)) != to_dict(data_cfg.task(n))]
        if mismatch:
            raise StageError(
                f"{data_config}: tasks {mismatch} are missing or declared differently than in the checkpoint "
                f"{checkpoint}; use the data config Phase 1 was trained with"
            )
    train_cfg = _phase2_config(ck.train_cfg, config, overrides, data_cfg, Path(checkpoint))
    device = resolve_device(train_cfg.device)  # not the kernel's check: Phase 2 sets the transfer aside
    tasks = list(ck.manifest["tasks"])
    data_hash = path_sha256(data)
    same_data = ck.manifest.get("inputs", {}).get("data") == data_hash
    if not same_data and ck.manifest.get("inputs", {}).get("data") is not None:
        log("warning: this dataset differs from the one Phase 1 was trained on")
    _seed(train_cfg.seed + 1)
    # Phase 1 checked these very bytes (same hash) before it trained: no second pass over them
    train = load_split(data, data_cfg, ck.preprocessor, "train", tasks, train_cfg.max_rows, config_src=data_config,
                       check=not same_data)
    val = load_split(data, data_cfg, ck.preprocessor, "val", tasks,
                     None if train_cfg.max_rows is None else max(train_cfg.max_rows // 4, 1), config_src=data_config,
                     check=not same_data)
    trainer = Trainer(ck.system, train, val, train_cfg, device, log=log, on_epoch=on_epoch)
    trainer.events = list(ck.manifest.get("events", []))
    trainer.run_phase2()
    metrics = trainer.final_metrics(use_cluster_heads=True)
    history = list(ck.manifest.get("history", [])) + _history(trainer)
    inputs = {"data": data_hash, "checkpoint": ck.manifest["files"]["checkpoint.pt"]}
    with atomic_output_dir(out) as tmp:
        manifest = save_checkpoint(
            tmp, ck.system, stage=stage, phase="phase2", data_cfg=data_cfg, train_cfg=train_cfg,
            preprocessor=ck.preprocessor, num_numeric=ck.manifest["model"]["num_numeric"], history=history,
            events=trainer.events, metrics=metrics, previous=ck.manifest, inputs=inputs,
        )
    log(f"phase 2 checkpoint written to {final or out} ({time.perf_counter() - t0:.1f}s)")
    return manifest


def summarize(manifest: dict[str, Any]) -> str:
    """A short per-task summary of a checkpoint's validation metrics."""
    from ..metrics import PRIMARY_METRIC

    lines = [f"{manifest['phase']} validation metrics:"]
    kinds = {s["name"]: s["type"] for s in manifest["task_specs"]}
    for name, m in manifest["metrics"]["tasks"].items():
        key, _ = PRIMARY_METRIC[kinds[name]]
        v = m.get(key)
        lines.append(f"  {name:<20} {key:<10} {v:.4f}" if isinstance(v, float) else f"  {name:<20} {key:<10} -")
    neg = manifest.get("negative_transfer") or {}
    pairs = sorted({tuple(sorted((a, b))) for a, bs in neg.items() for b in bs})
    lines.append("negative-transfer pairs: " + (", ".join(f"{a}<->{b}" for a, b in pairs) if pairs else "none"))
    return "\n".join(lines)
