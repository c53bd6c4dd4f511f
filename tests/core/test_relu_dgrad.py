"""The experts' masked input gradient (ple_adatt.relu_dgrad): the Triton kernel against the
PyTorch form and against the formula. On the CPU the kernel runs under Triton's interpreter
(switched on by tests/conftest.py), in float32 only (the 3.9 interpreter's tl.dot on bf16
operands returns garbage); tests/core/test_gpu.py runs it compiled, in bf16. Skipped where
triton is not installed (make setup installs it)."""

from __future__ import annotations

import pytest
import torch
from corehelpers import fresh_guard

from ple_adatt import relu_dgrad

pytest.importorskip("triton", reason="triton is not installed (make setup installs it for the interpreter test)")


def _inputs(G, B, i, o, dtype=torch.float32, seed=0):
    """The model's layout: x is the ReLU output (B, G*i) seen as (G, B, i)."""
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(G, B, o, generator=g).to(dtype)
    weight = torch.randn(G, i, o, generator=g).to(dtype)
    x = torch.randn(B, G * i, generator=g).clamp_min(0).to(dtype).view(B, G, i).transpose(0, 1)
    return grad, weight, x


# odd shapes: rows, hidden and output widths not multiples of the 16-wide interpreter tiles
@pytest.mark.parametrize("G,B,i,o", [(3, 70, 24, 10), (1, 5, 16, 16), (4, 33, 40, 17)])
def test_fused_masked_input_grad_equals_the_pytorch_form_in_the_inputs_layout(interpreter, G, B, i, o):
    grad, weight, x = _inputs(G, B, i, o)
    assert G == 1 or not x.is_contiguous()
    fused = relu_dgrad.fused_masked_input_grad(grad, weight, x)
    ref = relu_dgrad.reference_masked_input_grad(grad, weight, x)
    assert fused.shape == ref.shape == (G, B, i)
    # the hidden layer's layout (strides of dimensions of size 1 do not matter)
    assert [st for st, n in zip(fused.stride(), x.shape) if n > 1] == [st for st, n in zip(x.stride(), x.shape) if n > 1]
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


def test_the_kernel_is_the_product_where_the_relu_passed(interpreter):
    """Against the formula, not the other implementation; a contiguous and an expanded x too."""
    grad, weight, x = _inputs(2, 40, 12, 8, seed=3)
    expect = torch.where(x > 0, grad @ weight.transpose(1, 2), 0.0)
    assert (x == 0).any() and (x > 0).any()
    for xs in (x, x.contiguous()):
        torch.testing.assert_close(relu_dgrad.fused_masked_input_grad(grad, weight, xs), expect)
    one = x[:1].expand(2, 40, 12)  # stride 0: the output gets a layout of its own
    torch.testing.assert_close(relu_dgrad.fused_masked_input_grad(grad, weight, one),
                               torch.where(one > 0, grad @ weight.transpose(1, 2), 0.0))


def test_shapes_that_do_not_fit_are_named(interpreter):
    grad, weight, x = _inputs(2, 8, 4, 6)
    with pytest.raises(ValueError, match=r"shapes do not fit: grad \(2, 8, 6\), weight \(2, 6, 4\), x \(2, 8, 4\)"):
        relu_dgrad.fused_masked_input_grad(grad, weight.transpose(1, 2), x)


def test_inside_a_backward_the_first_use_is_checked_on_values_and_a_wrong_kernel_switched_off(monkeypatch, caplog):
    """The op runs in a backward, where autograd is off: its first use is checked anyway (on its
    values), and a kernel that disagrees costs speed, never a wrong gradient."""
    fresh_guard(monkeypatch, relu_dgrad)
    calls = []

    def wrong(grad, weight, x):
        calls.append(1)
        return relu_dgrad.reference_masked_input_grad(grad, weight, x) * 1.1

    monkeypatch.setattr(relu_dgrad, "fused_masked_input_grad", wrong)
    args = _inputs(2, 8, 4, 6)
    with torch.no_grad(), caplog.at_level("WARNING"):
        out = relu_dgrad.masked_input_grad(*args)
    torch.testing.assert_close(out, relu_dgrad.reference_masked_input_grad(*args))
    assert relu_dgrad.failed() and "fused masked input-gradient kernel off" in caplog.text
    relu_dgrad.masked_input_grad(*args)
    assert len(calls) == 1  # checked once, then off


def test_a_correct_kernel_passes_its_first_use_check_inside_a_backward(interpreter, monkeypatch):
    fresh_guard(monkeypatch, relu_dgrad, available=lambda device: True)
    args = _inputs(2, 20, 8, 6)
    with torch.no_grad():
        out = relu_dgrad.masked_input_grad(*args)
    assert relu_dgrad.GUARD.checked and not relu_dgrad.failed()
    torch.testing.assert_close(out, relu_dgrad.reference_masked_input_grad(*args))


def _wrong_kernel(monkeypatch, wrong):
    fresh_guard(monkeypatch, relu_dgrad)
    monkeypatch.setattr(relu_dgrad, "fused_masked_input_grad", wrong)


def test_a_first_gradient_that_is_not_finite_defers_the_check_to_the_next_one(monkeypatch):
    """The first backward may carry NaN by design (a step whose loss overflowed): nothing can be
    compared then, so the check waits for a finite gradient instead of passing a wrong kernel."""
    _wrong_kernel(monkeypatch, lambda *a: relu_dgrad.reference_masked_input_grad(*a) * 1.1)
    grad, weight, x = _inputs(2, 8, 4, 6)
    with torch.no_grad():
        out = relu_dgrad.masked_input_grad(torch.full_like(grad, float("nan")), weight, x)
        assert out.isnan().any() and not relu_dgrad.GUARD.checked and not relu_dgrad.failed()
        relu_dgrad.masked_input_grad(grad, weight, x)
    assert relu_dgrad.GUARD.checked and relu_dgrad.failed()


def test_a_kernel_that_returns_nan_where_the_reference_is_finite_is_switched_off(monkeypatch):
    _wrong_kernel(monkeypatch, lambda *a: relu_dgrad.reference_masked_input_grad(*a) * float("nan"))
    args = _inputs(2, 8, 4, 6)
    with torch.no_grad():
        out = relu_dgrad.masked_input_grad(*args)
    assert relu_dgrad.failed() and torch.isfinite(out).all()
