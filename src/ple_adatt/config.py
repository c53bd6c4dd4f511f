"""Typed configuration: YAML files under configs/ loaded once into frozen dataclasses.

Two files describe a run:

* a **data config** (``configs/data/*.yaml``): feature columns, one entry per task target,
  the cluster column and the split rule -- the dataset contract;
* a **train config** (``configs/train/*.yaml``): model shape, per-task losses, the task
  transfer strategy (adaTT and its task groups) and the optimisation schedule.

Every default lives in the dataclasses below; YAML files only say what differs. Errors are
:class:`ConfigError` and name the file, the dotted key, what was wrong and what is allowed.
Only the standard library and PyYAML are imported here, so the training core stays
importable on a bare GPU box.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "ConfigError",
    "TaskSpec",
    "SplitConfig",
    "DataConfig",
    "TaskLossConfig",
    "ModelConfig",
    "AdaTTConfig",
    "PCGradConfig",
    "MoCoGradConfig",
    "GradNormConfig",
    "MGDAConfig",
    "STRATEGY_NAMES",
    "TaskGroup",
    "TransferConfig",
    "TrainingConfig",
    "TrackingConfig",
    "RegistryConfig",
    "TrainConfig",
    "load_data_config",
    "load_train_config",
    "apply_overrides",
    "config_hash",
    "to_dict",
]


logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the fix."""


TaskType = Literal["binary", "multiclass", "regression", "retrieval"]
LossName = Literal["bce", "focal", "ce", "mse", "huber", "infonce"]

#: the loss a task gets when the train config does not name one
DEFAULT_LOSS: dict[str, str] = {
    "binary": "bce",
    "multiclass": "ce",
    "regression": "mse",
    "retrieval": "infonce",
}
#: which losses make sense for which task type
ALLOWED_LOSSES: dict[str, tuple[str, ...]] = {
    "binary": ("bce", "focal"),
    "multiclass": ("ce",),
    "regression": ("mse", "huber"),
    "retrieval": ("infonce",),
}


# --------------------------------------------------------------------------- data config


@dataclass(frozen=True)
class TaskSpec:
    """One task target column of the dataset contract."""

    name: str
    column: str
    type: TaskType
    num_classes: int | None = None  # multiclass: labels in [0, num_classes)
    vocab_size: int | None = None  # retrieval: item ids in [0, vocab_size)
    bounds: tuple[float, float] | None = None  # regression: allowed [low, high]
    min_availability: float = 0.0  # share of rows that must carry a target
    on_low_availability: Literal["fail", "disable"] = "fail"

    @property
    def output_dim(self) -> int:
        """Width of the tower output this task needs (logits, value or query embedding)."""
        if self.type == "multiclass":
            assert self.num_classes is not None  # guaranteed by _check_task
            return self.num_classes
        return 1


@dataclass(frozen=True)
class SplitConfig:
    """How rows are assigned to train / val / test.

    ``method: column`` reads the split name from ``column``; ``method: hash`` hashes the
    ``key`` column deterministically and cuts by ``fractions``.
    """

    method: Literal["hash", "column"] = "hash"
    key: str | None = None
    column: str | None = None
    fractions: dict[str, float] = field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1}
    )
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    """The dataset contract: which columns are features, which are task targets."""

    name: str
    numeric_features: tuple[str, ...] = ()
    categorical_features: tuple[str, ...] = ()
    tasks: tuple[TaskSpec, ...] = ()
    cluster_column: str | None = None
    num_clusters: int = 0
    split: SplitConfig = field(default_factory=SplitConfig)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"unknown task {name!r}; tasks are {self.task_names}")


# -------------------------------------------------------------------------- train config


