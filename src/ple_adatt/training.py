"""The two-phase trainer (seed sections 8, 10, 11, 12).

Phase 1 trains everything with the task-transfer strategy (adaTT by default). Phase 2
freezes the shared experts and the CGC gates, sets the strategy aside (restored in
``finally``), resets optimizer, scheduler, grad scaler and early stopping, and fine-tunes
the per-cluster heads with its own warmup. One visible loop per phase lives in
:meth:`Trainer._fit`; the helpers above it are short.

Only torch and numpy are needed here (no polars, MLflow or Kubeflow), so the trainer runs
on a bare GPU box. Tracking hooks in through ``on_epoch`` callbacks.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import kernels
from .config import EVAL_BATCH_MIN, ConfigError, TaskSpec, TrainConfig
from .data.dataset import TensorData
from .errors import TrainingError
from .losses import LossOutput, MultiTaskLoss, gate_entropy
from .metrics import PRIMARY_METRIC, task_metrics
from .model import ModelOutput, PLEClusterModel, build_model
from .side_stream import SideStream
from .step_graphs import CudaGraphBackend, GraphBackend, StepGraphs, StepOut
from .transfer import build_strategy

__all__ = ["MultiTaskSystem", "build_system", "Trainer", "resolve_device", "EpochRecord", "StepLosses", "StepOut"]

Log = Callable[[str], None]

# another backward through the CGC outputs would be read as this step's
_SECOND_GRADIENT = ("measure_in_backward: {} gradients reached the CGC outputs in one step, expected the training "
                    "backward's one")


# ------------------------------------------------------------------------------ the system


class MultiTaskSystem(nn.Module):
    """The model, its loss and its task-transfer strategy: one state_dict for checkpoints."""

    def __init__(self, model: PLEClusterModel, criterion: MultiTaskLoss, transfer: nn.Module | None):
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.transfer = transfer

    @property
    def task_names(self) -> list[str]:
        return self.model.task_names

    def losses(self, out: Tensor, y: Tensor) -> LossOutput:
        return self.criterion(out, y, self.model.target_loc, self.model.target_scale, self.model.item_embeddings)


def build_system(cfg: TrainConfig, tasks: list[TaskSpec], num_numeric: int, cardinalities: list[int],
                 num_clusters: int) -> MultiTaskSystem:
    model = build_model(cfg.model, tasks, num_numeric, cardinalities, num_clusters)
    model.fused_mixture = cfg.training.fused_mixture  # also for models rebuilt from a checkpoint
    criterion = MultiTaskLoss(model.heads, [cfg.loss_for(t) for t in tasks], cfg.effective_loss_weighting)
    transfer = build_strategy([t.name for t in tasks], cfg.transfer)
    return MultiTaskSystem(model, criterion, transfer)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"key `device` is {name!r} but CUDA is not available here; use device: auto or cpu")
    return dev


def _require_triton(device: torch.device, what: str, elsewhere: str, key: str, without: str) -> None:
    """A config error unless Triton kernels run on ``device``: CUDA with triton, or the CPU under
    Triton's interpreter (``TRITON_INTERPRET=1``, for tests)."""
    if device.type != "cuda" and not kernels.interpreted():
        raise ConfigError(f"key {what}, but this run's device is {device.type}; {elsewhere}")
    if device.type == "cuda" and not kernels.available(device):
        raise ConfigError(f"key {key}, which needs triton, and triton is not installed here; pip install "
                          f"triton, or {without}")


def resolve_training_device(cfg: TrainConfig) -> torch.device:
    """The device of ``cfg``, refusing what cannot run there before any data is loaded:
    ``transfer.grad_method: fused`` needs CUDA and triton (or the CPU under Triton's
    interpreter, ``TRITON_INTERPRET=1``, for tests); so does ``transfer.mgda.solver: device``."""
    device = resolve_device(cfg.device)
    if cfg.transfer.strategy == "mgda" and cfg.transfer.mgda.solver == "device":
        _require_triton(device, "`transfer.mgda.solver` is 'device', which solves on the GPU in a Triton kernel",
                        "use solver: auto (the device on CUDA, the host elsewhere) or host",
                        "`transfer.mgda.solver` is 'device'", "use solver: auto or host")
    if cfg.transfer.grad_method == "fused":
        _require_triton(device, "`transfer.grad_method` is 'fused', which runs the Triton kernel on CUDA",
                        "use grad_method: batched (the kernel on CUDA, einsums elsewhere) or einsum",
                        "`transfer.grad_method` is 'fused'", "use grad_method: batched")
    return device


