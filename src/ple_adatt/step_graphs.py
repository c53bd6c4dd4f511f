"""Whole-step CUDA graphs (``training.cuda_graph``).

At the seed's shape an eager training step launches a few thousand small kernels; on an
H100 their launch cost, not the arithmetic, sets the step time. A CUDA graph records one
whole step -- the batch gather, forward, losses, task transfer, backward, the per-task
gradient measurement, clipping and the fused AdamW update -- and replays it with one launch.

What makes a step replayable, and how this module keeps to it:

* **No host reads.** The step is sync-free already (``tests/core/test_no_host_reads.py``).
* **State updated in place.** A replay re-runs the recorded kernels on the addresses they
  saw at capture; a tensor that the step *rebinds* goes stale. Parameters, optimizer state,
  the affinity EMA and the grad scaler are all updated in place
  (``tests/core/test_step_graphs.py`` replays recorded steps on the CPU to check it).
* **Host values are baked in.** The adaTT phase, its prior blend ratio and the learning rate
  are Python floats read at capture, so graphs are captured again every epoch (the scheduler
  and the adaTT schedule move per epoch). A measuring step (``grad_interval``) and a plain
  step are different programs: one graph each.
* **Static inputs.** The batch's row indices are copied into one static buffer; the gather
  from the device-resident training split happens inside the graph. The step's outputs
  (losses for the epoch sums) are copied into static buffers the trainer reads after replay.
  A last, smaller batch of an epoch runs eagerly.
* **Warm-up before capture.** Each kind of step first runs eagerly (on a side stream, as
  PyTorch's recipe asks) so lazy initialisation -- cuBLAS workspaces, the fused kernel's
  autotuning and its first-use check, torch.compile -- never happens inside a capture.

Only torch is needed here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .training import Trainer

__all__ = ["StepOut", "GraphBackend", "CudaGraphBackend", "StepGraphs"]


class StepOut(NamedTuple):
    """What one training step leaves for the epoch's sums (all on the device)."""

    raw: Tensor  # (T,) raw task losses, zero where a task has no target in the batch
    present: Tensor  # (T,) float, 1 where the task has a target
    enhanced: Tensor  # (T,) after the strategy
    weighted: Tensor  # (T,) after fixed / uncertainty weighting
    total: Tensor  # () the back-propagated loss
    finite: Tensor  # () bool: False when the step was skipped on the device
    weights: Tensor | None  # (T, T) adaTT transfer weights, None when none were used


class GraphBackend(Protocol):
    """How a step function is warmed up and captured. ``executes_on_capture``: whether
    capturing also ran the step (a CUDA capture only records it)."""

    executes_on_capture: bool

    def warmup(self, fn: Callable[[], None]) -> None: ...

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]: ...


class CudaGraphBackend:
    """torch.cuda graphs: warm-up on a side stream, capture into a private memory pool."""

    executes_on_capture = False

    def warmup(self, fn: Callable[[], None]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay  # the bound method keeps the graph (and its memory pool) alive


class StepGraphs:
    """Captures and replays whole training steps for one phase of :class:`Trainer`.

    ``step(idx, epoch, use_cluster_heads, measure)`` trains on the rows ``idx`` (a full batch
    of ``batch_size``) and returns the step's :class:`StepOut` in static buffers, valid until
    the next call. ``warmup_steps`` eager runs of each kind precede its first capture; after an
    epoch change one eager run does (lazy initialisation is done by then, but a new adaTT
    phase may run code that has not run before).
    """

    def __init__(self, trainer: Trainer, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 batch_size: int, backend: GraphBackend, *, warmup_steps: int = 3):
        self.trainer, self.opt, self.scaler, self.backend = trainer, opt, scaler, backend
        self.batch_size = batch_size
        self.warmup_steps = warmup_steps
        device = trainer.device
        T = trainer.system.model.num_tasks
        self.static_idx = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.out = StepOut(torch.zeros(T, device=device), torch.zeros(T, device=device),
                           torch.zeros(T, device=device), torch.zeros(T, device=device),
                           torch.zeros((), device=device), torch.ones((), dtype=torch.bool, device=device),
                           torch.zeros(T, T, device=device))
        self._graphs: dict[bool, Callable[[], None]] = {}
        self._has_weights: dict[bool, bool] = {}
        self._runs: Counter[bool] = Counter()  # eager runs of each kind, ever
        self._epoch_runs: Counter[bool] = Counter()  # ... since its graph was last dropped
        self._ever_captured: set[bool] = set()
        self._key: tuple[int, bool] | None = None
        self.captures = 0  # graphs captured so far (for logs and tests)
        self._said_eager = False

    def capturable(self) -> bool:
        """Whether the strategy's steps can be captured now: not where a step must read on the
        host (MGDA once its device solver is switched off, or until its first-use check has run).
        Those steps then run eagerly; the trainer asks before every full batch, and the first
        refusal with a reason is logged."""
        transfer = self.trainer.system.transfer
        can = getattr(transfer, "capturable", None)
        if can is None or can(self.trainer.device):
            return True
        reason = getattr(transfer, "host_reason", None)
        why = reason() if reason is not None else "its steps read on the host"
        if why is not None and not self._said_eager:  # None: a pass, nothing to report
            self._said_eager = True
            self.trainer.log(f"  note: training.cuda_graph: {transfer.name}'s steps run eagerly ({why})")
        return False

    def step(self, idx: Tensor, epoch: int, use_cluster_heads: bool, measure: bool) -> StepOut:
        if idx.shape[0] != self.batch_size:
            raise ValueError(f"StepGraphs replays batches of {self.batch_size} rows, got {idx.shape[0]}")
        key = (epoch, use_cluster_heads)
        if key != self._key:  # host values baked into the graphs moved: capture again
            self._graphs.clear()
            self._epoch_runs.clear()
            self._key = key
        self.static_idx.copy_(idx)
        replay = self._graphs.get(measure)
        if replay is not None:
            replay()
        else:
            fn = self._step_fn(epoch, use_cluster_heads, measure)
            if measure in self._ever_captured:
                ready = self._epoch_runs[measure] >= 1
            else:
                ready = self._runs[measure] >= self.warmup_steps
            if not ready:
                self.backend.warmup(fn)
                self._runs[measure] += 1
                self._epoch_runs[measure] += 1
            else:
                try:
                    replay = self.backend.capture(fn)
                except Exception as exc:
                    kind = "measuring" if measure else "plain"
                    raise RuntimeError(
                        f"training.cuda_graph: capturing the {kind} training step failed (epoch {epoch + 1}): "
                        f"{type(exc).__name__}: {exc}. Set training.cuda_graph: false to train without graphs"
                    ) from exc
                self._graphs[measure] = replay
                self._ever_captured.add(measure)
                self.captures += 1
                if not self.backend.executes_on_capture:
                    replay()  # a CUDA capture only recorded the step: run it for this batch
        o = self.out
        return o._replace(weights=o.weights if self._has_weights.get(measure) else None)

    def _step_fn(self, epoch: int, use_cluster_heads: bool, measure: bool) -> Callable[[], None]:
        trainer, out = self.trainer, self.out

        def fn() -> None:
            b = trainer.train_data.subset(self.static_idx)  # the gather is part of the graph
            so = trainer.train_step(b, epoch, use_cluster_heads, self.opt, self.scaler, measure=measure)
            with torch.no_grad():
                for dst, src in zip(out[:6], so[:6]):
                    dst.copy_(src)
                if so.weights is not None:
                    out.weights.copy_(so.weights)
            self._has_weights[measure] = so.weights is not None  # host side: set at capture

        return fn
