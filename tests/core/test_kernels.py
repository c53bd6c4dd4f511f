"""The fused per-task gradient kernel (ple_adatt.kernels) against the PyTorch closed form and
the seed's autograd loop. On the CPU the kernel runs in Triton's interpreter: same program,
numpy arithmetic, float32 only (the 3.9 interpreter's tl.dot on bf16 operands returns garbage,
2.5e10 off on a 16x16 product, so bf16 is checked in test_gpu.py). Skipped where triton is
not installed (make setup installs it)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from corehelpers import forward_with_distinct_heads, reset_guard

from ple_adatt import kernels
from ple_adatt.model import SharedExperts

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("triton", reason="triton is not installed (make setup installs it for the interpreter test)")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


# IN=7 leaves x room below the tile width (16) for the ones column that gives gb1; IN=16 does
# not, and gb1 is the row reduction of the dh tiles there, as it is with the column switched off
@pytest.mark.parametrize("variant", kernels.VARIANTS)
@pytest.mark.parametrize("layout", kernels.LAYOUTS)
@pytest.mark.parametrize("B,IN,H,D,E,T,K,ones", [(50, 7, 24, 10, 3, 4, 5, True), (33, 16, 40, 17, 2, 3, 2, True),
                                                 (50, 7, 24, 10, 3, 4, 5, False)],
                         ids=["ones-column", "no-room", "ones-column-off"])
def test_fused_kernel_equals_the_closed_form_on_odd_shapes(interpreter, monkeypatch, B, IN, H, D, E, T, K, ones,
                                                           layout, variant):
    monkeypatch.setattr(kernels, "GB1_FROM_ONES_COLUMN", ones)
    torch.manual_seed(B)
    experts = SharedExperts([f"e{i}" for i in range(E)], IN, H, D)
    x = torch.randn(B, IN)
    _, (x_, pre, hid) = experts(x)
    assert pre.stride(-1) == 1 and not pre.is_contiguous()  # the model's strided (E, B, h) view
    d_cgc = torch.randn(T, B, D)
    gates = torch.softmax(torch.randn(T, B, K), -1)
    d_s = gates[..., :E].permute(0, 2, 1).unsqueeze(-1) * d_cgc.unsqueeze(1)
    ref = experts.per_task_grads((x_, pre, hid), d_s)
    w2 = torch.stack([e.w2 for e in experts.experts.values()]).detach()
    out = kernels.shared_task_grads(x, pre.detach(), w2, d_cgc, gates, layouts=(layout,), variant=variant,
                                    hid=hid.detach() if variant != "fused" else None)
    assert out.shape == ref.shape == (T, sum(p.numel() for p in experts.parameters()))
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("absent", [(), (4,), (0, 2)], ids=["all-labelled", "no-retrieval-label", "two-unlabelled"])
def test_fused_method_gives_the_loop_reference_affinity(interpreter, absent):
    """Also with tasks that have no label in the whole batch (the retrieval task among them):
    the kernel's rows for them are exactly zero, as the loop's, and the affinity is finite."""
    from ple_adatt.transfer.adatt import TaskAffinityComputer

    system, out, lo = forward_with_distinct_heads(96, absent=absent)
    assert [t for t in range(5) if not bool(lo.present[t])] == list(absent)
    fused = system.model.shared_task_gradients(lo.weighted, lo.present, out, "fused")
    loop = system.model.shared_task_gradients(lo.weighted, lo.present, out, "loop")
    assert torch.isfinite(fused).all()
    for t in range(5):
        assert (float(fused[t].abs().max()) == 0) == (t in absent) == (float(loop[t].abs().max()) == 0), t
    assert _rel(fused, loop) < 1e-5
    cos_f, cos_l = (F.normalize(g, dim=1) @ F.normalize(g, dim=1).T for g in (fused, loop))
    assert float((cos_f - cos_l).abs().max()) < 1e-3
    a_fused, a_loop = TaskAffinityComputer(system.task_names), TaskAffinityComputer(system.task_names)
    a_fused.update(fused)
    a_loop.update(loop)
    assert int(a_fused.update_count) == 1 and torch.isfinite(a_fused.affinity_matrix).all()
    torch.testing.assert_close(a_fused.affinity_matrix, a_loop.affinity_matrix, rtol=0, atol=1e-5)
    for t in absent:
        assert float(a_fused.affinity_matrix[t].abs().max()) == 0 == float(a_fused.affinity_matrix[:, t].abs().max())


@pytest.mark.parametrize("B", [32, 70])
def test_the_relu_mask_packs_32_batch_rows_a_word(interpreter, B):
    """Bit j of word w is row 32 w + j of ``pre > 0`` (rows past the batch are 0; bit 31 makes a
    word negative); a strided (E, B, H) view as the model's, and a hidden width past one program."""
    torch.manual_seed(B)
    E, H = 2, 150
    pre = torch.randn(B, E, H).transpose(0, 1)  # (E, B, H) with a unit last stride
    pre[0, 31, 3] = 1.0  # a set sign bit
    pre[1, :, 7] = 0.0  # zero is not on
    words = kernels.relu_mask_bits(pre)
    assert words.shape == (E, -(-B // 32), H) and words.dtype == torch.int32
    rows = torch.arange(words.shape[1] * 32)
    unpacked = (words[:, rows // 32, :] >> (rows % 32)[None, :, None]) & 1  # (E, 32 n, H)
    assert torch.equal(unpacked[:, :B].bool(), pre > 0)
    assert not unpacked[:, B:].any()
    assert int(words[0, 0, 3]) < 0 and not words[1, :, 7].any()


@pytest.mark.parametrize("kwargs,message", [({"variant": "tiled"}, "unknown kernel variant 'tiled'"),
                                            ({"layouts": ("cols",)}, "unknown kernel layouts \\['cols'\\]")])
def test_an_unknown_kernel_variant_or_layout_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kernels.shared_task_grads(torch.zeros(4, 3), torch.zeros(1, 4, 16), torch.zeros(1, 16, 8),
                                  torch.zeros(2, 4, 8), torch.zeros(2, 4, 1), **kwargs)


def test_a_batch_past_the_kernels_32_bit_offsets_is_refused_before_any_work():
    """batch x T*d >= 2^31 would overflow the kernels' row offsets: a clear error (which
    grad_method: batched turns into the einsum path), not a wrong gradient. Zero-stride inputs:
    nothing of that size is allocated."""
    B = 2**27
    x, pre, w2 = torch.zeros(1, 3).expand(B, 3), torch.zeros(1, 1, 16).expand(1, B, 16), torch.zeros(1, 16, 8)
    d_cgc, gates = torch.zeros(1, 1, 8).expand(2, B, 8), torch.zeros(1, 1, 1).expand(2, B, 1)
    with pytest.raises(ValueError, match=r"batch 134217728 too large .* = 2147483648 must stay under 2\^31"):
        kernels.shared_task_grads(x, pre, w2, d_cgc, gates)


def test_batched_uses_einsum_on_the_cpu_and_fused_refuses_without_the_interpreter(monkeypatch):
    assert not kernels.available(torch.device("cpu"))  # batched -> einsum here
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pre = torch.zeros(1, 4, 16)
    with pytest.raises(RuntimeError, match="grad_method: fused runs on CUDA"):
        kernels.shared_task_grads(torch.zeros(4, 3), pre, torch.zeros(1, 16, 8), torch.zeros(2, 4, 8),
                                  torch.zeros(2, 4, 1))


def test_batched_falls_back_to_einsum_once_the_kernel_fails(monkeypatch, caplog):
    """A Triton that cannot build the kernel (driver, version) must not stop training."""
    def broken(*args):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(kernels, "shared_task_grads", broken)
    monkeypatch.setattr(kernels.GUARD, "failures", [])
    x, pre, w2 = torch.randn(8, 3), torch.randn(2, 8, 16), torch.randn(2, 16, 4)
    d_cgc, gates = torch.randn(5, 8, 4), torch.softmax(torch.randn(5, 8, 3), -1)
    with caplog.at_level("WARNING"):
        assert kernels.shared_task_grads_or_none(x, pre, w2, d_cgc, gates) is None
    assert kernels.failed() and "PTX assembly failed" in caplog.text


def test_a_kernel_that_computes_wrong_gradients_is_switched_off_after_its_first_result(monkeypatch, caplog):
    """batched on CUDA checks the kernel's first result against einsum (here: CPU, the kernel
    made 'available' and replaced by one that scrambles task rows)."""
    reset_guard(monkeypatch, kernels.GUARD)
    monkeypatch.setattr(kernels, "preferred", lambda device, dtype: not kernels.failed())  # CPU, float32 admitted
    calls = []

    def scrambled(x, pre, w2, d_cgc, gates, **kwargs):
        calls.append(1)
        return torch.randn(d_cgc.shape[0], sum(p.numel() for p in system.model.shared_parameters()))

    monkeypatch.setattr(kernels, "shared_task_grads", scrambled)
    system, out, lo = forward_with_distinct_heads(96)
    with caplog.at_level("WARNING"):
        got = system.model.shared_task_gradients(lo.weighted, lo.present, out, "batched")
    ref = system.model.shared_task_gradients(lo.weighted, lo.present, out, "einsum")
    torch.testing.assert_close(got, ref)
    assert kernels.failed() and "disagrees with the einsum path" in caplog.text
    system.model.shared_task_gradients(lo.weighted, lo.present, out, "batched")
    assert len(calls) == 1  # switched off after the first result


def test_a_correct_kernel_result_passes_the_first_use_check(monkeypatch):
    reset_guard(monkeypatch, kernels.GUARD)
    g = torch.randn(4, 30)
    assert kernels.check_once(g * 1.001, g) is not None and kernels.checked() and not kernels.failed()


def test_a_kernel_guard_warns_once_and_reports_its_first_failure(caplog):
    """Both kernels share the guard: after a failure every later call takes the fallback, so
    later failures (there are none in practice, but a test must not rely on it) stay quiet."""
    guard = kernels.KernelGuard("some kernel", "the slow path")
    assert not guard.failed() and guard.reason() is None
    with caplog.at_level("WARNING"):
        guard.switch_off("PTX assembly failed\nstack trace line")
        guard.switch_off("a second failure")
    assert guard.failed() and guard.reason().startswith("PTX assembly failed")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["some kernel off for this process (PTX assembly failed); using the slow path"]


class _StandInEvent:
    """Stand-in for torch.cuda.Event (no CUDA here): elapsed_time reads a host clock."""

    def __init__(self, enable_timing: bool = False):
        self.t = 0.0

    def record(self) -> None:
        import time

        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: _StandInEvent) -> float:
        return (end.t - self.t) * 1e3


def test_variant_timing_with_stand_in_cuda_events_skips_a_variant_that_fails(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "Event", _StandInEvent)
    calls = []

    def run(v):
        calls.append(v)
        if v == "split":
            raise RuntimeError("PassManager::run failed")
        if v == "split_bits":
            time.sleep(0.005)  # the slower of the two that run
        return torch.zeros(1)

    with caplog.at_level("WARNING"):
        assert kernels._time_variants(run) == "fused"
    assert "variant split unavailable: PassManager::run failed" in caplog.text
    assert calls.count("fused") == calls.count("split_bits") == 4  # one untimed call, three timed

    def broken(v):
        raise RuntimeError(f"{v} broke")

    with pytest.raises(RuntimeError, match="fused broke"):
        kernels._time_variants(broken)
