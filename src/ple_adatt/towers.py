"""The towers' first layer on the GPU, ``relu(cgc_t W_t + b_t)`` for every task at once, with the
bias and the ReLU in one Triton pass.

In PyTorch the layer is ``relu(baddbmm(b, cgc, W))``. ``baddbmm`` first copies the broadcast
bias into its (T, B, h) output (134 us on an H100 at the seed's shape, 16 x 16384 x 256 in bf16)
and the GEMM then reads it back; the ReLU is a pass of its own; the backward is a
``threshold_backward`` pass and then a pass over the batch for the bias gradient. Here the GEMM
is a plain ``bmm`` and one kernel adds the bias and applies the ReLU. Its backward masks the
incoming gradient and writes the bias gradient's per-block column sums in the same pass, summed
afterwards (no atomics: the result does not depend on the programs' order). About 0.4 GB less
traffic per step at the seed's shape.

It runs on CUDA when triton is importable, outside ``torch.compile`` (whose inductor fuses the
PyTorch form itself), with the GPU's layers (:attr:`ple_adatt.model.PLEClusterModel.gpu_layers`).
Its first use in a process is checked against the PyTorch form of the same rounding
(:func:`rounded_reference_tower_layer`), forward and gradients; a
failure to build or a mismatch switches it off for the process with one warning
(:func:`ple_adatt.kernels.checked_call`). On the CPU the tests run it under Triton's interpreter.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels

__all__ = ["tower_layer", "reference_tower_layer", "rounded_reference_tower_layer", "fused_tower_layer",
           "fused_bias_relu", "fused_available", "failed", "tower_head", "reference_tower_head",
           "rounded_reference_tower_head", "fused_tower_head", "MAX_FUSED_OUT"]

GUARD = kernels.KernelGuard("fused tower bias+ReLU kernel", "the PyTorch form")
HEAD_GUARD = kernels.KernelGuard("fused tower+head kernel", "the tower kernel and a GEMM for the heads")
# the widest head the tower+head kernels take (a loop over the outputs in the tile); wider heads
# are GEMMs of their own
MAX_FUSED_OUT = 8
# rows per program and warps: a (16, 256) tile at 4 warps, as the mixture's kernels (memory-bound:
# small tiles keep the most programs resident)
BLOCK_ROWS = 16
NUM_WARPS = 4


def reference_tower_layer(cgc: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The PyTorch form: ``cgc`` (T, B, d), ``weight`` (T, d, h), ``bias`` (T, 1, h) -> (T, B, h)."""
    return F.relu(torch.baddbmm(bias, cgc, weight))


def rounded_reference_tower_layer(cgc: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The PyTorch form that rounds as the fused layer does: the GEMM's output in its dtype (bf16
    under autocast), the bias added in float32, the ReLU's output rounded once. The first-use check
    compares against this one, not :func:`reference_tower_layer`: ``baddbmm`` adds the bias before
    rounding, so in bf16 about one value in 2000 (4.6e-4 on an H100) changes sign between the
    forms, and the gradient there is passed by one and zero in the other, a difference of the
    gradient's full size (0.135 of the largest value measured on an H100 at the seed's shape, which switched the
    kernel off). Both forms are correct to bf16's rounding; the check compares like with like."""
    x = torch.bmm(cgc, weight)
    return F.relu(x.float() + bias.float()).to(x.dtype)


