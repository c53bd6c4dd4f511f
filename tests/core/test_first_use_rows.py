"""The fused ops' first-use checks run on the batch's first rows (ple_adatt.kernels.first_rows):
each op names its arguments' batch dimensions, the check sees views of the first
``FIRST_USE_ROWS`` rows (as many as leave the batch's remainder modulo 16), and the real call the
whole batch; an op inside a backward runs on the whole batch and only its first rows are compared.
The kernels run under Triton's interpreter on the views as the GPU would (strided, for the task
experts and the hidden layer's (B, G*h) layout)."""

from __future__ import annotations

import pytest
import torch
from corehelpers import fresh_guard, reset_guard

from ple_adatt import kernels, mixture, relu_dgrad, towers

pytest.importorskip("triton", reason="triton is not installed (make setup installs it for the interpreter test)")

ROWS, B = 32, 37  # a check on at most 32 rows of a 37-row batch: 21, which leaves 37's remainder mod 16
CUT = 21


def test_first_rows_cuts_each_argument_on_its_batch_dimension_as_a_view():
    a, w, t = torch.randn(3, 40, 5), torch.randn(3, 5, 2), torch.randn(3, 2, 40, 5)
    cut = kernels.first_rows((a, w, None, t), (1, None, 1, 2), rows=8)
    assert [None if x is None else tuple(x.shape) for x in cut] == [(3, 8, 5), (3, 5, 2), None, (3, 2, 8, 5)]
    assert cut[1] is w and cut[0].data_ptr() == a.data_ptr() and cut[3]._base is t  # views, not copies
    assert kernels.first_rows((a,), (1,), rows=64)[0] is a  # a batch shorter than the rows: as it is
    # Triton compiles apart for a row count 16 divides and one it does not: the cut keeps the kind
    for n, expect in ((16384, 2048), (16383, 2047), (16370, 2034), (2049, 2033), (2048, 2048), (100, 100)):
        assert kernels.first_rows((torch.empty(1, n),), (1,), rows=2048)[0].shape[1] == expect, n
    with pytest.raises(ValueError, match="2 batch dimensions for 1 arguments"):
        kernels.first_rows((a,), (1, None))


def _recording(monkeypatch, module, name):
    """Wrap ``module.name`` (the real fused op) to record the batch length of each call."""
    seen, real = [], getattr(module, name)

    def wrapped(*args):
        seen.append(args[0].shape[1])
        return real(*args)

    monkeypatch.setattr(module, name, wrapped)
    return seen


def _tower_args(n_out=None):
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(3, B, 8, generator=g), torch.randn(3, 8, 12, generator=g) / 3, torch.randn(3, 1, 12, generator=g)]
    if n_out:
        args += [torch.randn(3, 12, n_out, generator=g) / 3, torch.randn(3, 1, n_out, generator=g)]
    return [a.requires_grad_() for a in args]


@pytest.mark.parametrize("op", ["mixture", "tower", "tower_head"])
def test_an_autograd_ops_first_use_check_runs_on_the_first_rows(interpreter, monkeypatch, op):
    monkeypatch.setattr(kernels, "FIRST_USE_ROWS", ROWS)
    if op == "mixture":
        fresh_guard(monkeypatch, mixture)
        seen = _recording(monkeypatch, mixture, "fused_mixture")
        g = torch.Generator().manual_seed(1)
        args = (torch.softmax(torch.randn(2, B, 5, generator=g), -1).requires_grad_(),
                torch.randn(3, B, 6, generator=g).requires_grad_(), torch.randn(2, 2, B, 6, generator=g).requires_grad_(),
                torch.randn(3, 1, 6, generator=g).requires_grad_(), torch.randn(2, 2, 1, 6, generator=g).requires_grad_())
        guard, reference = mixture.GUARD, mixture.reference_mixture

        def call(*a):
            return mixture.gated_mixture(*a[:3], True, *a[3:])
    else:
        fresh_guard(monkeypatch, towers)
        reset_guard(monkeypatch, towers.HEAD_GUARD)
        head = op == "tower_head"
        seen = _recording(monkeypatch, towers, "fused_tower_head" if head else "fused_tower_layer")
        args = tuple(_tower_args(2 if head else None))
        call = towers.tower_head if head else towers.tower_layer
        guard = towers.HEAD_GUARD if head else towers.GUARD
        reference = towers.reference_tower_head if head else towers.reference_tower_layer
    out = call(*args)
    assert guard.checked and not guard.failed(), guard.reason()
    assert seen == [CUT, B]  # the check's call on the first rows, then the batch's
    torch.testing.assert_close(out, reference(*args), rtol=1e-5, atol=1e-5)


def test_the_masked_gradients_first_use_check_compares_the_first_rows_of_the_whole_batchs_result(interpreter,
                                                                                                 monkeypatch):
    """Inside a backward (values only, no autograd to hold): the kernel runs on the whole batch,
    so that its autotuner (keyed on the batch) picks the configuration the batch runs, and its
    first rows are compared with the reference's on the first rows of the hidden layer, a
    (G, B, i) view of a (B, G*i) tensor."""
    monkeypatch.setattr(kernels, "FIRST_USE_ROWS", ROWS)
    fresh_guard(monkeypatch, relu_dgrad)
    seen = _recording(monkeypatch, relu_dgrad, "fused_masked_input_grad")
    g = torch.Generator().manual_seed(2)
    G, i, o = 3, 10, 6
    grad = torch.randn(G, B, o, generator=g)
    weight = torch.randn(G, i, o, generator=g)
    x = torch.randn(B, G * i, generator=g).clamp_min(0).view(B, G, i).transpose(0, 1)
    out = relu_dgrad.masked_input_grad(grad, weight, x)
    assert relu_dgrad.GUARD.checked and not relu_dgrad.failed(), relu_dgrad.GUARD.reason()
    assert seen == [B] and out.stride() == x.stride()  # one whole-batch call: the check's result is the batch's
    torch.testing.assert_close(out, relu_dgrad.reference_masked_input_grad(grad, weight, x), rtol=1e-5, atol=1e-5)


