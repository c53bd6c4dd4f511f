"""transfer.measure_stream: adaTT's measurement started from the backward's hook on the CGC
outputs (on CUDA on a second stream, beside the rest of the backward and the optimizer step).

On the CPU there is one stream, so these tests check what makes the overlap safe and the
numbers unchanged: the hook path trains exactly like the measurement read after the backward,
the measurement reads the second layers' weights as of the forward (the optimizer updates them
in place while a side stream would still read them), a second gradient through the CGC outputs
is still refused, and the config names what it needs. tests/core/test_gpu.py runs the real
two-stream version, eagerly and inside CUDA graphs.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from corehelpers import (
    DeferredSideStream,
    distinct_task_trainer,
    forward_with_distinct_heads,
    fused_runs_here,
    make_batch,
    reset_guard,
)

from ple_adatt.config import ConfigError, load_train_config
from ple_adatt.errors import TrainingError
from ple_adatt.side_stream import SideStream
from ple_adatt.training import Trainer, make_optimizer

ROOT = Path(__file__).resolve().parents[2]


def _trainer(stream: bool, method: str = "einsum", n: int = 256) -> Trainer:
    train = make_batch(n)
    train.y[32:64, 4] = float("nan")  # the second step has no retrieval label
    return distinct_task_trainer([f"transfer.measure_stream={'true' if stream else 'false'}",
                                  "transfer.adatt.warmup_epochs=0", f"transfer.grad_method={method}"], train)


def _train(tr: Trainer, steps: int, rows: int) -> list[torch.Tensor]:
    """``steps`` whole training steps in adaTT's dynamic phase; the affinity after each."""
    opt, scaler = make_optimizer(tr.system, tr.cfg), tr.make_scaler()
    seen = []
    for i in range(steps):
        tr.train_step(tr.train_data.subset(torch.arange(i * rows, (i + 1) * rows)), 1, False, opt, scaler)
        tr.global_step += 1
        seen.append(tr.system.transfer.affinity_computer.affinity_matrix.clone())
    return seen


@pytest.mark.parametrize("method", ["einsum", "fused"])
def test_the_measurement_from_the_hook_trains_exactly_like_the_one_after_the_backward(method):
    fused_runs_here(method)
    steps, rows = (2, 16) if method == "fused" else (4, 32)  # the interpreter takes ~1 s a call
    side, after = _trainer(True, method), _trainer(False, method)
    assert side.measure_side is not None and after.measure_side is None
    a_side, a_after = _train(side, steps, rows), _train(after, steps, rows)
    assert side.measure_side.launches == steps and not side.measure_side.pending
    for x, y in zip(a_side, a_after):
        assert torch.equal(x, y)
    assert not torch.allclose(a_side[-1], torch.eye(5), atol=1e-3)  # it measured
    assert not torch.allclose(a_side[0], a_side[-1], atol=1e-4)  # and the EMA moved
    for (k, p), q in zip(side.system.state_dict().items(), after.system.state_dict().values()):
        assert torch.equal(p, q), k


def test_the_measurement_run_as_late_as_a_side_stream_could_trains_exactly_the_same():
    """The side stream's worst case, replayed on the CPU: the work runs at the join, after the
    rest of the backward and the optimizer step. The affinity and the weights are those of the
    measurement after the backward: nothing it reads was overwritten in between. (That the
    kernel's path reads the weights it is given, as the einsums' does, is tested below.)"""
    steps, rows = 4, 32
    late, after = _trainer(True), _trainer(False)
    late.measure_side = DeferredSideStream()
    a_late, a_after = _train(late, steps, rows), _train(after, steps, rows)
    assert late.measure_side.launches == steps and not late.measure_side.queue
    for x, y in zip(a_late, a_after):
        assert torch.equal(x, y)
    for (k, p), q in zip(late.system.state_dict().items(), after.system.state_dict().values()):
        assert torch.equal(p, q), k


def test_run_late_without_the_weights_copy_the_measurement_reads_the_updated_weights():
    """The negative control: the same late work without the hook's copy of the second layers'
    weights reads them after the optimizer step, and the affinity moves."""
    late, after = _trainer(True), _trainer(False)
    late.measure_side = DeferredSideStream()
    real = late._observe
    late._observe = lambda d_cgc, out, w2=None: real(d_cgc, out, None)  # no copy: the live weights
    a_late, a_after = _train(late, 3, 32), _train(after, 3, 32)
    gap = float((a_late[-1] - a_after[-1]).abs().max())
    assert gap > 1e-6, gap