@dataclass(frozen=True)
class TaskLossConfig:
    """Loss and fixed weight of one task (seed section 9.3)."""

    loss: LossName | None = None  # None: the default for the task's type
    weight: float = 1.0
    alpha: float = 0.25  # focal
    gamma: float = 2.0  # focal
    delta: float = 1.0  # huber
    temperature: float = 0.1  # infonce


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the PLE-Cluster model (seed sections 1.3, 8, 11)."""

    embedding_dim: int = 8
    num_shared_experts: int = 4
    shared_expert_names: tuple[str, ...] = ()  # default: expert_0 .. expert_{n-1}
    shared_hidden: int = 64
    expert_dim: int = 32  # output width of every expert (shared and task)
    task_experts_per_task: int = 1
    task_hidden: int = 32
    tower_hidden: int = 32
    tower_dropout: float = 0.0
    retrieval_dim: int = 16  # query / item embedding width of retrieval tasks
    logit_transfer_edges: tuple[tuple[str, str], ...] = (("ctr", "cvr"), ("cvr", "ltv"))
    transfer_strength: float = 0.5
    cgc_entropy_weight: float = 0.01


@dataclass(frozen=True)
class TaskGroup:
    members: tuple[str, ...]
    intra_strength: float = 0.5


@dataclass(frozen=True)
class AdaTTConfig:
    """adaTT parameters (seed section 14.1; defaults are the seed's)."""

    transfer_lambda: float = 0.1
    temperature: float = 1.0
    warmup_epochs: int = 0
    freeze_epoch: int = 1
    negative_transfer_threshold: float = -0.1
    ema_decay: float = 0.9
    prior_blend_start: float = 0.5
    prior_blend_end: float = 0.1
    max_transfer_ratio: float = 0.5
    inter_group_strength: float = 0.3


#: the task-transfer strategies, in the order reports list them. The keys of
#: ``ple_adatt.transfer.STRATEGIES`` (a test keeps the two equal; this module stays torch-free).
STRATEGY_NAMES: tuple[str, ...] = ("adatt", "pcgrad", "mocograd", "gradnorm", "mgda", "uncertainty", "equal")


@dataclass(frozen=True)
class PCGradConfig:
    """PCGrad (Yu et al. 2020): only the seed of the random projection order."""

    seed: int = 0


@dataclass(frozen=True)
class MoCoGradConfig:
    """MoCoGrad: momentum decay ``beta`` of each task's gradient EMA, calibration ``strength``
    and the seed of the random task order."""

    beta: float = 0.9
    strength: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class GradNormConfig:
    """GradNorm (Chen et al. 2018): restoring-force asymmetry ``alpha`` and the weights' step size."""

    alpha: float = 1.5
    lr: float = 0.025


@dataclass(frozen=True)
class MGDAConfig:
    """MGDA (Sener & Koltun 2018): min-norm weights from the gradients on the shared expert
    parameters (``params``) or on the shared experts' outputs (``representation``, MGDA-UB)."""

    on: Literal["params", "representation"] = "params"
    # the min-norm solver: device (one Triton program, no host read, so CUDA graphs can capture
    # MGDA's steps), host (exact, float64, reads the Gram matrix back every step), auto (device on
    # CUDA with triton, host elsewhere)
    solver: Literal["auto", "device", "host"] = "auto"


@dataclass(frozen=True)
class TransferConfig:
    """Which task-transfer strategy runs and how per-task gradients are taken."""

    strategy: str = "adatt"  # one of STRATEGY_NAMES
    grad_interval: int = 10  # steps between per-task gradient extractions (gradient methods: every step)
    grad_method: Literal["batched", "fused", "einsum", "loop"] = "batched"
    # adaTT / equal / uncertainty: read the per-task gradients from the training backward (no
    # second backward through the heads); this step's observation then reaches the transfer
    # weights one step later. false: the seed's order, a separate backward before the loss.
    measure_in_backward: bool = True
    # with measure_in_backward: on CUDA, start that measurement on a second stream as soon as the
    # backward reaches the CGC outputs, beside the rest of the backward and the optimizer step
    # (ple_adatt.side_stream); the same numbers. Elsewhere it runs at that point on the one stream
    measure_stream: bool = False
    adatt: AdaTTConfig = field(default_factory=AdaTTConfig)
    pcgrad: PCGradConfig = field(default_factory=PCGradConfig)
    mocograd: MoCoGradConfig = field(default_factory=MoCoGradConfig)
    gradnorm: GradNormConfig = field(default_factory=GradNormConfig)
    mgda: MGDAConfig = field(default_factory=MGDAConfig)
    task_groups: dict[str, TaskGroup] = field(default_factory=dict)

#: validation runs in batches of at least this many rows (``max(training.batch_size, this)``);
#: InfoNCE's validation loss uses in-batch negatives, so it depends on it (the report checks it)
EVAL_BATCH_MIN = 4096


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation and schedule (seed sections 10, 12, 14.3, 14.4)."""

    batch_size: int = 16384
    learning_rate: float = 0.0005
    weight_decay: float = 0.01
    shared_expert_epochs: int = 15
    cluster_finetune_epochs: int = 8
    freeze_shared_in_phase2: bool = True
    phase2_trainable: tuple[Literal["cluster_heads", "towers", "task_experts"], ...] = (
        "cluster_heads",
    )
    early_stopping_patience: int = 7
    gradient_clip_norm: float = 5.0
    gradient_accumulation_steps: int = 1
    use_amp: bool = True
    compile: bool = False  # torch.compile the model's trunk, heads and the losses
    # torch.compile mode; reduce-overhead also replays each compiled part as a CUDA graph
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # capture each whole training step (forward, backward, optimizer) as a CUDA graph and
    # replay it: no per-kernel launch cost. CUDA only (elsewhere the step runs eagerly);
    # every strategy (mgda with its device solver, transfer.mgda.solver auto or device)
    cuda_graph: bool = False
    # the CGC mixture as fused Triton kernels on CUDA (ple_adatt.mixture): each input read
    # once, each result written once, the experts' second-layer biases added there; and the
    # towers' bias+ReLU as one kernel (ple_adatt.towers); each checked against the PyTorch form
    # on first use
    fused_mixture: bool = True
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    cosine_t0: int = 10
    cosine_t_mult: int = 2
    warmup_steps: int = 5  # epochs of linear LR warmup (seed unit: epochs)
    phase2_warmup_steps: int = 2
    expert_lr: dict[str, dict[str, float]] = field(default_factory=dict)
    loss_weighting: Literal["fixed", "uncertainty"] = "fixed"
    log_every: int = 50  # steps between reads of the loss on the host


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking (issue: every pipeline run visible in MLflow)."""

    experiment: str = "ple-adatt"
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else the local sqlite store
    require_server: bool = False  # production: fail rather than fall back to a local store
    retries: int = 3  # bounded retry when the tracking server does not answer
    retry_wait_s: float = 2.0


@dataclass(frozen=True)
class RegistryConfig:
    """MLflow model registry: the registered model and the champion gate."""

    model_name: str = "ple-adatt"
    candidate_alias: str = "candidate"
    champion_alias: str = "champion"
    # champion moves only if no task's primary metric is worse than the champion's by more
    # than this tolerance (relative), or there is no champion yet
    tolerance: float = 0.01


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides the data contract."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_rows: int | None = None  # cap on training rows (smoke runs)
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: dict[str, TaskLossConfig] = field(default_factory=dict)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)

    @property
    def effective_loss_weighting(self) -> str:
        """The loss weighting that runs: strategy ``uncertainty`` implies uncertainty weighting."""
        if self.transfer.strategy == "uncertainty":
            return "uncertainty"
        return self.training.loss_weighting

    def loss_for(self, task: TaskSpec) -> TaskLossConfig:
        cfg = self.tasks.get(task.name, TaskLossConfig())
        if cfg.loss is None:
            cfg = dataclasses.replace(cfg, loss=DEFAULT_LOSS[task.type])
        return cfg


