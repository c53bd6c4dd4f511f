"""The CGC mixture (ple_adatt.mixture): the fused Triton kernels against the PyTorch form.

On the CPU the kernels run under Triton's interpreter (switched on by tests/conftest.py);
tests/core/test_gpu.py runs them compiled, in bf16. Skipped where triton is not installed
(make setup installs it)."""

from __future__ import annotations

import pytest
import torch
from corehelpers import fresh_guard, reset_guard

from ple_adatt import mixture

pytest.importorskip("triton", reason="triton is not installed (make setup installs it for the interpreter test)")


def _inputs(T, B, D, E, ET, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    gates = torch.softmax(torch.randn(T, B, E + ET, generator=g), -1).requires_grad_()
    shared = torch.randn(E, B, D, generator=g).to(dtype).requires_grad_()
    task = torch.randn(T, ET, B, D, generator=g).to(dtype).requires_grad_() if ET else None
    return gates, shared, task


def _run(fn, gates, shared, task, grad):
    ins = [t for t in (gates, shared, task) if t is not None]
    out = fn(gates, shared, task)
    return (out, *torch.autograd.grad(out, ins, grad))


# odd shapes: rows not a multiple of the block, d not a power of two, no task experts
@pytest.mark.parametrize("T,B,D,E,ET", [(4, 70, 24, 3, 2), (3, 33, 17, 2, 0), (1, 5, 128, 1, 1)])
def test_fused_mixture_equals_the_pytorch_form_forward_and_backward(interpreter, T, B, D, E, ET):
    gates, shared, task = _inputs(T, B, D, E, ET)
    grad = torch.randn(T, B, D, generator=torch.Generator().manual_seed(1))
    fused = _run(mixture.fused_mixture, gates, shared, task, grad)
    ref = _run(mixture.reference_mixture, gates, shared, task, grad)
    assert fused[0].shape == (T, B, D) and len(fused) == len(ref)
    for a, b in zip(fused, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _biases(T, D, E, ET, seed=2):
    g = torch.Generator().manual_seed(seed)
    shared_bias = torch.randn(E, 1, D, generator=g).requires_grad_()
    task_bias = torch.randn(T, ET, 1, D, generator=g).requires_grad_() if ET else None
    return shared_bias, task_bias


def _run_biased(fn, gates, shared, task, shared_bias, task_bias, grad):
    ins = [t for t in (gates, shared, task, shared_bias, task_bias) if t is not None]
    out = fn(gates, shared, task, shared_bias, task_bias)
    return (out, *torch.autograd.grad(out, ins, grad))


@pytest.mark.parametrize("T,B,D,E,ET", [(4, 70, 24, 3, 2), (3, 33, 17, 2, 0), (1, 5, 128, 1, 1)])
def test_experts_biases_added_in_the_fused_mixture_equal_the_pytorch_form(interpreter, T, B, D, E, ET):
    """The experts' last layers may leave their bias to the mixture: the kernels add the bias
    rows as they load each expert and return the biases' gradients (per-block sums)."""
    gates, shared, task = _inputs(T, B, D, E, ET)
    shared_bias, task_bias = _biases(T, D, E, ET)
    grad = torch.randn(T, B, D, generator=torch.Generator().manual_seed(1))
    fused = _run_biased(mixture.fused_mixture, gates, shared, task, shared_bias, task_bias, grad)
    ref = _run_biased(mixture.reference_mixture, gates, shared, task, shared_bias, task_bias, grad)
    assert len(fused) == len(ref) == 4 + (2 if ET else 0)
    for a, b in zip(fused, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # against the formula: the biased mixture is the plain one of biased experts, and a bias's
    # gradient is the sum over the batch of its expert's gradient
    plain = _run(mixture.reference_mixture, gates, shared + shared_bias,
                 None if task is None else task + task_bias, grad)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    d_shared, d_shared_bias = fused[2], fused[3 + (1 if ET else 0)]
    torch.testing.assert_close(d_shared_bias, d_shared.sum(1, keepdim=True), rtol=1e-4, atol=1e-4)
    if ET:
        torch.testing.assert_close(fused[5], fused[3].sum(2, keepdim=True), rtol=1e-4, atol=1e-4)


def test_bf16_experts_with_float32_biases_give_float32_bias_gradients(interpreter):
    gates, shared, task = _inputs(3, 50, 16, 2, 2, dtype=torch.bfloat16)
    shared_bias, task_bias = _biases(3, 16, 2, 2)
    grad = torch.randn(3, 50, 16).bfloat16()
    fused = _run_biased(mixture.fused_mixture, gates, shared, task, shared_bias, task_bias, grad)
    ref = _run_biased(mixture.reference_mixture, gates, shared, task, shared_bias, task_bias, grad)
    assert [t.dtype for t in fused] == [torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16,
                                        torch.float32, torch.float32]
    # relative to each result's largest value (as the first-use check on the GPU): the 3.9
    # interpreter rounds float32 -> bf16 by truncation, where the GPU (and PyTorch) round to
    # nearest, and the biased experts are rounded to bf16 once more than the unbiased ones
    for a, b in zip(fused, ref):
        assert float((a.float() - b.float()).abs().max()) <= 1e-2 * float(b.float().abs().max())


@pytest.mark.parametrize("which,message", [
    ("task-only", "task_bias without shared_bias"),
    ("shared-only", r"task_bias is None; with shared_bias the task experts need their biases too, \(2, 1, 1, 4\)"),
    ("wrong-shape", r"shared_bias has shape \(2, 4\); the shared experts need \(2, 1, 4\)"),
])
def test_mismatched_expert_biases_are_named_on_either_path(interpreter, which, message):
    gates, shared, task = _inputs(2, 8, 4, 2, 1)
    shared_bias, task_bias = _biases(2, 4, 2, 1)
    biases = {"task-only": (None, task_bias), "shared-only": (shared_bias, None),
              "wrong-shape": (shared_bias.view(2, 4), task_bias)}[which]
    for fn in (mixture.fused_mixture, mixture.reference_mixture, mixture.gated_mixture):
        with pytest.raises(ValueError, match=message):
            fn(gates, shared, task, *biases) if fn is not mixture.gated_mixture else fn(gates, shared, task, True,
                                                                                        *biases)


def test_the_mixture_is_the_gate_weighted_sum_of_experts(interpreter):
    """Against the formula itself, not the other implementation: one-hot gates pick an expert."""
    T, B, D, E, ET = 2, 40, 8, 2, 1
    _, shared, task = _inputs(T, B, D, E, ET)
    pick = torch.tensor([1, 2])  # task 0 takes shared expert 1, task 1 its own task expert
    gates = torch.nn.functional.one_hot(pick, E + ET).float()[:, None, :].expand(T, B, E + ET).contiguous()
    out = mixture.fused_mixture(gates, shared.detach(), task.detach())
    torch.testing.assert_close(out[0], shared[1].detach())
    torch.testing.assert_close(out[1], task[1, 0].detach())


def test_bf16_experts_give_a_bf16_mixture_from_float32_gates(interpreter):
    """As on CUDA under autocast: float32 gates (softmax), bf16 experts, a bf16 result."""
    gates, shared, task = _inputs(3, 50, 16, 2, 2, dtype=torch.bfloat16)
    grad = torch.randn(3, 50, 16).bfloat16()
    fused = _run(mixture.fused_mixture, gates, shared, task, grad)
    ref = _run(mixture.reference_mixture, gates, shared, task, grad)
    assert [t.dtype for t in fused] == [torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16]
    for a, b in zip(fused, ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_gated_mixture_takes_pytorch_on_the_cpu_and_where_switched_off(monkeypatch):
    calls = []
    monkeypatch.setattr(mixture, "fused_mixture", lambda *a: calls.append(1))
    gates, shared, task = _inputs(2, 8, 4, 2, 1)
    out = mixture.gated_mixture(gates, shared, task)  # CPU: not available
    monkeypatch.setattr(mixture, "fused_available", lambda device: True)
    mixture.gated_mixture(gates, shared, task, fused=False)  # training.fused_mixture: false
    assert calls == [] and out.shape == (2, 8, 4)


def test_a_wrong_or_failing_kernel_is_switched_off_after_its_first_use(monkeypatch, caplog):
    """Where the kernel runs (made 'available' here), its first result is checked against the
    PyTorch form; a mismatch or an error costs speed, never a wrong model."""
    fresh_guard(monkeypatch, mixture)
    calls = []

    def wrong(gates, shared, task, *biases):
        calls.append(1)
        return mixture.reference_mixture(gates, shared.flip(1), task)  # rows scrambled

    monkeypatch.setattr(mixture, "fused_mixture", wrong)
    gates, shared, task = _inputs(2, 8, 4, 2, 1)
    with caplog.at_level("WARNING"):
        out = mixture.gated_mixture(gates, shared, task)
    torch.testing.assert_close(out, mixture.reference_mixture(gates, shared, task))
    assert mixture.failed() and "differs from the PyTorch form" in caplog.text
    mixture.gated_mixture(gates, shared, task)
    assert len(calls) == 1  # checked once, then off

    reset_guard(monkeypatch, mixture.GUARD, checked=True)

    def broken(*args):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(mixture, "fused_mixture", broken)
    with caplog.at_level("WARNING"):
        out = mixture.gated_mixture(gates, shared, task)
    torch.testing.assert_close(out, mixture.reference_mixture(gates, shared, task))
    assert mixture.failed() and "PTX assembly failed" in caplog.text


def test_without_autograd_the_pytorch_form_runs_until_the_first_use_check_has(interpreter, monkeypatch):
    """The check compares gradients too: under no_grad or inference_mode (serving) before any
    training step, the PyTorch form runs and the check waits; it must not switch the kernel off."""
    fresh_guard(monkeypatch, mixture)
    gates, shared, task = _inputs(2, 20, 8, 2, 1)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            out = mixture.gated_mixture(gates, shared, task)
        torch.testing.assert_close(out, mixture.reference_mixture(gates, shared, task).detach())
    assert not mixture.GUARD.checked and not mixture.failed()
    mixture.gated_mixture(gates, shared, task)  # with autograd: checked, and on
    assert mixture.GUARD.checked and not mixture.failed()
    with torch.no_grad():
        out = mixture.gated_mixture(gates, shared, task)
    assert out.grad_fn is None and torch.allclose(out, mixture.reference_mixture(gates, shared, task))


def test_a_correct_kernel_passes_the_first_use_check(interpreter, monkeypatch):
    fresh_guard(monkeypatch, mixture)
    gates, shared, task = _inputs(3, 40, 12, 2, 2)
    state = torch.get_rng_state()
    out = mixture.gated_mixture(gates, shared, task)
    assert torch.equal(torch.get_rng_state(), state)  # the training's random stream is untouched
    assert mixture.GUARD.checked and not mixture.failed()
    assert out.grad_fn is not None and "FusedMixture" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, mixture.reference_mixture(gates, shared, task))


def test_a_gate_count_that_does_not_match_the_experts_is_named(interpreter):
    gates, shared, task = _inputs(2, 8, 4, 2, 1)
    with pytest.raises(ValueError, match="gates have 3 columns for 3 shared and 1 task experts"):
        mixture.fused_mixture(gates, torch.cat([shared, shared[:1]]), task)


def test_the_model_trains_the_same_through_the_fused_mixture(interpreter, monkeypatch):
    """The model's trunk through the kernels (made 'available' on the CPU, interpreted) gives
    the PyTorch trunk's outputs and parameter gradients."""
    from corehelpers import forward_with_distinct_heads

    reset_guard(monkeypatch, mixture.GUARD, checked=True)  # no first-use check: compare directly
    results = []
    for fused in (True, False):
        monkeypatch.setattr(mixture, "fused_available", lambda device, fused=fused: fused)
        system, out, lo = forward_with_distinct_heads(70)
        assert ("FusedMixture" in type(out.cgc_out.grad_fn).__name__) == fused
        lo.weighted.sum().backward()
        results.append((out.out.detach(), {n: p.grad for n, p in system.named_parameters() if p.grad is not None}))
    (out_f, grads_f), (out_r, grads_r) = results
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_r.keys() and any("task_expert_attention" in n for n in grads_f)
    for name in grads_r:
        torch.testing.assert_close(grads_f[name], grads_r[name], rtol=1e-4, atol=1e-6, msg=name)


def test_an_out_of_memory_error_is_raised_and_leaves_the_kernels_on(monkeypatch):
    """An OOM is the batch's problem (the trainer skips it): it must not switch the kernels off
    for every later run in the process (compare trains all strategies in one)."""
    reset_guard(monkeypatch, mixture.GUARD, checked=True)
    monkeypatch.setattr(mixture, "fused_available", lambda device: not mixture.failed())

    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(mixture, "fused_mixture", oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        mixture.gated_mixture(*_inputs(2, 8, 4, 2, 1))
    assert not mixture.failed()


def test_the_config_switch_reaches_models_rebuilt_outside_a_trainer():
    from pathlib import Path

    from corehelpers import BATCH_SPECS

    from ple_adatt.config import load_train_config
    from ple_adatt.training import build_system

    cfg = Path(__file__).resolve().parents[2] / "configs/train/cpu_small.yaml"
    for value in (True, False):
        train_cfg = load_train_config(cfg, [f"training.fused_mixture={str(value).lower()}"])
        assert build_system(train_cfg, BATCH_SPECS, 5, [4, 4], 3).model.fused_mixture is value


def test_a_batch_past_the_mixture_kernels_32_bit_offsets_is_refused_by_name(interpreter):
    # meta tensors: the shapes without the 4 GB (16 tasks, 2 task experts, 524288 rows, d 256)
    T, B, D, E, ET = 16, 524288, 256, 4, 2
    gates = torch.empty(T, B, E + ET, device="meta")
    with pytest.raises(ValueError, match="batch 524288 too large for the fused CGC mixture's 32-bit offsets"):
        mixture.fused_mixture(gates, torch.empty(E, B, D, device="meta"), torch.empty(T, ET, B, D, device="meta"))