def test_a_kernel_wrong_only_past_the_first_rows_is_not_what_the_check_is_for(monkeypatch):
    """What the first rows cannot see: a kernel wrong only on later rows passes its check. The
    kernels treat every row block alike (one program per block), which is what makes the first
    rows a fair sample; this test pins down that the check looks at those rows only."""
    monkeypatch.setattr(kernels, "FIRST_USE_ROWS", ROWS)
    fresh_guard(monkeypatch, towers)

    def wrong_past_the_first_rows(cgc, weight, bias):
        out = towers.reference_tower_layer(cgc, weight, bias)
        return out if cgc.shape[1] <= ROWS else out * 2

    monkeypatch.setattr(towers, "fused_tower_layer", wrong_past_the_first_rows)
    towers.tower_layer(*_tower_args())
    assert towers.GUARD.checked and not towers.failed()


def test_a_wrong_masked_gradient_kernel_is_caught_by_its_first_rows(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "FIRST_USE_ROWS", ROWS)
    fresh_guard(monkeypatch, relu_dgrad)
    monkeypatch.setattr(relu_dgrad, "fused_masked_input_grad",
                        lambda grad, weight, x: relu_dgrad.reference_masked_input_grad(grad, weight, x) * 1.5)
    g = torch.Generator().manual_seed(3)
    grad, weight, x = torch.randn(2, B, 4, generator=g), torch.randn(2, 5, 4, generator=g), torch.rand(2, B, 5, generator=g)
    with caplog.at_level("WARNING"):
        out = relu_dgrad.masked_input_grad(grad, weight, x)
    assert relu_dgrad.failed() and "fused masked input-gradient kernel off" in caplog.text
    torch.testing.assert_close(out, relu_dgrad.reference_masked_input_grad(grad, weight, x))


def test_batch_dimensions_that_do_not_fit_the_arguments_are_the_callers_error_not_a_kernel_failure(monkeypatch):
    fresh_guard(monkeypatch, towers)
    with pytest.raises(ValueError, match="2 batch dimensions for 3 arguments"):
        kernels.checked_call(towers.GUARD, towers.fused_tower_layer, towers.reference_tower_layer,
                             tuple(_tower_args()), True, lambda: True, batch_dims=(1, None))
    assert not towers.failed()


def test_a_guard_checks_each_batch_kind_once():
    guard = kernels.KernelGuard("op", "the reference")
    assert guard.needs_check() and guard.needs_check(True)
    guard.mark_checked(kernels.batch_kind(16384))
    assert not guard.needs_check(True) and not guard.needs_check(None)
    assert guard.needs_check(kernels.batch_kind(4999))  # an epoch's last batch: the other variant
    guard.mark_checked(False)
    assert not guard.needs_check(False)
    trusting = kernels.KernelGuard("op", "the reference")
    trusting.checked = True  # marked checked by hand (tests): every kind is trusted
    assert not trusting.needs_check(True) and not trusting.needs_check(False)


def test_an_epochs_last_batch_of_the_other_kind_is_checked_and_a_variant_wrong_there_switches_off():
    """The fused op below is right when 16 divides the rows and wrong otherwise, as a
    miscompiled variant would be: the full batches pass their check, the last batch's check
    catches it, and that batch already gets the reference's result."""
    guard = kernels.KernelGuard("op", "the reference")
    ref_calls: list[int] = []  # the rows of each reference call: checks and fallbacks

    def reference(x):
        ref_calls.append(x.shape[0])
        return x * 2

    def fused(x):
        return x * 2 if x.shape[0] % 16 == 0 else x * 2 + 1

    def call(rows):
        x = torch.linspace(0, 1, rows)
        return kernels.checked_call(guard, fused, reference, (x,), True, lambda: not guard.failed(), differentiable=False,
                                    batch_dims=(0,), out_batch_dim=0), x

    for rows in (64, 64, 48):  # full batches: one check, on the first
        out, x = call(rows)
        assert torch.equal(out, x * 2)
    assert ref_calls == [64] and guard.kinds == {True}
    out, x = call(37)  # the last batch: its own check, which the variant fails
    assert guard.failed() and "differs from the PyTorch form" in guard.reason()
    assert ref_calls == [64, 37, 37] and torch.equal(out, x * 2)  # the check, then the reference's result
    out, x = call(64)
    assert torch.equal(out, x * 2) and ref_calls == [64, 37, 37, 64]  # off: the reference from now on


def test_the_per_task_kernels_check_is_per_batch_kind(monkeypatch):
    reset_guard(monkeypatch, kernels.GUARD)
    g = torch.randn(4, 50)
    assert not kernels.checked(64)
    assert kernels.check_once(g, g, rows=64) is g
    assert kernels.checked(64) and kernels.checked(32) and not kernels.checked(63)
    assert kernels.check_once(g, g, rows=63) is g and kernels.checked(63)