# ---------------------------------------------------------------- generic dict -> dataclass


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _convert(tp: Any, value: Any, key: str, src: str) -> Any:
    """Convert a YAML value to ``tp``, raising ConfigError naming ``key`` on mismatch."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = f"{src}: key `{key}`"
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key, src)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: {value!r} is not allowed; allowed values: {allowed}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, src)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 3e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]", src) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} items, got {value!r}")
        return tuple(_convert(a, v, f"{key}[{i}]", src) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args
        return {
            _convert(kt, k, f"{key}", src): _convert(vt, v, f"{key}.{k}", src)
            for k, v in value.items()
        }
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # pragma: no cover - programming error


def _build(cls: type, data: Any, prefix: str, src: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: key `{prefix or '<root>'}` must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"`{prefix}.{unknown[0]}`" if prefix else f"`{unknown[0]}`"
        raise ConfigError(
            f"{src}: unknown key {where}; allowed keys{' under `' + prefix + '`' if prefix else ''}: "
            + ", ".join(names)
        )
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{prefix}.{name}" if prefix else name, src)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key is missing
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        key = f"{prefix}.{missing[0]}" if prefix and missing else (missing[0] if missing else prefix)
        raise ConfigError(f"{src}: required key `{key}` is missing") from e


def to_dict(cfg: Any) -> Any:
    """A JSON-able plain dict of a config dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def config_hash(cfg: Any) -> str:
    """sha256 of the canonical JSON of a config (the lineage key of a run)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------------------- loading


def _read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a text file ({e.reason} at byte {e.start}); a config is YAML "
                          "(did you swap --data and --config?)") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}: not valid YAML{where}: {what}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | None, src: str = "--set") -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a raw config dict."""
    import copy

    import yaml

    out = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{src}: override {item!r} must look like key.path=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = out
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{src}: cannot set `{dotted}`: `{k}` is not a mapping")
            node = nxt
        node[keys[-1]] = yaml.safe_load(raw)
    return out


