"""The sync-free hot loop on the CPU: after warm-up, a training step must not read a tensor
back to the host. On CUDA each such read (``.item()``, ``float(t)``, ``bool(t)``, ``.cpu()``,
``.tolist()``, ``nonzero``) waits for the device; here they are made to raise, so a read
that creeps into the step fails this test without a GPU. (tests/core/test_gpu.py checks the
same with CUDA's own sync detector.) MGDA's host solver is the documented exception."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from corehelpers import BATCH_SPECS, make_batch

from ple_adatt.config import load_train_config
from ple_adatt.training import Trainer, build_system, make_optimizer

ROOT = Path(__file__).resolve().parents[2]
SPECS = BATCH_SPECS
READS = ["item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__float__", "__int__", "__index__"]


class HostRead(AssertionError):
    pass


@pytest.mark.parametrize("strategy,in_backward", [("adatt", True), ("adatt", False), ("equal", True),
                                                  ("uncertainty", True), ("pcgrad", True), ("mocograd", True),
                                                  ("gradnorm", True)])
def test_a_training_step_reads_nothing_back(strategy, in_backward, monkeypatch):
    cfg = load_train_config(ROOT / "configs/train/cpu_small.yaml", [
        f"transfer.strategy={strategy}", "transfer.grad_interval=1", "transfer.adatt.warmup_epochs=0",
        "transfer.adatt.freeze_epoch=5", f"transfer.measure_in_backward={'true' if in_backward else 'false'}"])
    torch.manual_seed(0)
    system = build_system(cfg, SPECS, 5, [4, 4], 3)
    trainer = Trainer(system, make_batch(512), make_batch(64, seed=1), cfg, torch.device("cpu"), log=lambda m: None)
    trainer.sync_free = True  # the CUDA path
    opt, scaler = make_optimizer(system, cfg, fused=True), trainer.make_scaler()

    def step(i: int) -> None:
        b = trainer.train_data.subset(torch.arange(i * 128, (i + 1) * 128) % 512)
        trainer.backward(trainer.forward_losses(b, epoch=1, use_cluster_heads=False), scaler)
        trainer.optimizer_step(opt, scaler)
        trainer.global_step += 1

    step(0)  # warm-up: optimizer state, lazily sized buffers
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def forbid(name):
        def read(self, *args, **kwargs):
            if self.numel() > 0:
                raise HostRead(f"Tensor.{name} read a {tuple(self.shape)} tensor back to the host during a step")
            return originals[name](self, *args, **kwargs)
        return read

    with monkeypatch.context() as m:
        for name in READS:
            m.setattr(torch.Tensor, name, forbid(name))
        for i in range(1, 4):
            step(i)
    assert all(torch.isfinite(p).all() for p in system.parameters())


def test_evaluation_runs_the_model_once_per_batch_and_predicts_what_predict_does(monkeypatch):
    """Validation metrics come from the same forward as the validation loss (it ran twice)."""
    from ple_adatt.metrics import task_metrics
    from ple_adatt.training import evaluate

    cfg = load_train_config(ROOT / "configs/train/cpu_small.yaml")
    torch.manual_seed(0)
    system = build_system(cfg, SPECS, 5, [4, 4], 3)
    data = make_batch(300)
    model = system.model
    calls = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    got = evaluate(system, data, use_cluster_heads=False, batch_size=128)
    assert len(calls) == 3  # 300 rows in batches of 128
    monkeypatch.setattr(type(model), "forward", forward)
    system.eval()
    with torch.no_grad():
        preds = model.predict(data.x_num, data.x_cat, data.cluster, use_cluster_heads=False)
    compared = 0
    for i, h in enumerate(model.heads):
        if h.type in ("binary", "multiclass", "regression"):
            want = task_metrics(h.type, preds[h.name].float(), data.y[:, i])
            for key, value in want.items():
                if isinstance(value, float) and value == value:
                    assert got["tasks"][h.name][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (h.name, key)
                    compared += 1
    assert compared >= 3
