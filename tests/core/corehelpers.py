"""Tensors for the training-core tests."""

from __future__ import annotations

import torch

from ple_adatt.config import TaskSpec
from ple_adatt.data.dataset import TensorData

# the tasks of make_batch's five target columns
BATCH_SPECS = [TaskSpec("ctr", "a", "binary"), TaskSpec("cvr", "b", "binary"), TaskSpec("kind", "c", "multiclass", 3),
               TaskSpec("ltv", "d", "regression"), TaskSpec("brand", "e", "retrieval", vocab_size=20)]


def make_batch(n: int = 64, seed: int = 0, clusters: int = 3) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    x_num = torch.randn(n, 5, generator=g)
    x_cat = torch.randint(0, 4, (n, 2), generator=g)
    y = torch.stack([
        (x_num[:, 0] > 0).float(),
        (x_num[:, 1] > 0).float(),
        torch.randint(0, 3, (n,), generator=g).float(),
        x_num[:, 2] * 3 + 10,
        torch.randint(0, 20, (n,), generator=g).float(),
    ], dim=1)
    y[::4, 1] = float("nan")  # cvr missing on a quarter of the rows
    cluster = torch.randint(0, clusters + 1, (n,), generator=g)  # value `clusters` = unknown
    return TensorData(x_num, x_cat, y, cluster)


def forward_with_distinct_heads(n: int, device: str = "cpu", amp: bool = False, absent: tuple[int, ...] = ()):
    """The cpu_small system on BATCH_SPECS with wide random heads (so the tasks' gradients
    differ), one forward and its losses: (system, model output, LossOutput). The tasks in
    ``absent`` have no label in the batch."""
    from pathlib import Path

    import torch

    from ple_adatt.config import load_train_config
    from ple_adatt.training import build_system

    cfg = load_train_config(Path(__file__).resolve().parents[2] / "configs/train/cpu_small.yaml")
    torch.manual_seed(0)
    system = build_system(cfg, BATCH_SPECS, 5, [4, 4], 3).to(device)
    torch.nn.init.normal_(system.model.head.weight, std=0.5)
    b = make_batch(n)
    for t in absent:
        b.y[:, t] = float("nan")
    b = b.to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device == "cuda"):
        out = system.model(b.x_num, b.x_cat, b.cluster)
        lo = system.losses(out.out, b.y)
    return system, out, lo


def reset_guard(monkeypatch, guard, checked: bool = False) -> None:
    """A kernel guard on, as a new process finds it (not yet checked), or marked ``checked`` so
    that a test compares the kernel with the reference itself."""
    monkeypatch.setattr(guard, "failures", [])
    monkeypatch.setattr(guard, "checked", checked)
    monkeypatch.setattr(guard, "kinds", set())


def fresh_guard(monkeypatch, module, available=None) -> None:
    """A kernel module (ple_adatt.mixture, towers, relu_dgrad) with its guard as a new process
    finds it (on, not yet checked) and ``fused_available`` made to say yes while the guard is on
    (or ``available``): its fallback logic runs on the CPU."""
    reset_guard(monkeypatch, module.GUARD)
    monkeypatch.setattr(module, "fused_available", available or (lambda device: not module.failed()))


def fused_runs_here(method: str) -> None:
    """Skip a ``fused`` case unless the Triton interpreter runs it here (CPU only; the GPU
    tests run the compiled kernel)."""
    if method != "fused":
        return
    import pytest

    pytest.importorskip("triton", reason="triton is not installed (make setup installs it for the interpreter)")
    from ple_adatt import kernels

    if torch.cuda.is_available() or not kernels.interpreted():
        pytest.skip("interpreter test (CPU only); tests/core/test_gpu.py runs the compiled kernel")


def distinct_task_trainer(overrides: list[str], train: TensorData):
    """A CPU Trainer of the cpu_small system on BATCH_SPECS that measures every step, adaTT
    frozen only at epoch 5, without dropout and with wide random heads (so the tasks'
    gradients differ), on ``train`` (validation: make_batch(64, seed=1))."""
    from pathlib import Path

    from ple_adatt.config import load_train_config
    from ple_adatt.training import Trainer, build_system

    cfg = load_train_config(Path(__file__).resolve().parents[2] / "configs/train/cpu_small.yaml",
                            ["transfer.grad_interval=1", "transfer.adatt.freeze_epoch=5", *overrides])
    torch.manual_seed(0)
    system = build_system(cfg, BATCH_SPECS, 5, [4, 4], 3)
    system.model.tower_dropout.p = 0.0
    with torch.no_grad():
        system.model.head.weight.normal_(0.0, 0.5)  # distinct task gradients
    return Trainer(system, train, make_batch(64, seed=1), cfg, torch.device("cpu"), log=lambda m: None)


class DeferredSideStream:
    """A stand-in for :class:`ple_adatt.side_stream.SideStream` on the CPU that runs the work as
    late as a second CUDA stream ever could: at the join. The work then reads its inputs after
    the rest of the backward and the optimizer step, so an input that the step overwrites in
    place and that the hook did not copy gives another result, in order and every time (on a
    GPU that race shows only when the side stream happens to run late)."""

    stream = None

    def __init__(self) -> None:
        self.pending = False
        self.launches = 0
        self.queue: list = []

    def launch(self, work, inputs) -> None:
        self.launches += 1
        self.queue.append(work)
        self.pending = True

    def join(self) -> None:
        while self.queue:
            self.queue.pop(0)()
        self.pending = False