def _check_task(t: TaskSpec, src: str, i: int) -> None:
    key = f"tasks[{i}]"
    if t.type == "multiclass" and (t.num_classes is None or t.num_classes < 2):
        raise ConfigError(f"{src}: key `{key}.num_classes` must be an integer >= 2 for multiclass task {t.name!r}")
    if t.type == "retrieval" and (t.vocab_size is None or t.vocab_size < 2):
        raise ConfigError(f"{src}: key `{key}.vocab_size` must be an integer >= 2 for retrieval task {t.name!r}")
    if t.type != "multiclass" and t.num_classes is not None:
        raise ConfigError(f"{src}: key `{key}.num_classes` only applies to multiclass tasks ({t.name!r} is {t.type})")
    if t.type != "retrieval" and t.vocab_size is not None:
        raise ConfigError(f"{src}: key `{key}.vocab_size` only applies to retrieval tasks ({t.name!r} is {t.type})")
    if t.bounds is not None:
        if t.type != "regression":
            raise ConfigError(f"{src}: key `{key}.bounds` only applies to regression tasks ({t.name!r} is {t.type})")
        if not t.bounds[0] < t.bounds[1]:
            raise ConfigError(f"{src}: key `{key}.bounds` must be [low, high] with low < high, got {list(t.bounds)}")
    if not 0.0 <= t.min_availability <= 1.0:
        raise ConfigError(f"{src}: key `{key}.min_availability` must be in [0, 1], got {t.min_availability}")


def validate_data_config(cfg: DataConfig, src: str) -> DataConfig:
    if not cfg.tasks:
        raise ConfigError(f"{src}: key `tasks` must list at least one task")
    seen: dict[str, str] = {}
    for i, t in enumerate(cfg.tasks):
        _check_task(t, src, i)
        if t.name in seen:
            raise ConfigError(f"{src}: task name {t.name!r} is declared twice under `tasks`")
        seen[t.name] = t.column
    columns: dict[str, str] = {}

    def claim(col: str, role: str) -> None:
        if col in columns:
            raise ConfigError(
                f"{src}: column `{col}` is declared as {columns[col]} and as {role}; a column has one role"
            )
        columns[col] = role

    for c in cfg.numeric_features:
        claim(c, "a numeric feature")
    for c in cfg.categorical_features:
        claim(c, "a categorical feature")
    for t in cfg.tasks:
        claim(t.column, f"the target of task {t.name!r}")
    if cfg.cluster_column:
        claim(cfg.cluster_column, "the cluster column")
        if cfg.num_clusters < 1:
            raise ConfigError(f"{src}: key `num_clusters` must be >= 1 when `cluster_column` is set")
    elif cfg.num_clusters:
        raise ConfigError(
            f"{src}: key `num_clusters` is {cfg.num_clusters} but `cluster_column` is not set; "
            "set `cluster_column` or remove `num_clusters`"
        )
    if not cfg.numeric_features and not cfg.categorical_features:
        raise ConfigError(f"{src}: declare at least one feature under `numeric_features` or `categorical_features`")
    s = cfg.split
    if s.method == "hash" and not s.key:
        raise ConfigError(f"{src}: key `split.key` is required when `split.method` is hash")
    if s.method == "column" and not s.column:
        raise ConfigError(f"{src}: key `split.column` is required when `split.method` is column")
    if s.method == "hash" and s.column:
        raise ConfigError(
            f"{src}: key `split.column` is set but `split.method` is hash (which uses `split.key`); "
            "remove one of them"
        )
    if s.method == "column" and s.key:
        raise ConfigError(
            f"{src}: key `split.key` is set but `split.method` is column (which uses `split.column`); "
            "remove one of them"
        )
    if s.method == "column" and s.fractions != SplitConfig().fractions:
        raise ConfigError(
            f"{src}: key `split.fractions` is set but `split.method` is column (where `split.column` names "
            "each row's split, so no fractions apply); remove one of them"
        )
    split_col = s.key if s.method == "hash" else s.column
    targets = {t.column: t.name for t in cfg.tasks}
    if split_col in targets:
        raise ConfigError(
            f"{src}: key `split.{'key' if s.method == 'hash' else 'column'}` is `{split_col}`, the target "
            f"of task {targets[split_col]!r}; splitting on a label leaks it, use an id column"
        )
    if set(s.fractions) - {"train", "val", "test"} or "train" not in s.fractions or "val" not in s.fractions:
        raise ConfigError(
            f"{src}: key `split.fractions` must name train and val (and optionally test), got {sorted(s.fractions)}"
        )
    total = sum(s.fractions.values())
    if abs(total - 1.0) > 1e-6 or any(v < 0 for v in s.fractions.values()):
        raise ConfigError(f"{src}: key `split.fractions` must be non-negative and sum to 1, got {total:g}")
    if s.fractions["train"] <= 0:
        raise ConfigError(f"{src}: key `split.fractions.train` must be > 0, otherwise nothing trains")
    return cfg


def config_source(path: str | Path, overrides: list[str] | None) -> str:
    """How errors name where a config came from: the file, and ``--set`` when overrides apply."""
    return f"{path} + --set" if overrides else str(path)