def fused_tower_layer(cgc: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``bmm`` (in the autocast dtype, as autocast's baddbmm) and the fused bias+ReLU kernel."""
    return fused_bias_relu(torch.bmm(cgc, weight), bias)


def failed() -> bool:
    """True once the kernel failed to build, launch or check in this process."""
    return GUARD.failed()


def fused_available(device: torch.device) -> bool:
    """True when the fused kernel runs compiled here: CUDA, triton, and no earlier failure."""
    return kernels.available(device) and not failed()


def tower_layer(cgc: Tensor, weight: Tensor, bias: Tensor, fused: bool = True) -> Tensor:
    """The towers' first layer: the fused kernel where it can run (and ``fused``), else PyTorch."""
    return kernels.checked_call(GUARD, fused_tower_layer, reference_tower_layer, (cgc, weight, bias), fused,
                                lambda: fused_available(cgc.device) and cgc.shape[1] > 0,
                                check_reference=rounded_reference_tower_layer, batch_dims=(1, None, None))


def fused_bias_relu(x: Tensor, bias: Tensor) -> Tensor:
    """``relu(x + bias)`` in ``x``'s dtype: ``x`` (G, B, h), ``bias`` (G, 1, h) in any float dtype
    (the parameter's float32 under autocast); the bias gradient comes back in the bias's dtype."""
    kernels.require_runnable("the fused tower kernel", x.device)
    G, _, H = x.shape
    if tuple(bias.shape) != (G, 1, H):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; a (G, B, h) = {tuple(x.shape)} input needs ({G}, 1, {H})")
    return _BiasReLU.apply(x, bias)


class _BiasReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor) -> Tensor:
        x = x.contiguous()
        b = bias.contiguous()
        G, B, H = x.shape
        out = torch.empty_like(x)
        _kernels()[0][(G, -(-B // BLOCK_ROWS))](x, b, out, B, H, BB=BLOCK_ROWS, BH=kernels._pow2(H),
                                                num_warps=NUM_WARPS)
        ctx.save_for_backward(out)
        ctx.bias_dtype = bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (out,) = ctx.saved_tensors
        grad = grad.contiguous()
        G, B, H = out.shape
        rows = -(-B // BLOCK_ROWS)
        d_x = torch.empty_like(out)
        parts = torch.empty(G, rows, H, dtype=torch.float32, device=out.device)
        _kernels()[1][(G, rows)](grad, out, d_x, parts, B, H, BB=BLOCK_ROWS, BH=kernels._pow2(H),
                                 num_warps=NUM_WARPS)
        return d_x, parts.sum(1, keepdim=True).to(ctx.bias_dtype)


def reference_tower_head(cgc: Tensor, weight: Tensor, bias: Tensor, head_weight: Tensor, head_bias: Tensor) -> Tensor:
    """The towers and the heads as two layers: :func:`tower_layer` (its kernel where it runs), then
    ``baddbmm`` for the heads, ``head_weight`` (T, h, O), ``head_bias`` (T, 1, O) -> (T, B, O)."""
    return torch.baddbmm(head_bias, tower_layer(cgc, weight, bias), head_weight)


def rounded_reference_tower_head(cgc: Tensor, weight: Tensor, bias: Tensor, head_weight: Tensor,
                                 head_bias: Tensor) -> Tensor:
    """The PyTorch form that rounds as the fused kernels do: the towers as
    :func:`rounded_reference_tower_layer`, the heads' products and sums in float32 from the
    rounded hidden layer, the output rounded once (the first-use check's reference)."""
    hid = rounded_reference_tower_layer(cgc, weight, bias)
    with torch.autocast(hid.device.type, enabled=False):
        out = torch.baddbmm(head_bias.float(), hid.float(), head_weight.float())
    return out.to(hid.dtype)


def fused_tower_head(cgc: Tensor, weight: Tensor, bias: Tensor, head_weight: Tensor, head_bias: Tensor) -> Tensor:
    """``bmm`` for the towers' first layer, then one kernel for its bias and ReLU and the heads
    (their few outputs are sums along each row of the tile the kernel holds). Its backward is one
    kernel too: the hidden layer's gradient from the heads' gradient and weights, masked, never
    written whole; the towers' and the heads' weight and bias gradients as per-block sums."""
    kernels.require_runnable("the fused tower+head kernel", cgc.device)
    G, H, n_out = head_weight.shape
    if n_out > MAX_FUSED_OUT or tuple(head_bias.shape) != (G, 1, n_out):
        raise ValueError(f"head weight {tuple(head_weight.shape)} and bias {tuple(head_bias.shape)}: the fused "
                         f"tower+head kernel takes (G, h, O) and (G, 1, O) with O <= {MAX_FUSED_OUT}")
    x = torch.bmm(cgc, weight)
    if tuple(bias.shape) != (G, 1, x.shape[2]) or x.shape[2] != H:
        raise ValueError(f"tower bias {tuple(bias.shape)} and head weight {tuple(head_weight.shape)} do not fit "
                         f"the towers' output {tuple(x.shape)}")
    return _TowerHead.apply(x, bias, head_weight, head_bias)


def tower_head(cgc: Tensor, weight: Tensor, bias: Tensor, head_weight: Tensor, head_bias: Tensor,
               fused: bool = True) -> Tensor:
    """The towers' first layer and the heads, (T, B, O): the fused kernels where they can run (and
    ``fused``, and the heads at most :data:`MAX_FUSED_OUT` wide), else
    :func:`reference_tower_head`. Their first use is checked against
    :func:`rounded_reference_tower_head`, forward and gradients."""
    return kernels.checked_call(HEAD_GUARD, fused_tower_head, reference_tower_head,
                                (cgc, weight, bias, head_weight, head_bias), fused,
                                lambda: (fused_available(cgc.device) and not HEAD_GUARD.failed() and cgc.shape[1] > 0
                                         and head_weight.shape[2] <= MAX_FUSED_OUT),
                                check_reference=rounded_reference_tower_head, batch_dims=(1, None, None, None, None))


class _TowerHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor, head_weight: Tensor, head_bias: Tensor) -> Tensor:
        x = x.contiguous()
        G, B, H = x.shape
        n_out = head_weight.shape[2]
        y = torch.empty_like(x)
        out = torch.empty(G, B, n_out, dtype=x.dtype, device=x.device)
        _head_kernels()[0][(G, -(-B // BLOCK_ROWS))](x, bias.contiguous(), head_weight.contiguous(), head_bias.contiguous(),
                                                      y, out, B, H, NO=n_out, BB=BLOCK_ROWS, BH=kernels._pow2(H),
                                                      num_warps=NUM_WARPS)
        ctx.save_for_backward(y, head_weight)
        ctx.dtypes = (bias.dtype, head_weight.dtype, head_bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        y, head_weight = ctx.saved_tensors
        grad = grad.contiguous()
        G, B, H = y.shape
        n_out = head_weight.shape[2]
        rows = -(-B // BLOCK_ROWS)
        d_x = torch.empty_like(y)
        parts_b = torch.empty(G, rows, H, dtype=torch.float32, device=y.device)
        parts_w = torch.empty(G, rows, n_out, H, dtype=torch.float32, device=y.device)
        _head_kernels()[1][(G, rows)](grad, y, head_weight.contiguous(), d_x, parts_b, parts_w, B, H, NO=n_out,
                                      BB=BLOCK_ROWS, BH=kernels._pow2(H), num_warps=NUM_WARPS)
        b_dtype, w_dtype, hb_dtype = ctx.dtypes
        return (d_x, parts_b.sum(1, keepdim=True).to(b_dtype), parts_w.sum(1).transpose(1, 2).to(w_dtype),
                grad.sum(1, keepdim=True, dtype=torch.float32).to(hb_dtype))


@functools.cache
def _head_kernels():
    """The tower+head forward and backward kernels: x, y, d_x (G, B, h), the heads' output and its
    gradient (G, B, O), weights (G, h, O), biases (G, 1, h) and (G, 1, O), all contiguous; a
    program owns one group's block of rows, whole rows of h, so the heads' sums stay in it."""
    triton, tl = kernels._triton()

    @triton.jit
    def tower_head_forward(x_ptr, b_ptr, hw_ptr, hb_ptr, y_ptr, out_ptr, B, H, NO: tl.constexpr, BB: tl.constexpr,
                           BH: tl.constexpr):
        g = tl.program_id(0).to(tl.int64)
        offs_b = tl.program_id(1).to(tl.int64) * BB + tl.arange(0, BB)
        offs_h = tl.arange(0, BH)
        mb = offs_b < B
        mh = offs_h < H
        m2 = mb[:, None] & mh[None, :]
        tile = g * B * H + offs_b[:, None] * H + offs_h[None, :]
        x = tl.load(x_ptr + tile, mask=m2, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + g * H + offs_h, mask=mh, other=0.0).to(tl.float32)
        y = tl.maximum(x + b[None, :], 0.0).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + tile, y, mask=m2)
        yf = y.to(tl.float32)  # the heads read the hidden layer as rounded, as a GEMM after it would
        for o in tl.static_range(NO):
            w = tl.load(hw_ptr + g * H * NO + offs_h * NO + o, mask=mh, other=0.0).to(tl.float32)
            logit = tl.sum(yf * w[None, :], axis=1) + tl.load(hb_ptr + g * NO + o).to(tl.float32)
            tl.store(out_ptr + g * B * NO + offs_b * NO + o, logit.to(out_ptr.dtype.element_ty), mask=mb)

    @triton.jit
    def tower_head_backward(d_ptr, y_ptr, hw_ptr, dx_ptr, pb_ptr, pw_ptr, B, H, NO: tl.constexpr, BB: tl.constexpr,
                            BH: tl.constexpr):
        g = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        offs_b = blk.to(tl.int64) * BB + tl.arange(0, BB)
        offs_h = tl.arange(0, BH)
        mb = offs_b < B
        mh = offs_h < H
        m2 = mb[:, None] & mh[None, :]
        tile = g * B * H + offs_b[:, None] * H + offs_h[None, :]
        y = tl.load(y_ptr + tile, mask=m2, other=0.0)
        yf = y.to(tl.float32)
        part = g * tl.num_programs(1) + blk
        dy = tl.zeros((BB, BH), dtype=tl.float32)
        for o in tl.static_range(NO):
            d_o = tl.load(d_ptr + g * B * NO + offs_b * NO + o, mask=mb, other=0.0).to(tl.float32)  # (BB,)
            w = tl.load(hw_ptr + g * H * NO + offs_h * NO + o, mask=mh, other=0.0).to(tl.float32)
            dy += d_o[:, None] * w[None, :]
            # this block's share of the heads' weight gradient: the hidden layer times its output's gradient
            tl.store(pw_ptr + (part * NO + o) * H + offs_h, tl.sum(yf * d_o[:, None], axis=0), mask=mh)
        dx = tl.where(y > 0, dy, 0.0).to(dx_ptr.dtype.element_ty)
        tl.store(dx_ptr + tile, dx, mask=m2)
        tl.store(pb_ptr + part * H + offs_h, tl.sum(dx.to(tl.float32), axis=0), mask=mh)

    return tower_head_forward, tower_head_backward


@functools.cache
def _kernels():
    """The forward and the backward kernel, built on first use. Inputs and outputs are
    contiguous (G, B, h); a program owns one group's block of rows."""
    triton, tl = kernels._triton()

    @triton.jit
    def bias_relu_forward(x_ptr, b_ptr, out_ptr, B, H, BB: tl.constexpr, BH: tl.constexpr):
        g = tl.program_id(0).to(tl.int64)
        offs_b = tl.program_id(1).to(tl.int64) * BB + tl.arange(0, BB)
        offs_h = tl.arange(0, BH)
        mh = offs_h < H
        m2 = (offs_b < B)[:, None] & mh[None, :]
        tile = g * B * H + offs_b[:, None] * H + offs_h[None, :]
        x = tl.load(x_ptr + tile, mask=m2, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + g * H + offs_h, mask=mh, other=0.0).to(tl.float32)
        y = tl.maximum(x + b[None, :], 0.0)
        tl.store(out_ptr + tile, y.to(out_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def bias_relu_backward(d_ptr, out_ptr, dx_ptr, part_ptr, B, H, BB: tl.constexpr, BH: tl.constexpr):
        g = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        offs_b = blk.to(tl.int64) * BB + tl.arange(0, BB)
        offs_h = tl.arange(0, BH)
        mh = offs_h < H
        m2 = (offs_b < B)[:, None] & mh[None, :]
        tile = g * B * H + offs_b[:, None] * H + offs_h[None, :]
        d = tl.load(d_ptr + tile, mask=m2, other=0.0)
        y = tl.load(out_ptr + tile, mask=m2, other=0.0)
        dx = tl.where(y > 0, d, 0.0).to(dx_ptr.dtype.element_ty)
        tl.store(dx_ptr + tile, dx, mask=m2)
        # this block's share of the bias gradient (masked rows are zeros), from the values the
        # input gradient holds, as PyTorch's sum over the batch of that gradient
        tl.store(part_ptr + (g * tl.num_programs(1) + blk) * H + offs_h, tl.sum(dx.to(tl.float32), axis=0), mask=mh)

    return bias_relu_forward, bias_relu_backward
