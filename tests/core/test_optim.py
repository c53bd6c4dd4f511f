"""Optimizer, scheduler and gradient accumulation (seed sections 10, 12.5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from corehelpers import make_batch

from ple_adatt.config import TaskSpec, load_train_config
from ple_adatt.training import Trainer, build_system, make_optimizer, make_scheduler

ROOT = Path(__file__).resolve().parents[2]
SPECS = [TaskSpec("ctr", "a", "binary"), TaskSpec("cvr", "b", "binary"), TaskSpec("ltv", "c", "regression")]


def system_for(overrides):
    cfg = load_train_config(ROOT / "configs/train/cpu_small.yaml", overrides)
    torch.manual_seed(0)
    return cfg, build_system(cfg, SPECS, 5, [4, 4], 3)


def test_per_expert_learning_rates_make_their_own_param_groups():
    cfg, system = system_for(["training.expert_lr={expert_1: {lr: 0.0001, weight_decay: 0.0}}"])
    opt = make_optimizer(system, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"default", "expert_1"}
    assert groups["expert_1"]["lr"] == 0.0001 and groups["expert_1"]["weight_decay"] == 0.0
    e1 = {id(p) for p in system.model.shared_experts.experts["expert_1"].parameters()}
    assert {id(p) for p in groups["expert_1"]["params"]} == e1
    assert not e1 & {id(p) for p in groups["default"]["params"]}
    n_trainable = sum(1 for p in system.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_trainable


def test_the_cpu_takes_the_fused_adamw_and_it_updates_as_the_default_one():
    """One fused call per step instead of a loop over the tensors (CPU step time); the same update."""
    cfg, system = system_for([])
    _, copy = system_for([])
    fused, looped = make_optimizer(system, cfg), torch.optim.AdamW(
        [p for p in copy.parameters() if p.requires_grad], lr=cfg.training.learning_rate,
        weight_decay=cfg.training.weight_decay)
    assert fused.param_groups[0]["fused"] and not looped.param_groups[0]["fused"]
    assert not make_optimizer(system, cfg, capturable=True).param_groups[0]["fused"]  # graphs: their own path
    trainable = [p for p in system.parameters() if p.requires_grad]
    for _ in range(3):
        for a, b in zip(trainable, [p for p in copy.parameters() if p.requires_grad], strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fused.step()
        looped.step()
    for a, b in zip(trainable, [p for p in copy.parameters() if p.requires_grad], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_expert_in_expert_lr_is_a_config_error():
    from ple_adatt.config import ConfigError

    with pytest.raises(ConfigError, match=r"`training.expert_lr.nope` names no shared expert"):
        system_for(["training.expert_lr={nope: {lr: 0.1}}"])


def test_linear_warmup_then_cosine_warm_restarts_per_epoch():
    cfg, system = system_for(["training.learning_rate=1.0", "training.cosine_t0=4", "training.cosine_t_mult=1"])
    opt = make_optimizer(system, cfg)
    sched = make_scheduler(opt, cfg, warmup_epochs=2)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warmup: 0.1, 0.55 ; cosine restarts every 4 epochs: 1, cos(pi/4)..., back to 1
    import math

    cos = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx([0.1, 0.55] + cos + cos[:2])


def test_gradient_accumulation_steps_the_optimizer_every_n_batches(monkeypatch):
    cfg, system = system_for(["training.shared_expert_epochs=1", "training.batch_size=10",
                              "training.gradient_accumulation_steps=3", "transfer.adatt.warmup_epochs=0",
                              "transfer.adatt.freeze_epoch=1"])
    data = make_batch(70)
    data.y = data.y[:, [0, 1, 3]]
    val = make_batch(20, seed=1)
    val.y = val.y[:, [0, 1, 3]]
    steps = []
    original = torch.optim.AdamW.step

    def counting_step(self, *a, **k):
        steps.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    Trainer(system, data, val, cfg, torch.device("cpu"), log=lambda m: None).run_phase1()
    assert len(steps) == 3  # 7 batches -> steps after batches 3, 6 and the last one