def _other_kind(raw: dict[str, Any], want: type, other: type) -> list[str]:
    """The keys of ``raw`` that only ``other`` has, when every key ``want`` lacks is one of them
    (a data config given where a train config goes, or the other way round); else []."""
    mine = {f.name for f in dataclasses.fields(want)}
    theirs = {f.name for f in dataclasses.fields(other)} - mine
    unknown = [k for k in raw if k not in mine]
    return unknown if unknown and all(k in theirs for k in unknown) else []


def load_data_config(path: str | Path, overrides: list[str] | None = None, *,
                     option: str = "--data-config") -> DataConfig:
    """Load and validate a data config (the dataset contract); ``option`` is the command-line
    option it came from, named when the file is a train config."""
    src = config_source(path, overrides)
    raw = _read_yaml(path)
    keys = _other_kind(raw, DataConfig, TrainConfig)
    if keys:
        also = " and the train config as --config" if option == "--data-config" else ""
        raise ConfigError(f"{path}: this is a train config (keys {', '.join(f'`{k}`' for k in keys[:3])}), not a "
                          f"data config (configs/data/*.yaml); pass the data config as {option}{also}")
    data = apply_overrides(raw, overrides)
    cfg = _build(DataConfig, data, "", src)
    return validate_data_config(cfg, src)


def _check_transfer(cfg: TransferConfig, weighting: str, src: str) -> None:
    if cfg.strategy not in STRATEGY_NAMES:
        raise ConfigError(
            f"{src}: key `transfer.strategy` is {cfg.strategy!r}; allowed values: {', '.join(STRATEGY_NAMES)}"
        )
    m, g = cfg.mocograd, cfg.gradnorm
    if not 0.0 <= m.beta < 1.0:
        raise ConfigError(f"{src}: key `transfer.mocograd.beta` must be in [0, 1), got {m.beta}")
    if m.strength < 0:
        raise ConfigError(f"{src}: key `transfer.mocograd.strength` must be >= 0, got {m.strength}")
    if g.alpha < 0:
        raise ConfigError(f"{src}: key `transfer.gradnorm.alpha` must be >= 0, got {g.alpha}")
    if g.lr <= 0:
        raise ConfigError(f"{src}: key `transfer.gradnorm.lr` must be > 0, got {g.lr}")
    if cfg.strategy == "gradnorm" and weighting == "uncertainty":
        raise ConfigError(
            f"{src}: `transfer.strategy: gradnorm` learns the loss weights itself and cannot be combined with "
            "`training.loss_weighting: uncertainty`; set `training.loss_weighting: fixed` or use "
            "`transfer.strategy: uncertainty`"
        )


GRAPH_STRATEGIES = ("adatt", "equal", "uncertainty", "pcgrad", "mocograd", "gradnorm", "mgda")


def _check_cuda_graph(cfg: TrainConfig, src: str) -> None:
    """What a whole-step CUDA graph cannot replay: several micro-batches per update, compiled
    parts that capture their own graphs, and strategies that decide on the host every step."""
    t = cfg.training
    if t.gradient_accumulation_steps != 1:
        raise ConfigError(f"{src}: key `training.cuda_graph` needs `training.gradient_accumulation_steps: 1` "
                          f"(got {t.gradient_accumulation_steps}): one graph is one whole update")
    if t.compile and t.compile_mode in ("reduce-overhead", "max-autotune"):
        raise ConfigError(f"{src}: key `training.cuda_graph` cannot be combined with `training.compile_mode: "
                          f"{t.compile_mode}`, which captures CUDA graphs of its own; use compile_mode default "
                          "or max-autotune-no-cudagraphs")
    if cfg.transfer.strategy not in GRAPH_STRATEGIES:
        raise ConfigError(f"{src}: key `training.cuda_graph` supports `transfer.strategy` {list(GRAPH_STRATEGIES)}, "
                          f"not {cfg.transfer.strategy!r}; set `training.cuda_graph: false` "
                          "(--set training.cuda_graph=false) to train it eagerly")
    if cfg.transfer.strategy == "mgda" and cfg.transfer.mgda.solver == "host":
        raise ConfigError(f"{src}: key `training.cuda_graph` cannot replay `transfer.mgda.solver: host`, which "
                          "reads the Gram matrix back every step; use solver auto or device (on the GPU), or "
                          "set `training.cuda_graph: false` (--set training.cuda_graph=false)")
    if cfg.transfer.grad_method == "loop":
        raise ConfigError(f"{src}: key `training.cuda_graph` cannot replay `transfer.grad_method: loop` (the seed's "
                          "per-task autograd loop reads on the host which tasks are present); use batched, fused "
                          "or einsum, which compute the same gradients")


