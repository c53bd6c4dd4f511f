"""The experts' second layers' input gradient with their input's ReLU mask applied in the GEMM's
epilogue: one Triton kernel for ``where(x > 0, grad @ W^T, 0)`` per group.

With the GPU's layers an expert is ``s = relu(x W1) W2 (+ b2)``: the first GEMM writes the hidden
layer (B, G*h) with its ReLU in cuBLASLt's epilogue, the second is a grouped ``bmm``. In the
backward, cuBLAS writes ``grad @ W2^T`` (G, B, h) and a ``threshold_backward`` pass reads it
back with the hidden layer and writes the masked gradient: at the seed's task experts (32 groups,
batch 16384, h 256, bf16) 0.8 GB for the pass alone. Here the kernel reads the hidden layer's
sign in its epilogue and writes the masked gradient once, in the hidden layer's layout, which
the first layer's two weight and input GEMMs then read as a plain (B, G*h) matrix. About 0.55 GB
less per step at the seed's task experts and 0.27 GB at its shared experts.

The matrix product is short (K = the experts' output width, 128 at the seed's shape) and the
kernel memory-bound. It runs on CUDA when triton is importable, outside ``torch.compile``, with
the GPU's layers; its first use in a process is compared with the PyTorch form, and a failure to
build or a mismatch switches it off with one warning (:func:`ple_adatt.kernels.checked_call`).
On the CPU the tests run it under Triton's interpreter.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import kernels

__all__ = ["masked_input_grad", "reference_masked_input_grad", "input_grad_in_layout", "fused_masked_input_grad", "fused_available",
           "failed", "TILES"]

GUARD = kernels.KernelGuard("fused masked input-gradient kernel", "cuBLAS and a threshold pass")
# the autotuner's (BM, BN, BK, warps, stages): configs that compile for sm_90 without spills and
# with warpgroup MMAs (bench/kernel_report.py --check; a test runs it)
TILES = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 128, 8, 2)]


def input_grad_in_layout(grad: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    """``grad @ weight^T`` for ``grad`` (G, B, o), ``weight`` (G, i, o), written in the layout of
    the layer's input ``x`` (G, B, i) where ``x`` is dense: cuBLAS writes straight into it."""
    w_t = weight.transpose(1, 2)
    if torch.compiler.is_compiling():  # dynamo refuses a strided out=; inductor picks layouts
        return torch.bmm(grad, w_t)
    gx = torch.empty_like(x)  # x's strides when x is dense (an expanded x gets contiguous ones)
    torch.bmm(grad, w_t, out=gx)
    return gx


def reference_masked_input_grad(grad: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    """The PyTorch form: ``where(x > 0, grad @ weight^T, 0)`` for ``x`` (G, B, i) the layer's
    input (a ReLU's output), in ``x``'s dtype and layout (:func:`input_grad_in_layout`), then a
    ``threshold_backward`` pass."""
    return torch.ops.aten.threshold_backward(input_grad_in_layout(grad, weight, x), x, 0)


def fused_masked_input_grad(grad: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    """The Triton kernel: same contract as :func:`reference_masked_input_grad`."""
    kernels.require_runnable("the fused masked input-gradient kernel", x.device)
    G, B, o = grad.shape
    i = weight.shape[1]
    if tuple(weight.shape) != (G, i, o) or tuple(x.shape) != (G, B, i):
        raise ValueError(f"shapes do not fit: grad {tuple(grad.shape)}, weight {tuple(weight.shape)}, "
                         f"x {tuple(x.shape)}; expected (G, B, o), (G, i, o), (G, B, i)")
    grad = grad if grad.stride(2) == 1 else grad.contiguous()
    weight = weight.contiguous()
    x = x if x.stride(2) == 1 else x.contiguous()
    out = torch.empty_like(x)  # x's strides where x is dense (the hidden layer's (B, G*i) layout)
    if out.stride(2) != 1:
        out = torch.empty(G, B, i, dtype=x.dtype, device=x.device)

    def grid(meta):
        return (-(-B // meta["BM"]), -(-i // meta["BN"]), G)

    _kernel()[grid](grad, weight, x, out, B, i, o, grad.stride(0), grad.stride(1), weight.stride(0), weight.stride(1),
                    x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                    PREC=_precision(grad.dtype))
    return out


def _precision(dtype: torch.dtype) -> str:
    """float32 products as cuBLAS would take them: TF32 where the trainer allows it (it does on
    CUDA), exact otherwise; bf16 and fp16 operands are what they are."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def failed() -> bool:
    """True once the kernel failed to build, launch or check in this process."""
    return GUARD.failed()


def fused_available(device: torch.device) -> bool:
    """True when the fused kernel runs compiled here: CUDA, triton, and no earlier failure."""
    return kernels.available(device) and not failed()


def masked_input_grad(grad: Tensor, weight: Tensor, x: Tensor, fused: bool = True) -> Tensor:
    """The masked input gradient: the fused kernel where it can run (and ``fused``), else
    PyTorch. Called inside a backward (autograd off), so its first use is checked on values
    alone."""
    return kernels.checked_call(GUARD, fused_masked_input_grad, reference_masked_input_grad, (grad, weight, x), fused,
                                lambda: fused_available(x.device) and grad.shape[1] > 0, differentiable=False,
                                batch_dims=(1, None, 1))


@functools.cache
def _kernel():
    triton, tl = kernels._triton()
    tiles = [(16, 16, 16, 1, 1)] if kernels.interpreted() else TILES  # the interpreter cannot time them
    configs = [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=st) for bm, bn, bk, w, st in tiles]

    @triton.autotune(configs=configs, key=["B", "N_IN", "N_OUT"])
    @triton.jit
    def masked_dgrad(g_ptr, w_ptr, x_ptr, out_ptr, B, N_IN, N_OUT, s_gg, s_gb, s_wg, s_wi, s_xg, s_xb, s_og, s_ob,
                     PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        grp = tl.program_id(2).to(tl.int64)
        offs_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        mm, mn = offs_m < B, offs_n < N_IN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, N_OUT, BK):
            kk = k0 + offs_k
            mk = kk < N_OUT
            a = tl.load(g_ptr + grp * s_gg + offs_m[:, None] * s_gb + kk[None, :], mask=mm[:, None] & mk[None, :],
                        other=0.0)  # (BM, BK) of the output gradient
            w_t = tl.load(w_ptr + grp * s_wg + offs_n[None, :] * s_wi + kk[:, None], mask=mk[:, None] & mn[None, :],
                          other=0.0)  # (BK, BN): W^T
            acc = tl.dot(a, w_t.to(a.dtype), acc, input_precision=PREC)
        m2 = mm[:, None] & mn[None, :]
        # the ReLU's mask from its output, in the epilogue: the unmasked product never reaches memory
        xv = tl.load(x_ptr + grp * s_xg + offs_m[:, None] * s_xb + offs_n[None, :], mask=m2, other=0.0)
        acc = tl.where(xv > 0, acc, 0.0)
        tl.store(out_ptr + grp * s_og + offs_m[:, None] * s_ob + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m2)

    return masked_dgrad
