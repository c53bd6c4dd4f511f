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
from corehelpers import BATCH_SPECS, distinct_task_trainer, fused_runs_here, make_batch

from ple_adatt.training import Trainer, make_optimizer
from ple_adatt.transfer.adatt import TaskAffinityComputer

ROOT = Path(__file__).resolve().parents[2]
SPECS = BATCH_SPECS


def _trainer(in_backward: bool, warmup: int, method: str = "einsum", absent: tuple[int, ...] = (),
             n: int = 256) -> Trainer:
    train = make_batch(n)
    for t in absent:
        train.y[:, t] = float("nan")
    return distinct_task_trainer([f"transfer.measure_in_backward={'true' if in_backward else 'false'}",
                                  f"transfer.adatt.warmup_epochs={warmup}", f"transfer.grad_method={method}"], train)


def _one_step(tr: Trainer, epoch: int) -> torch.Tensor:
    opt, scaler = make_optimizer(tr.system, tr.cfg), tr.make_scaler()
    step = tr.forward_losses(tr.train_data.subset(torch.arange(128)), epoch=epoch, use_cluster_heads=False)
    before = tr.system.transfer.affinity_computer.affinity_matrix.clone()
    tr.backward(step, scaler)
    tr.optimizer_step(opt, scaler)
    return before


@pytest.mark.parametrize("absent", [(), (4,), (1, 3)], ids=["all-labelled", "no-retrieval-label", "two-unlabelled"])
@pytest.mark.parametrize("epoch,warmup", [(0, 1), (1, 0)])  # warmup (no transfer) and dynamic (c_t > 1)
def test_affinity_from_the_training_backward_equals_the_separate_backward(epoch, warmup, absent):
    fast, seed_order = _trainer(True, warmup, absent=absent), _trainer(False, warmup, absent=absent)
    before_fast = _one_step(fast, epoch)
    _one_step(seed_order, epoch)
    a_fast = fast.system.transfer.affinity_computer.affinity_matrix
    a_seed = seed_order.system.transfer.affinity_computer.affinity_matrix
    assert torch.equal(before_fast, torch.eye(5))  # observed after the backward, not before
    assert not torch.allclose(a_fast, torch.eye(5))
    assert torch.isfinite(a_fast).all()
    assert float((a_fast - a_seed).abs().max()) < 1e-5
    for t in absent:  # a task with no label is unrelated to all this step, in both paths
        assert float(a_fast[t].abs().max()) == 0 == float(a_fast[:, t].abs().max())


def _steps(tr: Trainer, epoch: int, steps: int, rows: int, update: bool) -> list[torch.Tensor]:
    """``steps`` consecutive training steps on distinct batches; for the hook path, each
    task's c_t = (caught gradient) / (dL_t/dcgc_t) as measured at that step."""
    model, transfer = tr.system.model, tr.system.transfer
    opt, scaler = make_optimizer(tr.system, tr.cfg), tr.make_scaler()
    scales = []
    for i in range(steps):
        step = tr.forward_losses(tr.train_data.subset(torch.arange(i * rows, (i + 1) * rows)), epoch, False)
        if step.pending is not None:
            d_task = model._cgc_grads(step.losses.weighted, step.losses.present, step.pending[1])
            step.pending[0].clear()  # the hook saw that gradient too: keep only the training backward's
        tr.backward(step, scaler)
        if step.pending is not None:
            assert len(step.pending[0]) == 1
            caught = step.pending[0][0]
            c = (caught * d_task).sum((1, 2)) / d_task.square().sum((1, 2)).clamp_min(1e-30)
            # the hook reads c_t * dL_t/dcgc_t: parallel to the task's own gradient
            torch.testing.assert_close(caught, c.view(-1, 1, 1) * d_task, rtol=1e-4, atol=1e-7)
            scales.append(torch.where(step.losses.present, c, 1.0))
        if update:
            tr.optimizer_step(opt, scaler)
        else:  # parameters (and so the gradients measured) stay the same in both runs
            opt.zero_grad(set_to_none=True)
        tr.global_step += 1
        if i == 0:
            first = transfer.affinity_computer.affinity_matrix.clone()
    assert not torch.allclose(first, transfer.affinity_computer.affinity_matrix, atol=1e-3)  # the EMA moved
    return scales


@pytest.mark.parametrize("method,phase", [("einsum", "warmup"), ("einsum", "dynamic"), ("fused", "dynamic")])
def test_the_hook_path_keeps_the_loop_references_affinity_over_several_steps(method, phase):
    """The training default (measure_in_backward, a batched path fed from the hook) against
    the seed's order and method (separate backward, autograd loop): the EMA-blended affinity
    after several steps, one of them with the retrieval task unlabelled. In the warmup both
    train (the same update: no transfer yet); in the dynamic phase c_t > 1 scales the hook's
    gradients, and the update is left out, because the hook's observation reaches the transfer
    weights one step later than the seed's, which would make the two runs' parameters differ."""
    fused_runs_here(method)
    steps, rows = (3, 16) if method == "fused" else (4, 48)  # the interpreter takes ~1 s a call
    warmup, epoch = (1, 0) if phase == "warmup" else (0, 1)
    hook = _trainer(True, warmup, method, n=steps * rows)
    ref = _trainer(False, warmup, "loop", n=steps * rows)
    for tr in (hook, ref):
        tr.train_data.y[2 * rows:3 * rows, 4] = float("nan")  # step 3: no retrieval label
    assert hook._measure_in_backward(hook.system.transfer) and not ref._measure_in_backward(ref.system.transfer)
    scales = _steps(hook, epoch, steps, rows, update=phase == "warmup")
    assert _steps(ref, epoch, steps, rows, update=phase == "warmup") == []
    assert len(scales) == steps and all(bool((c >= 1 - 1e-5).all()) for c in scales)
    largest = max(float(c.max()) for c in scales)
    if phase == "warmup":
        assert largest < 1 + 1e-5
    else:
        assert largest > 1 + 1e-3  # transfer borrows losses: the hook's gradients are scaled
    a_hook = hook.system.transfer.affinity_computer
    a_ref = ref.system.transfer.affinity_computer
    assert int(a_hook.update_count) == int(a_ref.update_count) == steps
    assert torch.isfinite(a_hook.affinity_matrix).all()
    assert float((a_hook.affinity_matrix - a_ref.affinity_matrix).abs().max()) < 1e-5
    if phase == "warmup":  # both trained the same way
        for p, q in zip(hook.system.parameters(), ref.system.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


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


def test_a_second_gradient_through_the_cgc_outputs_is_refused_not_read_as_the_steps():
    """The hook keeps every gradient that reaches the CGC outputs; only the training backward's
    may be read. Another backward in between (a strategy or a caller measuring on its own) once
    went unnoticed: the first one caught was used."""
    from ple_adatt.errors import TrainingError

    tr = _trainer(True, 0)
    step = tr.forward_losses(tr.train_data.subset(torch.arange(128)), epoch=1, use_cluster_heads=False)
    assert step.pending is not None
    tr.system.model._cgc_grads(step.losses.weighted, step.losses.present, step.pending[1])
    before = tr.system.transfer.affinity_computer.affinity_matrix.clone()
    with pytest.raises(TrainingError, match="2 gradients reached the CGC outputs in one step"):
        tr.backward(step, tr.make_scaler())
    assert torch.equal(tr.system.transfer.affinity_computer.affinity_matrix, before)