def validate_train_config(cfg: TrainConfig, src: str, data: DataConfig | None = None) -> TrainConfig:
    _check_transfer(cfg.transfer, cfg.training.loss_weighting, src)
    a = cfg.transfer.adatt
    if cfg.transfer.strategy == "adatt" and a.freeze_epoch <= a.warmup_epochs:
        raise ConfigError(
            f"{src}: key `transfer.adatt.freeze_epoch` ({a.freeze_epoch}) must be greater than "
            f"`transfer.adatt.warmup_epochs` ({a.warmup_epochs}); otherwise adaTT's dynamic phase never runs"
        )
    if cfg.transfer.grad_interval < 1:
        raise ConfigError(f"{src}: key `transfer.grad_interval` must be >= 1, got {cfg.transfer.grad_interval}")
    if cfg.transfer.measure_stream and not cfg.transfer.measure_in_backward:
        raise ConfigError(f"{src}: key `transfer.measure_stream` moves the measurement that "
                          "`transfer.measure_in_backward` takes from the training backward onto a second stream; "
                          "it needs `transfer.measure_in_backward: true` (got false)")
    for k, v in (("ema_decay", a.ema_decay), ("prior_blend_start", a.prior_blend_start),
                 ("prior_blend_end", a.prior_blend_end), ("transfer_lambda", a.transfer_lambda),
                 ("inter_group_strength", a.inter_group_strength)):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{src}: key `transfer.adatt.{k}` must be in [0, 1], got {v}")
    if not -1.0 <= a.negative_transfer_threshold <= 0.0:
        raise ConfigError(f"{src}: key `transfer.adatt.negative_transfer_threshold` must be in [-1, 0]")
    if a.temperature <= 0:
        raise ConfigError(f"{src}: key `transfer.adatt.temperature` must be > 0, got {a.temperature}")
    members_seen: dict[str, str] = {}
    for g, grp in cfg.transfer.task_groups.items():
        if not 0.0 <= grp.intra_strength <= 1.0:
            raise ConfigError(f"{src}: key `transfer.task_groups.{g}.intra_strength` must be in [0, 1]")
        for m in grp.members:
            if m in members_seen:
                raise ConfigError(
                    f"{src}: task {m!r} is a member of task groups `{members_seen[m]}` and `{g}`; a task belongs to one group"
                )
            members_seen[m] = g
    t = cfg.training
    for k in ("batch_size", "gradient_accumulation_steps", "log_every", "cosine_t0", "cosine_t_mult"):
        if getattr(t, k) < 1:
            raise ConfigError(f"{src}: key `training.{k}` must be >= 1, got {getattr(t, k)}")
    for k in ("shared_expert_epochs", "cluster_finetune_epochs", "warmup_steps", "phase2_warmup_steps"):
        if getattr(t, k) < 0:
            raise ConfigError(f"{src}: key `training.{k}` must be >= 0, got {getattr(t, k)}")
    if t.learning_rate <= 0:
        raise ConfigError(f"{src}: key `training.learning_rate` must be > 0")
    if t.cuda_graph:
        _check_cuda_graph(cfg, src)
    m = cfg.model
    if m.shared_expert_names and len(m.shared_expert_names) != m.num_shared_experts:
        raise ConfigError(
            f"{src}: key `model.shared_expert_names` lists {len(m.shared_expert_names)} names but "
            f"`model.num_shared_experts` is {m.num_shared_experts}"
        )
    names = m.shared_expert_names or tuple(f"expert_{i}" for i in range(m.num_shared_experts))
    for e in t.expert_lr:
        if e not in names:
            raise ConfigError(f"{src}: key `training.expert_lr.{e}` names no shared expert; experts are {list(names)}")
    for key, val in (("num_shared_experts", m.num_shared_experts), ("shared_hidden", m.shared_hidden),
                     ("expert_dim", m.expert_dim), ("task_hidden", m.task_hidden),
                     ("tower_hidden", m.tower_hidden), ("embedding_dim", m.embedding_dim),
                     ("retrieval_dim", m.retrieval_dim)):
        if val < 1:
            raise ConfigError(f"{src}: key `model.{key}` must be >= 1, got {val}")
    if m.task_experts_per_task < 0:
        raise ConfigError(f"{src}: key `model.task_experts_per_task` must be >= 0")
    _check_ranges(cfg, src)
    if data is not None:
        check_against_data(cfg, data, src)
    return cfg


#: the keys a ``training.expert_lr.<expert>`` entry may set
EXPERT_LR_KEYS = ("lr", "weight_decay")
# MLflow alias rules: letters, digits, _ and -; "latest" and v<digits> are reserved
_ALIAS = re.compile(r"[A-Za-z0-9_-]+")
_RESERVED_ALIAS = re.compile(r"(latest|v\d+)", re.IGNORECASE)


