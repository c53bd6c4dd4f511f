"""transfer.measure_in_backward: adaTT's per-task gradients read from the training backward.

The training backward's gradient at the CGC outputs is c_t * dL_t/dcgc_t with c_t >= 1
(1 + the transfer weights that borrow task t's loss), so each task's gradient on the shared
experts is scaled by c_t and the affinity's cosines are unchanged. One backward through the
heads instead of two.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from corehelpers import BATCH_SPECS, make_batch

from ple_adatt.config import load_train_config
from ple_adatt.training import Trainer, build_system, make_optimizer
from ple_adatt.transfer.adatt import TaskAffinityComputer

ROOT = Path(__file__).resolve().parents[2]
SPECS = BATCH_SPECS


def _trainer(in_backward: bool, warmup: int) -> Trainer:
    cfg = load_train_config(ROOT / "configs/train/cpu_small.yaml", [
        f"transfer.measure_in_backward={'true' if in_backward else 'false'}", "transfer.grad_interval=1",
        f"transfer.adatt.warmup_epochs={warmup}", "transfer.adatt.freeze_epoch=5", "transfer.grad_method=einsum"])
    torch.manual_seed(0)
    system = build_system(cfg, SPECS, 5, [4, 4], 3)
    system.model.tower_dropout.p = 0.0
    with torch.no_grad():
        system.model.head.weight.normal_(0.0, 0.5)  # distinct task gradients
    return Trainer(system, make_batch(256), make_batch(64, seed=1), cfg, torch.device("cpu"), log=lambda m: None)


def _one_step(tr: Trainer, epoch: int) -> torch.Tensor:
    opt, scaler = make_optimizer(tr.system, tr.cfg), tr.make_scaler()
    step = tr.forward_losses(tr.train_data.subset(torch.arange(128)), epoch=epoch, use_cluster_heads=False)
    before = tr.system.transfer.affinity_computer.affinity_matrix.clone()
    tr.backward(step, scaler)
    tr.optimizer_step(opt, scaler)
    return before


@pytest.mark.parametrize("epoch,warmup", [(0, 1), (1, 0)])  # warmup (no transfer) and dynamic (c_t > 1)
def test_affinity_from_the_training_backward_equals_the_separate_backward(epoch, warmup):
    fast, seed_order = _trainer(True, warmup), _trainer(False, warmup)
    before_fast = _one_step(fast, epoch)
    _one_step(seed_order, epoch)
    a_fast = fast.system.transfer.affinity_computer.affinity_matrix
    a_seed = seed_order.system.transfer.affinity_computer.affinity_matrix
    assert torch.equal(before_fast, torch.eye(5))  # observed after the backward, not before
    assert not torch.allclose(a_fast, torch.eye(5))
    assert float((a_fast - a_seed).abs().max()) < 1e-5


def test_gradient_methods_keep_the_separate_backward():
    tr = _trainer(True, 0)
    assert tr._measure_in_backward(tr.system.transfer)
    for name in ("pcgrad", "mocograd", "mgda", "gradnorm"):
        from ple_adatt.transfer import build_strategy

        strategy = build_strategy([s.name for s in SPECS], tr.cfg.transfer.__class__(strategy=name))
        assert not tr._measure_in_backward(strategy), name


def test_a_non_finite_observation_leaves_the_affinity_alone():
    comp = TaskAffinityComputer(["a", "b"])
    comp.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    state = comp.affinity_matrix.clone(), int(comp.update_count)
    comp.update(torch.tensor([[float("nan"), 0.0], [1.0, 1.0]]))
    assert torch.equal(comp.affinity_matrix, state[0]) and int(comp.update_count) == state[1]
