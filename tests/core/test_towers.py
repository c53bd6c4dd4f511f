"""The towers' fused bias+ReLU layer (ple_adatt.towers): the Triton kernels against the PyTorch
form and against the formula. On the CPU the kernels run under Triton's interpreter (switched on
by tests/conftest.py); tests/core/test_gpu.py runs them compiled, in bf16. Skipped where triton is
not installed (make setup installs it)."""

from __future__ import annotations

import pytest
import torch
from corehelpers import fresh_guard, reset_guard

from ple_adatt import towers

pytest.importorskip("triton", reason="triton is not installed (make setup installs it for the interpreter test)")


def _inputs(G, B, d, h, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cgc = torch.randn(G, B, d, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(G, d, h, generator=g) / d ** 0.5).requires_grad_()
    bias = torch.randn(G, 1, h, generator=g).requires_grad_()
    return cgc, weight, bias


def _run(fn, args, grad):
    out = fn(*args)
    return (out, *torch.autograd.grad(out, args, grad))


# odd shapes: rows not a multiple of the block, h not a power of two
@pytest.mark.parametrize("G,B,d,h", [(3, 70, 8, 24), (1, 5, 16, 256), (4, 33, 5, 17)])
def test_fused_tower_layer_equals_the_pytorch_form_forward_and_backward(interpreter, G, B, d, h):
    args = _inputs(G, B, d, h)
    grad = torch.randn(G, B, h, generator=torch.Generator().manual_seed(1))
    fused = _run(towers.fused_tower_layer, args, grad)
    ref = _run(towers.reference_tower_layer, args, grad)
    for a, b in zip(fused, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_kernel_is_relu_of_input_plus_bias_and_the_bias_gradient_sums_the_passed_gradient(interpreter):
    """Against the formula, not the other implementation."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 12, generator=g).requires_grad_()
    bias = torch.randn(2, 1, 12, generator=g).requires_grad_()
    out = towers.fused_bias_relu(x, bias)
    expect = (x + bias).clamp_min(0)
    torch.testing.assert_close(out, expect.detach())
    assert (out == 0).any() and (out > 0).any()  # both sides of the ReLU are exercised
    grad = torch.randn(2, 40, 12, generator=g)
    d_x, d_b = torch.autograd.grad(out, (x, bias), grad)
    passed = grad * (expect > 0)
    torch.testing.assert_close(d_x, passed)
    torch.testing.assert_close(d_b, passed.sum(1, keepdim=True))


def test_bf16_input_with_a_float32_bias_gives_bf16_output_and_a_float32_bias_gradient(interpreter):
    """As on CUDA under autocast: the bmm's bf16 output, the float32 bias parameter."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 50, 16, generator=g).bfloat16().requires_grad_()
    bias = torch.randn(3, 1, 16, generator=g).requires_grad_()
    out = towers.fused_bias_relu(x, bias)
    d_x, d_b = torch.autograd.grad(out, (x, bias), torch.randn(3, 50, 16, generator=g).bfloat16())
    assert (out.dtype, d_x.dtype, d_b.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    # the 3.9 interpreter rounds float32 -> bf16 by truncation (the GPU rounds to nearest)
    expect = (x.float() + bias).clamp_min(0).detach()
    assert float((out.float() - expect).abs().max()) <= 1e-2 * float(expect.abs().max())


def test_a_bias_of_the_wrong_shape_is_named(interpreter):
    x = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match=r"bias has shape \(2, 4\); a \(G, B, h\) = \(2, 8, 4\) input needs \(2, 1, 4\)"):
        towers.fused_bias_relu(x, torch.zeros(2, 4))


def test_tower_layer_takes_pytorch_on_the_cpu_and_where_switched_off(monkeypatch):
    calls = []
    monkeypatch.setattr(towers, "fused_tower_layer", lambda *a: calls.append(1))
    args = _inputs(2, 8, 4, 6)
    out = towers.tower_layer(*args)  # CPU: not available
    monkeypatch.setattr(towers, "fused_available", lambda device: True)
    towers.tower_layer(*args, fused=False)  # the model's layers are the CPU's
    assert calls == [] and out.shape == (2, 8, 6)


def test_a_wrong_tower_kernel_is_switched_off_after_its_first_use(monkeypatch, caplog):
    fresh_guard(monkeypatch, towers)
    calls = []

    def wrong(cgc, weight, bias):
        calls.append(1)
        return towers.reference_tower_layer(cgc, weight, bias * 2)

    monkeypatch.setattr(towers, "fused_tower_layer", wrong)
    args = _inputs(2, 8, 4, 6)
    with caplog.at_level("WARNING"):
        out = towers.tower_layer(*args)
    torch.testing.assert_close(out, towers.reference_tower_layer(*args))
    assert towers.failed() and "fused tower bias+ReLU kernel off" in caplog.text
    towers.tower_layer(*args)
    assert len(calls) == 1  # checked once, then off


def test_the_fused_kernel_asked_for_where_it_cannot_run_says_so(monkeypatch):
    from ple_adatt import kernels

    monkeypatch.setattr(kernels, "interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="the fused tower kernel runs on CUDA .*, not on cpu"):
        towers.fused_bias_relu(torch.randn(2, 8, 4), torch.zeros(2, 1, 4))
    monkeypatch.setattr(kernels, "_triton", lambda: None)
    with pytest.raises(RuntimeError, match=r"the fused tower kernel needs triton \(pip install triton\)"):
        towers.fused_bias_relu(torch.randn(2, 8, 4), torch.zeros(2, 1, 4))


def test_a_first_use_check_that_runs_out_of_memory_runs_again_on_the_next_call(monkeypatch):
    """The check holds both forms' forward and backward for the whole batch: where it runs out
    of memory the trainer skips the batch, and the next call must check again, not take an
    unchecked kernel."""
    fresh_guard(monkeypatch, towers)
    calls = []

    def oom_then_wrong(cgc, weight, bias):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return towers.reference_tower_layer(cgc, weight, bias * 2)

    monkeypatch.setattr(towers, "fused_tower_layer", oom_then_wrong)
    args = _inputs(2, 8, 4, 6)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        towers.tower_layer(*args)
    assert not towers.GUARD.checked and not towers.failed()
    out = towers.tower_layer(*args)  # checked now: the wrong kernel is caught and switched off
    torch.testing.assert_close(out, towers.reference_tower_layer(*args))
    assert towers.failed() and len(calls) == 2


def _head_inputs(G, B, d, h, n_out, seed=0):
    g = torch.Generator().manual_seed(seed + 10)
    return (*_inputs(G, B, d, h, seed=seed), (torch.randn(G, h, n_out, generator=g) / h ** 0.5).requires_grad_(),
            torch.randn(G, 1, n_out, generator=g).requires_grad_())


@pytest.mark.parametrize("G,B,d,h,n_out", [(3, 70, 8, 24, 1), (2, 33, 5, 17, 3), (1, 5, 16, 256, towers.MAX_FUSED_OUT)])
def test_fused_tower_head_equals_both_pytorch_forms_forward_and_backward(interpreter, G, B, d, h, n_out):
    """The towers' kernel with the heads summed in it: against the two layers (the fallback)
    and the form the first-use check compares with; in float32 the three agree."""
    args = _head_inputs(G, B, d, h, n_out)
    grad = torch.randn(G, B, n_out, generator=torch.Generator().manual_seed(1))
    fused = _run(towers.fused_tower_head, args, grad)
    for reference in (towers.reference_tower_head, towers.rounded_reference_tower_head):
        ref = _run(reference, args, grad)
        for a, b in zip(fused, ref, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_tower_head_kernel_is_the_formula(interpreter):
    """relu(x W + b) V + c and its gradients, from the formula written out."""
    cgc, w, b, v, c = _head_inputs(2, 40, 6, 12, 2, seed=7)
    out = towers.fused_tower_head(cgc, w, b, v, c)
    hid = (cgc @ w + b).clamp_min(0)
    torch.testing.assert_close(out, (hid @ v + c).detach(), rtol=1e-5, atol=1e-5)
    assert (hid == 0).any() and (hid > 0).any()
    grad = torch.randn(2, 40, 2, generator=torch.Generator().manual_seed(8))
    d_cgc, d_w, d_b, d_v, d_c = torch.autograd.grad(out, (cgc, w, b, v, c), grad)
    d_hid = (grad @ v.transpose(1, 2)) * (hid > 0)
    expect = (d_hid @ w.transpose(1, 2), cgc.transpose(1, 2) @ d_hid, d_hid.sum(1, keepdim=True),
              hid.transpose(1, 2) @ grad, grad.sum(1, keepdim=True))
    for name, got, want in zip(("cgc", "W", "b", "V", "c"), (d_cgc, d_w, d_b, d_v, d_c), expect, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5, msg=name)


def test_a_head_too_wide_for_the_kernel_is_named(interpreter):
    cgc, w, b, v, c = _head_inputs(2, 8, 4, 6, towers.MAX_FUSED_OUT + 1)
    with pytest.raises(ValueError, match=r"head weight \(2, 6, 9\) and bias \(2, 1, 9\): the fused tower\+head "
                                         r"kernel takes \(G, h, O\) and \(G, 1, O\) with O <= 8"):
        towers.fused_tower_head(cgc, w, b, v, c)


def test_a_wrong_tower_head_kernel_is_switched_off_after_its_first_use(monkeypatch, caplog):
    fresh_guard(monkeypatch, towers)
    reset_guard(monkeypatch, towers.HEAD_GUARD)
    calls = []

    def wrong(cgc, weight, bias, head_weight, head_bias):
        calls.append(1)
        return towers.reference_tower_head(cgc, weight, bias, head_weight, head_bias + 0.1)

    monkeypatch.setattr(towers, "fused_tower_head", wrong)
    args = _head_inputs(2, 8, 4, 6, 1)
    with caplog.at_level("WARNING"):
        out = towers.tower_head(*args)
    torch.testing.assert_close(out, towers.reference_tower_head(*args))
    assert towers.HEAD_GUARD.failed() and "fused tower+head kernel off" in caplog.text
    assert not towers.failed()  # the towers' own kernel stays on
    towers.tower_head(*args)
    assert len(calls) == 1  # checked once, then off


def test_a_head_too_wide_for_the_kernel_takes_the_gemm_and_leaves_the_kernel_on(monkeypatch):
    """tower_head with a head past MAX_FUSED_OUT is the two layers, not a kernel failure: the
    fused kernel stays on for the next model in the process."""
    fresh_guard(monkeypatch, towers)
    reset_guard(monkeypatch, towers.HEAD_GUARD)
    args = _head_inputs(2, 8, 4, 6, towers.MAX_FUSED_OUT + 1)
    out = towers.tower_head(*args)
    torch.testing.assert_close(out, towers.reference_tower_head(*args))
    assert not towers.HEAD_GUARD.failed() and not towers.HEAD_GUARD.checked


def test_tower_head_under_bf16_autocast_gives_bf16_outputs_and_float32_parameter_gradients(interpreter):
    """As the GPU runs it: bmm in bf16 under autocast, the float32 parameters; against the form of
    the same rounding (the 3.9 interpreter truncates float32 -> bf16, the GPU rounds to nearest:
    relative to the largest value)."""
    args = _head_inputs(2, 50, 8, 16, 2, seed=4)
    grad = torch.randn(2, 50, 2, generator=torch.Generator().manual_seed(5)).bfloat16()
    results = []
    for fn in (towers.fused_tower_head, towers.rounded_reference_tower_head):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(*args)
        results.append((out, *torch.autograd.grad(out, args, grad)))
    assert [t.dtype for t in results[0]] == [torch.bfloat16] + [torch.float32] * 5
    for a, b in zip(*results, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert float((a.float() - b.float()).abs().max()) <= 3e-2 * float(b.float().abs().max())