def _check_ranges(cfg: TrainConfig, src: str) -> None:
    """Values the types admit but training cannot use: each check names its key and range."""

    def need(ok: bool, key: str, rule: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{src}: key `{key}` must be {rule}, got {value!r}")

    need(0 <= cfg.seed < 2**32, "seed", "in [0, 2**32 - 1]", cfg.seed)
    need(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device) is not None, "device",
         "auto, cpu, cuda or cuda:N", cfg.device)
    need(cfg.max_rows is None or cfg.max_rows >= 1, "max_rows", "null or >= 1", cfg.max_rows)
    m, t, a = cfg.model, cfg.training, cfg.transfer.adatt
    need(0.0 <= m.tower_dropout < 1.0, "model.tower_dropout", "in [0, 1)", m.tower_dropout)
    need(m.transfer_strength >= 0, "model.transfer_strength", ">= 0", m.transfer_strength)
    need(m.cgc_entropy_weight >= 0, "model.cgc_entropy_weight", ">= 0", m.cgc_entropy_weight)
    dup = sorted({n for n in m.shared_expert_names if m.shared_expert_names.count(n) > 1})
    need(not dup, "model.shared_expert_names", "distinct names (repeated: " + ", ".join(dup) + ")",
         list(m.shared_expert_names))
    _check_edges_acyclic(m.logit_transfer_edges, src)
    for name, lc in cfg.tasks.items():
        key = f"tasks.{name}"
        need(lc.weight >= 0, f"{key}.weight", ">= 0", lc.weight)
        need(0.0 <= lc.alpha <= 1.0, f"{key}.alpha", "in [0, 1]", lc.alpha)
        need(lc.gamma >= 0, f"{key}.gamma", ">= 0", lc.gamma)
        need(lc.delta > 0, f"{key}.delta", "> 0", lc.delta)
        need(lc.temperature > 0, f"{key}.temperature", "> 0", lc.temperature)
    need(a.warmup_epochs >= 0, "transfer.adatt.warmup_epochs", ">= 0", a.warmup_epochs)
    need(a.freeze_epoch >= 0, "transfer.adatt.freeze_epoch", ">= 0", a.freeze_epoch)
    need(0.0 <= a.max_transfer_ratio <= 1.0, "transfer.adatt.max_transfer_ratio", "in [0, 1]", a.max_transfer_ratio)
    need(t.weight_decay >= 0, "training.weight_decay", ">= 0", t.weight_decay)
    need(t.gradient_clip_norm > 0, "training.gradient_clip_norm", "> 0", t.gradient_clip_norm)
    need(t.early_stopping_patience >= 1, "training.early_stopping_patience", ">= 1", t.early_stopping_patience)
    if t.cluster_finetune_epochs > 0 and t.freeze_shared_in_phase2:
        need(bool(t.phase2_trainable), "training.phase2_trainable",
             "a non-empty list when Phase 2 runs with frozen shared experts (nothing would train)",
             list(t.phase2_trainable))
    for expert, spec in t.expert_lr.items():
        for k, v in spec.items():
            need(k in EXPERT_LR_KEYS, f"training.expert_lr.{expert}.{k}",
                 "one of the keys " + ", ".join(EXPERT_LR_KEYS) + " (unknown key)", v)
        if "lr" in spec:
            need(spec["lr"] > 0, f"training.expert_lr.{expert}.lr", "> 0", spec["lr"])
        if "weight_decay" in spec:
            need(spec["weight_decay"] >= 0, f"training.expert_lr.{expert}.weight_decay", ">= 0", spec["weight_decay"])
    tr, r = cfg.tracking, cfg.registry
    need(tr.retries >= 0, "tracking.retries", ">= 0", tr.retries)
    need(tr.retry_wait_s >= 0, "tracking.retry_wait_s", ">= 0", tr.retry_wait_s)
    need(r.tolerance >= 0, "registry.tolerance", ">= 0 (a relative tolerance; 0.01 is 1%)", r.tolerance)
    need(bool(r.model_name.strip()) and r.model_name == r.model_name.strip(), "registry.model_name",
         "a non-empty name without leading or trailing spaces", r.model_name)
    for key in ("candidate_alias", "champion_alias"):
        alias = getattr(r, key)
        need(_ALIAS.fullmatch(alias) is not None and _RESERVED_ALIAS.fullmatch(alias) is None, f"registry.{key}",
             "letters, digits, _ or - and not MLflow's reserved 'latest' or v<number>", alias)
    need(r.candidate_alias != r.champion_alias, "registry.candidate_alias",
         f"different from `registry.champion_alias` ({r.champion_alias!r}): a new version would be champion "
         "without passing the champion gate", r.candidate_alias)


