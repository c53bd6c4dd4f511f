"""The fused per-task gradient kernel's reduced-precision path on the CPU.

On the GPU the kernel runs under bf16 autocast: half-width matrix operands, float32
accumulation (``PREC="tf32"``, the casts of x, w2 and the register tiles). Triton's interpreter
cannot run that in bf16 (its ``tl.dot`` multiplies bf16 bit patterns: triton-lang/triton#11584),
but it runs it in float16, which takes the same code path with a narrower exponent. So the
half-precision program is checked here, and issue 8's "the fast path's affinity equals the
loop reference within 1e-3" holds for it on the CPU too; test_gpu.py checks bf16 on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from corehelpers import BATCH_SPECS, make_batch

from ple_adatt import kernels
from ple_adatt.config import load_train_config
from ple_adatt.model import SharedExperts
from ple_adatt.training import build_system

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("triton", reason="triton is not installed (make setup installs it for the interpreter test)")


pytestmark = pytest.mark.usefixtures("interpreter")  # tests/core/conftest.py


def _cos(g: torch.Tensor) -> torch.Tensor:
    n = F.normalize(g.double(), dim=1)
    return n @ n.T


@pytest.mark.parametrize("variant", kernels.VARIANTS)
@pytest.mark.parametrize("layout", kernels.LAYOUTS)
def test_half_precision_kernel_equals_the_float32_closed_form(layout, variant):
    """Half operands as the model gives them under autocast (x, pre, w2, and the CGC outputs'
    gradient; float32 gates, as CUDA's autocast runs the softmax), against the closed form in
    float32 on the same rounded inputs."""
    torch.manual_seed(0)
    B, IN, H, D, E, T, K = 96, 7, 40, 17, 3, 4, 5
    experts = SharedExperts([f"e{i}" for i in range(E)], IN, H, D)
    x = torch.randn(B, IN)
    with torch.no_grad():
        _, (_, pre, hid) = experts(x)
    x16, pre16 = x.half(), pre.half()
    w2 = torch.stack([e.w2 for e in experts.experts.values()]).detach()
    d_cgc = torch.randn(T, B, D).half()
    gates = torch.softmax(torch.randn(T, B, K), -1)
    out = kernels.shared_task_grads(x16, pre16, w2.half(), d_cgc, gates, layouts=(layout,), variant=variant,
                                    hid=pre16.clamp_min(0) if variant != "fused" else None)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # the reference: the same half-rounded inputs, every product in float32
    with torch.no_grad():
        for e, ex in enumerate(experts.experts.values()):
            ex.w2.copy_(w2[e].half().float())
        d_s = gates[..., :E].permute(0, 2, 1).unsqueeze(-1) * d_cgc.float().unsqueeze(1)
        pre32 = pre16.float()
        ref = experts.per_task_grads((x16.float(), pre32, pre32.clamp_min(0)), d_s)
    rel = float((out.double() - ref.double()).norm() / ref.double().norm())
    assert rel < 2e-3  # the kernel rounds its register tiles (d_s, dh, hid) to half for the products
    assert float((_cos(out) - _cos(ref)).abs().max()) < 1e-3


def test_half_precision_fused_path_gives_the_loop_affinity_within_1e_3(monkeypatch):
    """The model under float16 autocast: the fused kernel (what ``batched`` takes on CUDA) against
    the seed's loop under the same autocast, as issue 8 asks of bf16 on the GPU; with the
    retrieval task unlabelled in the whole batch (its row is zero in both)."""
    # one layout (the closed-form test above covers both): numpy's float16 products are slow
    monkeypatch.setattr(kernels, "DEFAULT_LAYOUTS", ("hrows",))
    absent = (4,)
    cfg = load_train_config(ROOT / "configs/train/cpu_small.yaml")
    torch.manual_seed(0)
    system = build_system(cfg, BATCH_SPECS, 5, [4, 4], 3)
    torch.nn.init.normal_(system.model.head.weight, std=0.5)
    b = make_batch(160)
    for t in absent:
        b.y[:, t] = float("nan")
    with torch.autocast("cpu", dtype=torch.float16):
        out = system.model(b.x_num, b.x_cat, b.cluster)
        lo = system.losses(out.out, b.y)
    assert out.shared_cache[1].dtype == torch.float16  # the half path, not the float32 one
    fused = system.model.shared_task_gradients(lo.weighted, lo.present, out, "fused")
    loop = system.model.shared_task_gradients(lo.weighted, lo.present, out, "loop")
    for t in absent:
        assert not bool(lo.present[t]) and not fused[t].any() and not loop[t].any()
    keep = [t for t in range(len(BATCH_SPECS)) if t not in absent]
    diff = float((_cos(fused[keep]) - _cos(loop[keep])).abs().max())
    assert diff < 1e-3


def test_the_first_use_checks_reference_in_row_blocks_equals_the_whole_batch_einsum():
    """The check's einsum reference runs over blocks of rows (bounded memory at batch 16384);
    summed, the blocks give the whole batch's gradients, with a last block shorter than the rest."""
    from corehelpers import forward_with_distinct_heads

    system, out, lo = forward_with_distinct_heads(50)
    d_cgc = system.model._cgc_grads(lo.weighted, lo.present, out)
    whole = system.model._einsum_task_gradients(d_cgc, out)
    blocks = system.model._einsum_reference(d_cgc, out, rows=16)  # 16 + 16 + 16 + 2 rows
    assert whole.abs().max() > 0
    assert torch.allclose(blocks, whole, rtol=1e-5, atol=1e-7)
    half = system.model._einsum_reference(d_cgc[:, :16], replace_rows(out, 16), rows=16)
    assert not torch.allclose(half, whole, rtol=1e-3)  # the comparison can fail: one block is not the batch


def replace_rows(out, n):
    from dataclasses import replace

    x, pre, hid = out.shared_cache
    return replace(out, gates=out.gates[:, :n], shared_cache=(x[:n], pre[:, :n], hid[:, :n]))