@pytest.mark.parametrize("method", ["einsum", "batched", "fused"])
def test_the_measurement_reads_the_weights_it_was_given_not_the_updated_ones(method):
    """What keeps a side stream race-free: the hook copies the second layers' weights before
    the fork, and every path of the measurement reads that copy. Here the weights move after
    the copy (as the optimizer step moves them) and the result must not."""
    fused_runs_here(method)
    system, out, lo = forward_with_distinct_heads(32)
    model = system.model
    d_cgc = model._cgc_grads(lo.weighted, lo.present, out)
    w2 = model.shared_experts.stacked_w2()
    before = model.task_gradients_from_cgc(d_cgc, out, method)
    with torch.no_grad():
        for e in model.shared_experts.experts.values():
            e.w2.mul_(-2.0)
    moved = model.task_gradients_from_cgc(d_cgc, out, method)
    kept = model.task_gradients_from_cgc(d_cgc, out, method, w2)
    assert not torch.allclose(moved, before)  # the weights matter to it...
    assert torch.equal(kept, before)  # ...and the copy is what it read


def test_a_second_gradient_through_the_cgc_outputs_is_refused_from_the_hook():
    tr = _trainer(True)
    opt, scaler = make_optimizer(tr.system, tr.cfg), tr.make_scaler()
    step = tr.forward_losses(tr.train_data.subset(torch.arange(32)), 1, False)
    tr.system.model._cgc_grads(step.losses.weighted, step.losses.present, step.pending[1])  # a caller's own
    with pytest.raises(TrainingError, match="2 gradients reached the CGC outputs in one step"):
        tr.backward(step, scaler)
    opt.zero_grad(set_to_none=True)


def test_measure_stream_needs_the_measurement_in_the_backward():
    with pytest.raises(ConfigError, match=r"transfer.measure_stream.*needs `transfer.measure_in_backward: true`"):
        load_train_config(ROOT / "configs/train/cpu_small.yaml",
                          ["transfer.measure_stream=true", "transfer.measure_in_backward=false"])


def test_off_cuda_the_side_stream_runs_the_work_at_once_in_order():
    side = SideStream(torch.device("cpu"))
    order: list[str] = []
    side.launch(lambda: order.append("work"), [torch.zeros(1)])
    order.append("after")
    side.join()
    assert order == ["work", "after"] and side.launches == 1 and not side.pending


@pytest.mark.parametrize("stream", [True, False], ids=["measure_stream", "after-backward"])
def test_a_measuring_steps_output_is_freed_after_the_step(stream):
    """The hook lives on cgc_out's autograd node, which the step's output holds: a hook that
    held the output strongly made a cycle through C++ that the garbage collector cannot see,
    and every measuring step's activations stayed alive (about 270 MiB at the seed's shape)."""
    tr = _trainer(stream)
    opt, scaler = make_optimizer(tr.system, tr.cfg), tr.make_scaler()
    refs = []
    for i in range(3):
        step = tr.forward_losses(tr.train_data.subset(torch.arange(i * 32, (i + 1) * 32)), 1, False)
        refs.append(weakref.ref(step.pending[1]))
        tr.backward(step, scaler)
        tr.optimizer_step(opt, scaler)
        del step
    gc.collect()
    assert [r() for r in refs] == [None] * 3
    assert int(tr.system.transfer.affinity_computer.update_count) == 3  # and each was measured


def test_nothing_is_measured_once_adatts_weights_are_frozen():
    """A frozen adaTT ignores observations, so the trainer takes no per-task gradients then
    (the hook is not even registered) and the affinity stays as it was at the freeze."""
    tr = _trainer(True)
    _train(tr, 2, 32)
    assert tr.measure_now() and tr.measure_side.launches == 2
    assert tr.system.transfer.on_epoch_end(5) == ["adatt_freeze_epoch"]
    frozen_at = tr.system.transfer.affinity_computer.affinity_matrix.clone()
    assert not tr.measure_now()
    opt, scaler = make_optimizer(tr.system, tr.cfg), tr.make_scaler()
    step = tr.forward_losses(tr.train_data.subset(torch.arange(64, 96)), 6, False)
    assert step.pending is None and step.weights is not None  # the frozen weights still transfer
    tr.backward(step, scaler)
    tr.optimizer_step(opt, scaler)
    assert tr.measure_side.launches == 2
    assert torch.equal(tr.system.transfer.affinity_computer.affinity_matrix, frozen_at)


def test_out_of_memory_in_the_per_task_kernel_is_the_batchs_and_leaves_the_kernel_on(monkeypatch):
    """A batch that runs out of memory in the kernel is skipped by the trainer; it must not
    switch the kernel off for the process (the einsum path it would fall back to needs more)."""
    from ple_adatt import kernels

    reset_guard(monkeypatch, kernels.GUARD)

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(kernels, "shared_task_grads", oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        kernels.shared_task_grads_or_none(torch.zeros(1))
    assert not kernels.failed()