def find_cycle(edges: Iterable[tuple[str, str]]) -> list[str] | None:
    """A cycle of the directed graph ``edges`` as a closed path ``[a, b, ..., a]``, or None.
    The config check and the model's edge ordering both use it, so they report one message."""
    succ: dict[str, list[str]] = {}
    for a, b in edges:
        succ.setdefault(a, []).append(b)
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(n: str, path: list[str]) -> list[str] | None:
        if state.get(n) == 2:
            return None
        if state.get(n) == 1:
            return path[path.index(n):] + [n]
        state[n] = 1
        for m in succ.get(n, []):
            found = visit(m, path + [n])
            if found:
                return found
        state[n] = 2
        return None

    for n in list(succ):
        found = visit(n, [])
        if found:
            return found
    return None


def cycle_message(cycle: list[str]) -> str:
    return f"key `model.logit_transfer_edges` has a cycle ({' -> '.join(cycle)}); logit transfer must be a DAG"


def _check_edges_acyclic(edges: tuple[tuple[str, str], ...], src: str) -> None:
    """``model.logit_transfer_edges`` must form a DAG (the model applies them in topological order)."""
    cycle = find_cycle(edges)
    if cycle:
        raise ConfigError(f"{src}: {cycle_message(cycle)}")


def check_against_data(cfg: TrainConfig, data: DataConfig, src: str) -> None:
    """Cross-check a train config against the data contract it will train on."""
    names = set(data.task_names)
    for name, lc in cfg.tasks.items():
        if name not in names:
            raise ConfigError(
                f"{src}: key `tasks.{name}` names a task the data config does not declare; tasks are {sorted(names)}"
            )
        spec = data.task(name)
        if lc.loss is not None and lc.loss not in ALLOWED_LOSSES[spec.type]:
            raise ConfigError(
                f"{src}: key `tasks.{name}.loss` is {lc.loss!r}, which does not fit a {spec.type} task; "
                f"allowed: {', '.join(ALLOWED_LOSSES[spec.type])}"
            )
    # Task names this data does not declare: a config written for a larger task set (the seed's
    # groups list `uplift`), and the default edges name ctr, cvr and ltv, so unknown names are
    # skipped with a warning; a near miss of a declared task is a typo and an error.
    def unknown(n: str, key: str) -> bool:
        if n in names:
            return False
        close = difflib.get_close_matches(n, sorted(names), n=1, cutoff=0.75)
        if close:
            raise ConfigError(f"{src}: key `{key}` names task {n!r}, which the data config does not declare; "
                              f"did you mean {close[0]!r}? tasks are {sorted(names)}")
        return True

    for a, b in cfg.model.logit_transfer_edges:
        if a == b:
            raise ConfigError(f"{src}: key `model.logit_transfer_edges` has a self edge {a} -> {b}")
        missing = [n for n in (a, b) if unknown(n, "model.logit_transfer_edges")]
        if missing and len(missing) < 2:
            logger.warning("%s: model.logit_transfer_edges: edge %s -> %s skipped: %r is not a task of this data",
                           src, a, b, missing[0])
    for g, grp in cfg.transfer.task_groups.items():
        missing = [n for n in grp.members if unknown(n, f"transfer.task_groups.{g}.members")]
        if missing and len(missing) < len(grp.members):
            logger.warning("%s: transfer.task_groups.%s: %s not a task of this data, left out of the group",
                           src, g, ", ".join(map(repr, missing)) + (" is" if len(missing) == 1 else " are"))


def load_train_config(
    path: str | Path, overrides: list[str] | None = None, data: DataConfig | None = None, *,
    data_option: str | None = "--data-config",
) -> TrainConfig:
    """Load and validate a train config; with ``data`` also cross-check task names and losses.

    ``data_option``: the command's option for a data config (None: it takes none), named when
    the file is a data config.
    """
    src = config_source(path, overrides)
    raw = _read_yaml(path)
    keys = _other_kind(raw, TrainConfig, DataConfig)
    if keys:
        fix = (f"pass it as {data_option} and the train config as --config" if data_option
               else "--config takes a train config")
        raise ConfigError(f"{path}: this is a data config (keys {', '.join(f'`{k}`' for k in keys[:3])}), not a "
                          f"train config (configs/train/*.yaml); {fix}")
    raw = apply_overrides(raw, overrides)
    cfg = _build(TrainConfig, raw, "", src)
    return validate_train_config(cfg, src, data)


def data_config_from_dict(d: dict[str, Any], src: str = "manifest") -> DataConfig:
    """Rebuild a DataConfig from :func:`to_dict` output (e.g. a checkpoint manifest)."""
    return validate_data_config(_build(DataConfig, d, "", src), src)


def train_config_from_dict(d: dict[str, Any], src: str = "manifest") -> TrainConfig:
    """Rebuild a TrainConfig from :func:`to_dict` output (e.g. a checkpoint manifest)."""
    return validate_train_config(_build(TrainConfig, d, "", src), src)