def set_regression_targets(model: PLEClusterModel, y: Tensor) -> None:
    """Standardise regression targets with train-split statistics (stored as model buffers)."""
    with torch.no_grad():
        for i, h in enumerate(model.heads):
            if h.type != "regression":
                continue
            col = y[:, i]
            col = col[~torch.isnan(col)].double()
            if col.numel() > 1:
                model.target_loc[i] = float(col.mean())
                model.target_scale[i] = max(float(col.std()), 1e-6)


# ------------------------------------------------------------------------- optimisation


def make_optimizer(system: MultiTaskSystem, cfg: TrainConfig, fused: bool = False,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, with optional per-shared-expert LR (seed 10.2).

    ``fused`` takes the fused kernel, which also lets the grad scaler skip a step with
    non-finite gradients on the device, without a host synchronisation. ``capturable`` keeps
    its step counts on the device, so a CUDA graph can replay the update."""
    t = cfg.training
    expert_params: set[int] = set()
    groups: list[dict[str, Any]] = []
    for name, expert in system.model.shared_experts.experts.items():
        spec = t.expert_lr.get(name)
        if spec is None:
            continue
        params = [p for p in expert.parameters() if p.requires_grad]
        expert_params.update(id(p) for p in expert.parameters())
        if params:
            groups.append({"params": params, "lr": spec.get("lr", t.learning_rate),
                           "weight_decay": spec.get("weight_decay", t.weight_decay), "name": name})
    rest = [p for p in system.parameters() if p.requires_grad and id(p) not in expert_params]
    groups.insert(0, {"params": rest, "lr": t.learning_rate, "weight_decay": t.weight_decay, "name": "default"})
    # on the CPU too: the fused kernel is one call per step where the default loops over the
    # tensors (1.5 -> 0.4 ms per step at the bench's small shape, a sixth of its plain step)
    on_cpu = all(p.device.type == "cpu" for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=t.learning_rate, weight_decay=t.weight_decay,
                             fused=(fused or (on_cpu and not capturable)) or None, capturable=capturable)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, warmup_epochs: int) -> Any:
    """LinearLR warmup (start factor 0.1) then CosineAnnealingWarmRestarts, per epoch (seed 10.3)."""
    t = cfg.training
    cosine = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=t.cosine_t0, T_mult=t.cosine_t_mult)
    if warmup_epochs <= 0:
        return cosine
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=warmup_epochs)
    return torch.optim.lr_scheduler.SequentialLR(opt, [warm, cosine], milestones=[warmup_epochs])


# ------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(system: MultiTaskSystem, data: TensorData, *, use_cluster_heads: bool, batch_size: int,
             by_cluster: bool = False) -> dict[str, Any]:
    """Validation losses and metrics per task (and per cluster when asked)."""
    model = system.model
    was_training = system.training
    system.eval()
    preds: dict[str, list[Tensor]] = {n: [] for n in model.task_names}
    loss_sum = torch.zeros(model.num_tasks, dtype=torch.float64, device=data.y.device)
    count_sum = torch.zeros_like(loss_sum)
    for i in range(0, len(data), batch_size):
        b = data.subset(torch.arange(i, min(i + batch_size, len(data)), device=data.y.device))
        out = model(b.x_num, b.x_cat, b.cluster, use_cluster_heads=use_cluster_heads).out
        lo = system.losses(out, b.y)
        loss_sum += lo.raw.double() * lo.counts.double()
        count_sum += lo.counts.double()
        for k, p in model.predictions(out).items():  # the same forward: no second pass
            preds[k].append(p.float().cpu())
    system.train(was_training)
    y = data.y.cpu()
    cluster = data.cluster.cpu()
    task_loss = (loss_sum / count_sum.clamp_min(1)).cpu()
    metrics: dict[str, Any] = {}
    for i, h in enumerate(model.heads):
        p = torch.cat(preds[h.name]) if preds[h.name] else torch.zeros(0)
        items = model.item_embeddings[h.name].weight.detach().cpu() if h.type == "retrieval" else None
        m = task_metrics(h.type, p, y[:, i], items=items)
        m["loss"] = float(task_loss[i]) if count_sum[i] > 0 else float("nan")
        if by_cluster and model.num_clusters:
            key, _ = PRIMARY_METRIC[h.type]
            per = {}
            for c in range(model.num_clusters + 1):
                sel = cluster == c
                if int(sel.sum()) == 0:
                    continue
                mc = task_metrics(h.type, p[sel], y[sel, i], items=items)
                per["unknown" if c == model.num_clusters else str(c)] = {"n": mc.get("n", 0), key: mc.get(key)}
            m["by_cluster"] = per
        metrics[h.name] = m
    weights = system.criterion.weights.cpu()
    present = count_sum.cpu() > 0
    # a non-finite loss of a task with rows stays non-finite: a diverged run must not look perfect
    val_loss = float((weights * torch.where(present, task_loss.float(), 0.0)).sum())
    return {"val_loss": val_loss, "tasks": metrics}


# -------------------------------------------------------------------------------- records


@dataclass
class EpochRecord:
    phase: str
    epoch: int
    step: int
    lr: float
    transfer_phase: str
    task_losses: dict[str, float]  # transfer-enhanced (seed's task_losses/<task>)
    raw_losses: dict[str, float]
    weighted_losses: dict[str, float]  # after fixed / uncertainty weighting, before transfer
    transfer_share: float  # share of the summed loss that came from transfer
    val: dict[str, Any]
    affinity: list[list[float]]
    transfer_matrix: list[list[float]] | None
    cgc_frozen: bool
    transfer_frozen: bool
    skipped_batches: int
    seconds: float
    events: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class StepLosses(NamedTuple):
    """What :meth:`Trainer.forward_losses` returns for one batch."""

    losses: LossOutput
    enhanced: Tensor  # (T,) losses after the strategy (transfer / learned weights)
    total: Tensor  # scalar that is back-propagated
    weights: Tensor | None  # adaTT transfer weights (T, T)
    surgery: tuple[Tensor, Tensor | None] | None  # (task grads (T, P), representation grads) for shared_gradient
    # measure_in_backward: (the CGC-output gradient caught by a hook, the model output), read
    # by Trainer.backward once the training backward has filled it
    pending: tuple[list[Tensor], Any] | None = None


def _step_out(step: StepLosses, finite: Tensor) -> StepOut:
    lo = step.losses
    weights = step.weights.detach() if step.weights is not None else None
    return StepOut(lo.raw.detach() * lo.present, lo.present.to(lo.raw.dtype), step.enhanced.detach(),
                   lo.weighted.detach(), step.total.detach(), finite, weights)


# -------------------------------------------------------------------------------- trainer


class Trainer:
    """Runs Phase 1 and Phase 2 on tensors that live on ``device``."""

    def __init__(self, system: MultiTaskSystem, train: TensorData, val: TensorData, cfg: TrainConfig,
                 device: torch.device, *, log: Log = print,
                 on_epoch: Callable[[EpochRecord], None] | None = None):
        if len(train) == 0:
            raise TrainingError("the training split has no rows: check `max_rows`, the split fractions and the "
                                "data file")
        self.system = system.to(device)
        self.cfg = cfg
        self.device = device
        self.train_data = train.to(device)
        self.val_data = val.to(device)
        self.log = log
        self.on_epoch = on_epoch
        self.history: list[EpochRecord] = []
        self.events: list[dict[str, Any]] = []
        self._deferred: list[str] | None = None  # event lines held back until the epoch's line
        self.global_step = 0
        # On CUDA the hot loop never reads the device: a non-finite loss poisons its gradients
        # and the scaler skips the update on the device; skips are counted there and read once
        # per epoch. On CPU a per-step check is free and logs the exact batch.
        self.sync_free = device.type == "cuda"
        if device.type == "cuda":  # seed 12.3: TF32
            if device.index is not None:  # Triton launches on the current device
                torch.cuda.set_device(device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # transfer.measure_stream: the per-task measurement beside the rest of the step (side_stream.py)
        self.measure_side = SideStream(device) if cfg.transfer.measure_stream else None
        # whole-step CUDA graphs (step_graphs.py); tests may put a stand-in backend here
        self.graph_backend: GraphBackend | None = None
        self.step_graphs: StepGraphs | None = None
        if cfg.training.cuda_graph:
            if device.type == "cuda":
                self.graph_backend = CudaGraphBackend()
            else:
                log(f"  note: training.cuda_graph needs CUDA; on {device.type} every step runs eagerly")
        if cfg.training.compile:
            # the seed turned compile off for 30-minute first epochs; here the trunk, the heads
            # and the losses compile once per batch shape (about 45 s cold on a 2-core CPU)
            mode = cfg.training.compile_mode
            system.model.compile_parts(mode=mode)
            system.criterion.compile(mode=mode)

    # ----------------------------------------------------------------- small helpers

    def _event(self, name: str, phase: str, epoch: int, **extra: Any) -> None:
        """Record an event (``epoch`` 0-based, as in the manifest) and log it with the 1-based
        epoch of the log's epoch lines; at epoch end, after that epoch's line."""
        self.events.append({"event": name, "phase": phase, "epoch": epoch, "step": self.global_step, **extra})
        line = f"  event: {name} ({phase}, epoch {epoch + 1}){' ' + str(extra) if extra else ''}"
        if self._deferred is not None:
            self._deferred.append(line)
        else:
            self.log(line)

    def _autocast(self) -> contextlib.AbstractContextManager:
        t = self.cfg.training
        if self.device.type != "cuda" or not t.use_amp:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if t.amp_dtype == "bfloat16" else torch.float16
        # a graph must not reuse weight casts cached outside it (PyTorch's CUDA-graph recipe)
        return torch.autocast("cuda", dtype=dtype, cache_enabled=self.graph_backend is None)

    def make_scaler(self) -> torch.amp.GradScaler:
        """fp16 needs loss scaling; the sync-free loop also uses the scaler's on-device inf check
        to skip steps with non-finite gradients (for bf16 / fp32 its power-of-two scale is exact)."""
        t = self.cfg.training
        fp16 = self.device.type == "cuda" and t.use_amp and t.amp_dtype == "float16"
        if self.sync_free:
            # bf16 / fp32 use it for the inf check: the scale starts at 1 and moves by powers of
            # two (growth and back-off), which scale and unscale exactly, so it changes no update
            return torch.amp.GradScaler(self.device.type, init_scale=65536.0 if fp16 else 1.0)
        return torch.amp.GradScaler("cuda", enabled=fp16)

    def _batches(self, n: int, batch_size: int) -> list[Tensor]:
        perm = torch.randperm(n, device=self.device)  # shuffled on the device
        return list(perm.split(batch_size))

    def _transfer_phase(self, epoch: int) -> str:
        tr = self.system.transfer
        return tr.phase(epoch) if tr is not None else "off"

    def _sync_cgc_freeze(self, phase: str, epoch: int) -> None:
        """Seed 11.2: CGC freezes at adaTT's freeze epoch."""
        freeze_epoch = getattr(self.system.transfer, "freeze_epoch", None)
        model = self.system.model
        if freeze_epoch is not None and epoch >= freeze_epoch and not bool(model._cgc_frozen):
            model.set_cgc_frozen(True)
            self._event("cgc_frozen_epoch", phase, epoch)

    def measure_now(self) -> bool:
        """Whether this step measures per-task gradients: every ``grad_interval`` steps, every
        step for the gradient methods."""
        tr = self.system.transfer
        return tr is not None and getattr(tr, "observing", True) and (
            getattr(tr, "needs_gradients_every_step", False) or self.global_step % self.cfg.transfer.grad_interval == 0)

    def forward_losses(self, b: TensorData, epoch: int, use_cluster_heads: bool,
                       measure: bool | None = None) -> StepLosses:
        """Forward, weighted task losses, per-task gradients (when ``measure``; by default
        :meth:`measure_now`), task transfer, CGC entropy regularisation."""
        system, model, cfg = self.system, self.system.model, self.cfg
        tr = system.transfer
        self._join_measurement()  # the transfer weights below read the affinity it updates
        with self._autocast():
            out = model(b.x_num, b.x_cat, b.cluster, use_cluster_heads=use_cluster_heads)
            lo = system.losses(out.out, b.y)
        grads = rep = pending = None
        if tr is None:
            enhanced, weights = lo.weighted, None
        else:
            measure = self.measure_now() if measure is None else measure
            if measure and self._measure_in_backward(tr) and out.cgc_out.requires_grad:
                caught: list[Tensor] = []  # dTotal/dcgc = c_t * dL_t/dcgc_t with c_t >= 1
                out.cgc_out.register_hook(caught.append if self.measure_side is None
                                          else self._measure_hook(caught, out))
                pending = (caught, out)
            elif measure:
                if getattr(tr, "gradient_source", "params") == "representation":
                    grads, rep = model.shared_task_and_representation_gradients(lo.weighted, lo.present, out)
                else:
                    grads = model.shared_task_gradients(lo.weighted, lo.present, out, cfg.transfer.grad_method)
            enhanced, weights = tr.transfer_losses(lo.weighted, lo.present, grads, epoch)
        total = enhanced.sum() - model.cfg.cgc_entropy_weight * gate_entropy(out.gates)
        surgery = tr is not None and grads is not None and hasattr(tr, "shared_gradient")
        return StepLosses(lo, enhanced, total, weights, (grads, rep) if surgery else None, pending)

    def _measure_in_backward(self, tr: nn.Module) -> bool:
        """One backward instead of two: possible where the gradients only feed the affinity
        (scale-free cosines) and the method works from dL/dcgc (not the seed's loop)."""
        t = self.cfg.transfer
        return t.measure_in_backward and getattr(tr, "affinity_only", False) and t.grad_method != "loop"

    def _observe(self, d_cgc: Tensor, out: ModelOutput, w2: Tensor | None = None) -> None:
        """measure_in_backward: per-task gradients from the caught dTotal/dcgc into the affinity."""
        grads = self.system.model.task_gradients_from_cgc(d_cgc, out, self.cfg.transfer.grad_method, w2)
        self.system.transfer.observe(grads)

    def _measure_hook(self, caught: list[Tensor], out: ModelOutput) -> Callable[[Tensor], None]:
        """transfer.measure_stream: the hook on the CGC outputs starts the measurement itself,
        on the side stream, while the backward goes on through the mixture and the experts."""

        # a weak reference: the hook lives on cgc_out's autograd node, which the output holds;
        # a strong one would make a cycle through C++ that the garbage collector cannot see
        out_ref = weakref.ref(out)

        def hook(d_cgc: Tensor) -> None:
            caught.append(d_cgc)
            if len(caught) > 1:
                raise TrainingError(_SECOND_GRADIENT.format(len(caught)))
            output = out_ref()
            if output is None:  # nothing left to measure from (a caller dropped the step's output)
                return
            # the optimizer step updates the experts' weights in place while the side stream
            # reads them: it reads a copy taken here, on the main stream, in order
            w2 = self.system.model.shared_experts.stacked_w2()
            x, pre, hid = output.shared_cache
            self.measure_side.launch(lambda: self._observe(d_cgc, output, w2),
                                     (d_cgc, output.gates, x, pre, hid, w2))

        return hook

    def _join_measurement(self) -> None:
        if self.measure_side is not None:
            self.measure_side.join()

    def _shared_grads(self) -> list[Tensor | None]:
        return [None if p.grad is None else p.grad.clone() for p in self.system.model.shared_parameters()]

    def _replace_shared_gradient(self, step: StepLosses, before: list[Tensor | None], scale: Tensor,
                                 accum: int) -> None:
        """Gradient surgery: the shared experts' gradient of this micro-batch becomes the
        strategy's combined gradient (the other parameters keep the summed loss's gradient)."""
        grads, rep = step.surgery
        combined = self.system.transfer.shared_gradient(grads, step.losses.present, rep)  # (P,)
        params = self.system.model.shared_parameters()
        parts = combined.split([p.numel() for p in params])
        for p, prev, g in zip(params, before, parts):
            new = g.view_as(p).to(p.dtype) * (scale / accum)
            p.grad = new if prev is None else prev + new

    def backward(self, step: StepLosses, scaler: torch.amp.GradScaler, accum: int = 1,
                 finite: Tensor | None = None) -> None:
        """Backward of one micro-batch. Sync-free: a non-finite total poisons its own gradients
        (the scaler then skips the update on the device). Gradient methods then replace the
        shared experts' gradient with the strategy's combined one."""
        total = step.total
        if self.sync_free:
            finite = torch.isfinite(total) if finite is None else finite
            total = total * torch.where(finite, 1.0, float("nan"))
        before = self._shared_grads() if step.surgery is not None else []
        scaler.scale(total / accum).backward()
        if step.pending is not None and step.pending[0] and self.measure_side is None:  # measure_in_backward
            caught, out = step.pending
            if len(caught) != 1:  # another backward through the CGC outputs would be read as this step's
                raise TrainingError(_SECOND_GRADIENT.format(len(caught)))
            self._observe(caught[0], out)
        if step.surgery is not None:
            # the loss scale as a device tensor (get_scale() would read it back to the host)
            scale = scaler.scale(torch.ones((), device=step.total.device))
            self._replace_shared_gradient(step, before, scale, accum)

    def optimizer_step(self, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        """Unscale, clip, step, update the scaler, zero the gradients: no host read on CUDA."""
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                       self.cfg.training.gradient_clip_norm)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    def train_step(self, b: TensorData, epoch: int, use_cluster_heads: bool, opt: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, measure: bool | None = None) -> StepOut:
        """One whole sync-free update on one batch: forward, backward, optimizer step. What a
        CUDA graph captures (:class:`StepGraphs`); also the bench's step."""
        try:
            step = self.forward_losses(b, epoch, use_cluster_heads, measure)
            finite = torch.isfinite(step.total)
            self.backward(step, scaler, 1, finite)
            self.optimizer_step(opt, scaler)
        finally:  # the end of a step, on errors too: a captured graph must join its side stream
            self._join_measurement()
        return _step_out(step, finite)

    def _eager_step(self, idx: Tensor, i: int, last: bool, phase: str, epoch: int, use_cluster_heads: bool,
                    opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> StepOut | None:
        """One micro-batch without graphs: gradient accumulation, and on the CPU a host check
        that skips a non-finite batch; None when the batch was skipped."""
        try:
            return self._eager_micro_batch(idx, i, last, phase, epoch, use_cluster_heads, opt, scaler)
        finally:  # the end of a micro-batch, skipped or failed too: no side stream left running
            self._join_measurement()

    def _eager_micro_batch(self, idx: Tensor, i: int, last: bool, phase: str, epoch: int, use_cluster_heads: bool,
                           opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> StepOut | None:
        accum = self.cfg.training.gradient_accumulation_steps
        try:
            # forward (+ per-task gradients and task transfer)
            step = self.forward_losses(self.train_data.subset(idx), epoch, use_cluster_heads)
            finite = torch.isfinite(step.total)
            if not self.sync_free and not finite:  # a non-finite loss skips the batch
                opt.zero_grad(set_to_none=True)
                self._event("nonfinite_loss_skipped", phase, epoch, batch=i)
                return None
            self.backward(step, scaler, accum, finite)
        except torch.cuda.OutOfMemoryError:  # CUDA OOM skips the batch
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            self._event("cuda_oom_skipped", phase, epoch, batch=i)
            return None
        # clip -> step
        if (i + 1) % accum == 0 or last:
            self.optimizer_step(opt, scaler)
        return _step_out(step, finite)

    # ------------------------------------------------------------------------- the loop

    def _fit(self, phase: str, max_epochs: int, warmup_epochs: int, use_cluster_heads: bool) -> None:
        cfg, t = self.cfg, self.cfg.training
        system, model = self.system, self.system.model
        graphed = self.graph_backend is not None
        opt = make_optimizer(system, cfg, fused=self.sync_free, capturable=graphed)
        sched = make_scheduler(opt, cfg, warmup_epochs)
        scaler = self.make_scaler()
        graphs = StepGraphs(self, opt, scaler, t.batch_size, self.graph_backend) if graphed else None
        self.step_graphs = graphs  # the current phase's graphs, for logs and tests
        best, patience = math.inf, 0
        T = model.num_tasks
        names = model.task_names
        for epoch in range(max_epochs):
            t0 = time.perf_counter()
            transfer_phase = self._transfer_phase(epoch)  # the phase this epoch runs in
            system.train()
            sum_raw = torch.zeros(T, device=self.device)
            sum_enh = torch.zeros(T, device=self.device)
            sum_w = torch.zeros(T, device=self.device)
            n_present = torch.zeros(T, device=self.device)
            skipped = 0
            nonfinite = torch.zeros((), device=self.device)  # sync-free skip count
            weights_used: Tensor | None = None
            opt.zero_grad(set_to_none=True)
            batches = self._batches(len(self.train_data), t.batch_size)
            for i, idx in enumerate(batches):
                if graphs is not None and len(idx) == t.batch_size and graphs.capturable():
                    so = graphs.step(idx, epoch, use_cluster_heads, self.measure_now())
                else:
                    so = self._eager_step(idx, i, i + 1 == len(batches), phase, epoch, use_cluster_heads,
                                          opt, scaler)
                if so is None:
                    skipped += 1
                    self.global_step += 1
                    continue
                weights_used = so.weights if so.weights is not None else weights_used
                # log (device-side sums; the host reads them every log_every steps)
                with torch.no_grad():  # a skipped batch adds nothing (where, not *: NaN * 0 is NaN)
                    if self.sync_free:  # NaN gradients made the scaler skip this update on the device
                        nonfinite += ~so.finite
                    sum_raw += torch.where(so.finite, so.raw, 0.0)
                    sum_enh += torch.where(so.finite, so.enhanced, 0.0)
                    sum_w += torch.where(so.finite, so.weighted, 0.0)
                    n_present += so.present * so.finite
                self.global_step += 1
                if self.global_step % t.log_every == 0:
                    self.log(f"    {phase} epoch {epoch + 1} step {self.global_step} loss {float(so.total):.4f}")
            if self.sync_free and (n_bad := int(nonfinite)):  # one read per epoch
                skipped += n_bad
                self._event("nonfinite_loss_skipped", phase, epoch, count=n_bad)
            if graphs is not None and epoch == 0:
                self.log(f"    {phase}: {graphs.captures} CUDA graph(s) captured in epoch 1 "
                         "(captured again every epoch; a smaller last batch runs eagerly)")
            # eval -> schedule -> checkpointable state
            self._deferred = []
            lr = float(opt.param_groups[0]["lr"])  # the rate this epoch trained at, before the schedule moves on
            sched.step()
            val = evaluate(system, self.val_data, use_cluster_heads=use_cluster_heads,
                           batch_size=max(t.batch_size, EVAL_BATCH_MIN))
            events: list[str] = []
            if system.transfer is not None:
                for ev in system.transfer.on_epoch_end(epoch):  # a name, or (name, details)
                    name, extra = (ev, {}) if isinstance(ev, str) else ev
                    self._event(name, phase, epoch, **extra)
                    events.append(name)
                self._sync_cgc_freeze(phase, epoch)
            denom = n_present.clamp_min(1)
            raw_mean = (sum_raw / denom).cpu()
            enh_mean = (sum_enh / denom).cpu()
            w_mean = (sum_w / denom).cpu()
            total_enh = float(enh_mean.sum())
            weighted_mean = float(w_mean.sum())  # before transfer (fixed or uncertainty)
            affinity_src = system.transfer if system.transfer is not None else None
            rec = EpochRecord(
                phase=phase, epoch=epoch, step=self.global_step, lr=lr,
                transfer_phase=transfer_phase,
                task_losses={n: float(enh_mean[j]) for j, n in enumerate(names)},
                raw_losses={n: float(raw_mean[j]) for j, n in enumerate(names)},
                weighted_losses={n: float(w_mean[j]) for j, n in enumerate(names)},
                transfer_share=(max(total_enh - weighted_mean, 0.0) / total_enh
                                if total_enh > 0 and getattr(system.transfer, "transfers_loss", True) else 0.0),
                val=val,
                affinity=(affinity_src.affinity_computer.affinity_matrix.cpu().tolist() if affinity_src else []),
                transfer_matrix=(weights_used.detach().cpu().tolist() if weights_used is not None else None),
                cgc_frozen=bool(model._cgc_frozen),
                transfer_frozen=bool(getattr(system.transfer, "_frozen", False)),
                skipped_batches=skipped, seconds=time.perf_counter() - t0, events=events,
            )
            self.history.append(rec)
            self._print_epoch(rec, max_epochs)
            for line in self._deferred:
                self.log(line)
            self._deferred = None
            self._check_diverged(rec, len(batches))
            if self.on_epoch is not None:
                self.on_epoch(rec)
            # early stopping on the weighted validation loss
            if val["val_loss"] < best - 1e-6:
                best, patience = val["val_loss"], 0
            else:
                patience += 1
                if patience >= t.early_stopping_patience:
                    self._event("early_stop", phase, epoch, best_val_loss=best)
                    break

    def _print_epoch(self, rec: EpochRecord, max_epochs: int) -> None:
        parts = []
        for name, m in rec.val["tasks"].items():
            kind = self.system.model.heads[self.system.task_names.index(name)].type
            key, _ = PRIMARY_METRIC[kind]
            v = m.get(key)
            parts.append(f"{name} {key} {v:.3f}" if isinstance(v, float) and not math.isnan(v) else f"{name} -")
        losses = " ".join(f"{n}={v:.3f}" for n, v in rec.task_losses.items())
        self.log(
            f"[{rec.phase}] epoch {rec.epoch + 1}/{max_epochs} transfer={rec.transfer_phase} "
            f"cgc_frozen={'yes' if rec.cgc_frozen else 'no'} lr={rec.lr:.2e} "
            f"transfer_share={rec.transfer_share:.1%} val_loss={rec.val['val_loss']:.4f} "
            f"({rec.seconds:.1f}s{', skipped ' + str(rec.skipped_batches) if rec.skipped_batches else ''})\n"
            f"    task_losses: {losses}\n    val: {' | '.join(parts)}"
        )

    # ------------------------------------------------------------------------- phases

    def _check_diverged(self, rec: EpochRecord, n_batches: int) -> None:
        """Stop a run that no longer trains: parameters that are not finite, a validation loss
        that is not, or an epoch whose every batch was skipped for a non-finite loss. One host
        read per epoch. Nothing is written: the stage fails, and no checkpoint or model is kept."""
        named = list(self.system.named_parameters())
        finite = torch.stack([torch.isfinite(p).all() for _, p in named]).cpu()  # one read for all
        bad = [n for (n, _), ok in zip(named, finite.tolist()) if not ok]
        why = ""
        if bad:
            why = f"{len(bad)} parameter tensor(s) are not finite (first: {bad[0]})"
        elif not math.isfinite(rec.val["val_loss"]):
            why = f"the validation loss is {rec.val['val_loss']}"
        elif n_batches and rec.skipped_batches >= n_batches:
            why = f"all {n_batches} batches were skipped for a non-finite loss"
        if why:
            self._event("diverged", rec.phase, rec.epoch, reason=why)
            raise TrainingError(f"training diverged in {rec.phase} epoch {rec.epoch + 1}: {why}; lower "
                                f"`training.learning_rate` (now {self.cfg.training.learning_rate:g}) or check the "
                                "data and the losses' settings")

    def run_phase1(self) -> None:
        t = self.cfg.training
        self.log(f"=== Phase 1: shared experts with {self.cfg.transfer.strategy} "
                 f"({len(self.train_data)} train rows, {len(self.val_data)} val rows, device {self.device}) ===")
        self._fit("phase1", t.shared_expert_epochs, t.warmup_steps, use_cluster_heads=False)

    def run_phase2(self) -> None:
        """Seed 8.2-8.4 and 11.3: freeze shared + CGC, set transfer aside, fine-tune cluster heads."""
        t = self.cfg.training
        system, model = self.system, self.system.model
        self.log("=== Phase 2: cluster head fine-tuning ===")
        backup = system.transfer
        previous = {id(p): p.requires_grad for p in system.parameters()}
        self._event("phase2_start", "phase2", 0)
        try:
            system.transfer = None  # shared experts are frozen: affinity would be meaningless
            if not bool(model._cgc_frozen):
                model.set_cgc_frozen(True)
                self._event("cgc_frozen_epoch", "phase2", 0)
            model.init_cluster_heads()
            groups = model.parameter_groups()
            trainable = set(t.phase2_trainable) | (set() if t.freeze_shared_in_phase2 else {"shared"})
            for gname, params in groups.items():
                for p in params:
                    p.requires_grad_(gname in trainable)
            for p in system.criterion.parameters():  # uncertainty weights keep their Phase 1 values
                p.requires_grad_(False)
            self._fit("phase2", t.cluster_finetune_epochs, t.phase2_warmup_steps, use_cluster_heads=True)
        finally:
            system.transfer = backup
            for p in system.parameters():
                p.requires_grad_(previous[id(p)])
            if bool(model._cgc_frozen):
                model.set_cgc_frozen(True)

    def final_metrics(self, use_cluster_heads: bool) -> dict[str, Any]:
        return evaluate(self.system, self.val_data, use_cluster_heads=use_cluster_heads,
                        batch_size=max(self.cfg.training.batch_size, EVAL_BATCH_MIN), by_cluster=True)
