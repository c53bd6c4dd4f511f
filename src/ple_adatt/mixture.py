"""The CGC gated mixture, and a fused Triton kernel for it on the GPU.

Each task's CGC output mixes the shared experts' outputs and its own task experts' outputs
with its gate weights::

    cgc_t = sum_e gate_{t,e} S_e  +  sum_k gate_{t,E+k} TE_{t,k}          (B, d) per task

The contraction over the K = E + E_t experts is too short for a matrix product, so it is
elementwise work, and memory-bound. In PyTorch it is one multiply-add per expert; its
backward adds, per expert, a product for the experts' gradient, a product and a sum for the
gates' gradient, and a sum over tasks for the shared experts. Each of those passes writes a
full (T, B, d) tensor. On CUDA, autocast also runs the softmax (hence the gates) in float32,
so every pass is float32: at the seed's shape (16 tasks, batch 16384, d 128, 6 experts per
task) about 7.6 GB moved per step, about 2.5 ms of an H100's bandwidth.

The fused path reads each input once and writes each result once: about 0.7 GB. Forward: one
program per (task, block of rows) accumulates the K products in float32 registers. Backward:
one program per (shared expert, block of rows) walks the tasks, summing the expert's
gradient over them and writing each task's gate gradient; one program per (task, block of
rows) writes its task experts' and gates' gradients. The output has the experts' dtype (bf16
under autocast; the PyTorch path casts to it too), so the towers read half the bytes.

The experts' last layers can leave their bias to the mixture (``shared_bias``, ``task_bias``):
``cgc_t = sum_k gate_{t,k} (S_k + b_k)``. The kernels add the bias row as they load each
expert's tile, and write each bias gradient as per-block column sums of that expert's gradient,
summed afterwards (no atomics: the result does not depend on the programs' order). The experts'
GEMMs then skip ``baddbmm``'s broadcast copy of the bias into the output (134 us at the seed's
task-expert shape on an H100) and its read back, and the bias gradients their own pass over the
batch.

It runs on CUDA when triton is importable, outside ``torch.compile`` (whose inductor fuses the
PyTorch form itself). Its first use in a process is checked against the PyTorch form (forward
and all gradients); a failure to build or a mismatch switches it off for the process with
one warning. On the CPU the tests run it under Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import kernels

__all__ = ["gated_mixture", "reference_mixture", "fused_mixture", "fused_available", "failed"]

GUARD = kernels.KernelGuard("fused CGC mixture kernel", "the PyTorch form")
# rows per program and warps: compiled for sm_90 with the JIT's specialisation at the seed's
# shape (bench/kernel_report.py), (16, 128) tiles at 4 warps take 40-64 registers, 32 rows
# 72-128, 64 rows up to 255; none spills. The kernels are memory-bound: the smallest tile keeps
# the most programs resident
BLOCK_ROWS = 16
NUM_WARPS = 4


def reference_mixture(gates: Tensor, shared: Tensor, task: Tensor | None, shared_bias: Tensor | None = None,
                      task_bias: Tensor | None = None) -> Tensor:
    """The PyTorch form: ``gates`` (T, B, K), ``shared`` (E, B, d), ``task`` (T, E_t, B, d) or
    None; K = E + E_t. Returns (T, B, d) in the experts' dtype. ``shared_bias`` (E, 1, d) and
    ``task_bias`` (T, E_t, 1, d), where given, are added to the experts' outputs first.

    unbind, not indexing: its backward writes the experts' gradient once (one stack), where
    each index's backward writes a zero-filled full-size gradient to be summed."""
    _check_biases(shared, task, shared_bias, task_bias)
    if shared_bias is not None:
        shared = shared + shared_bias.to(shared.dtype)
        if task is not None:
            task = task + task_bias.to(task.dtype)
    experts = shared.unbind(0)
    if task is not None:
        experts += task.unbind(1)  # E_t x (T, B, d)
    cgc = gates[..., :1] * experts[0]
    for k in range(1, len(experts)):
        cgc = torch.addcmul(cgc, gates[..., k:k + 1], experts[k])
    return cgc.to(shared.dtype)


def _check_biases(shared: Tensor, task: Tensor | None, shared_bias: Tensor | None,
                  task_bias: Tensor | None) -> None:
    """Both biases or neither (``task_bias`` None where there are no task experts), each the
    shape of its experts' bias rows."""
    E, _, D = shared.shape
    if shared_bias is None:
        if task_bias is not None:
            raise ValueError("task_bias without shared_bias: give the mixture both experts' biases or neither")
        return
    if tuple(shared_bias.shape) != (E, 1, D):
        raise ValueError(f"shared_bias has shape {tuple(shared_bias.shape)}; the shared experts need ({E}, 1, {D})")
    if task is None:
        if task_bias is not None:
            raise ValueError("task_bias given, but there are no task experts")
        return
    want = (task.shape[0], task.shape[1], 1, D)
    if task_bias is None or tuple(task_bias.shape) != want:
        got = None if task_bias is None else tuple(task_bias.shape)
        raise ValueError(f"task_bias is {got}; with shared_bias the task experts need their biases too, {want}")


def failed() -> bool:
    """True once the kernels failed to build, launch or check in this process."""
    return GUARD.failed()


def fused_available(device: torch.device) -> bool:
    """True when the fused mixture runs compiled here: CUDA, triton, and no earlier failure."""
    return kernels.available(device) and not failed()


def gated_mixture(gates: Tensor, shared: Tensor, task: Tensor | None, fused: bool = True,
                  shared_bias: Tensor | None = None, task_bias: Tensor | None = None) -> Tensor:
    """The CGC mixture: the fused kernel where it can run (and ``fused``), else PyTorch
    (:func:`ple_adatt.kernels.checked_call`: checked on first use, switched off on a failure)."""
    _check_biases(shared, task, shared_bias, task_bias)  # the caller's error on either path
    return kernels.checked_call(GUARD, fused_mixture, reference_mixture, (gates, shared, task, shared_bias, task_bias),
                                fused, lambda: fused_available(gates.device) and gates.shape[1] > 0,
                                batch_dims=(1, 1, 2, None, None))


def fused_mixture(gates: Tensor, shared: Tensor, task: Tensor | None, shared_bias: Tensor | None = None,
                  task_bias: Tensor | None = None) -> Tensor:
    """The Triton kernels (autograd-aware): same contract as :func:`reference_mixture`."""
    kernels.require_runnable("the fused CGC mixture", gates.device)
    T, B, K = gates.shape
    E = shared.shape[0]
    e_t = 0 if task is None else task.shape[1]
    if E + e_t != K:
        raise ValueError(f"gates have {K} columns for {E} shared and {e_t} task experts")
    D = shared.shape[2]
    if max(T * max(e_t, 1) * D, T * K, E * D) * B >= 2**31:  # the kernels' offsets are 32-bit
        raise ValueError(f"batch {B} too large for the fused CGC mixture's 32-bit offsets ({T} tasks, {E} shared "
                         f"and {e_t} task experts of width {D}); use a smaller batch or training.fused_mixture: false")
    _check_biases(shared, task, shared_bias, task_bias)
    return _FusedMixture.apply(gates, shared, task, shared_bias, task_bias)


def _last_dim_dense(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _FusedMixture(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates: Tensor, shared: Tensor, task: Tensor | None, shared_bias: Tensor | None,
                task_bias: Tensor | None) -> Tensor:
        shared = shared.contiguous()  # the backward writes d_shared (empty_like) with these strides
        task = None if task is None else _last_dim_dense(task)
        T, B, _ = gates.shape
        E, _, D = shared.shape
        e_t = 0 if task is None else task.shape[1]
        out = torch.empty(T, B, D, dtype=shared.dtype, device=shared.device)
        te = shared if task is None else task  # a valid pointer when there are no task experts
        ts = (0, 0, 0) if task is None else (task.stride(0), task.stride(1), task.stride(2))
        sb, tb = _bias_rows(shared_bias, task_bias, shared)
        bd = kernels._pow2(D)
        _kernels()[0][(T, -(-B // BLOCK_ROWS))](
            gates, shared, te, sb, tb, out, B, D, E, e_t,
            gates.stride(0), gates.stride(1), gates.stride(2), shared.stride(0), shared.stride(1), *ts,
            out.stride(0), out.stride(1), HAS_BIAS=shared_bias is not None, BB=BLOCK_ROWS, BD=bd,
            num_warps=NUM_WARPS)
        ctx.save_for_backward(gates, shared, task, sb, tb)
        ctx.e_t = e_t
        ctx.bias_dtypes = None if shared_bias is None else (
            shared_bias.dtype, None if task_bias is None else task_bias.dtype)
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        gates, shared, task, sb, tb = ctx.saved_tensors
        d_out = _last_dim_dense(d_out)
        T, B, K = gates.shape
        E, _, D = shared.shape
        bd, rows = kernels._pow2(D), -(-B // BLOCK_ROWS)
        has_bias = ctx.bias_dtypes is not None
        d_gates = torch.empty(T, B, K, dtype=gates.dtype, device=gates.device)
        d_shared = torch.empty_like(shared)
        # the bias gradients' per-block column sums (float32), summed over the blocks below
        parts_s = torch.empty(E, rows if has_bias else 0, D, dtype=torch.float32, device=shared.device)
        fwd_bwd = _kernels()
        fwd_bwd[1][(E, rows)](
            gates, shared, sb, d_out, d_gates, d_shared, parts_s, T, B, D,
            gates.stride(0), gates.stride(1), gates.stride(2), shared.stride(0), shared.stride(1),
            d_out.stride(0), d_out.stride(1), d_gates.stride(0), d_gates.stride(1), d_gates.stride(2),
            HAS_BIAS=has_bias, BB=BLOCK_ROWS, BD=bd, num_warps=NUM_WARPS)
        d_task = parts_t = None
        if task is not None:
            d_task = torch.empty_like(task)
            parts_t = torch.empty(T, ctx.e_t, rows if has_bias else 0, D, dtype=torch.float32, device=task.device)
            fwd_bwd[2][(T, rows)](
                gates, task, tb, d_out, d_gates, d_task, parts_t, B, D, E, ctx.e_t,
                gates.stride(0), gates.stride(1), gates.stride(2), task.stride(0), task.stride(1), task.stride(2),
                d_out.stride(0), d_out.stride(1), d_gates.stride(0), d_gates.stride(1), d_gates.stride(2),
                d_task.stride(0), d_task.stride(1), d_task.stride(2), HAS_BIAS=has_bias, BB=BLOCK_ROWS, BD=bd,
                num_warps=NUM_WARPS)
        d_sb = d_tb = None
        if has_bias:
            s_dtype, t_dtype = ctx.bias_dtypes
            d_sb = parts_s.sum(1, keepdim=True).to(s_dtype)  # (E, 1, D)
            if parts_t is not None:
                d_tb = parts_t.sum(2, keepdim=True).to(t_dtype)  # (T, E_t, 1, D)
        return d_gates, d_shared, d_task, d_sb, d_tb


def _bias_rows(shared_bias: Tensor | None, task_bias: Tensor | None, shared: Tensor) -> tuple[Tensor, Tensor]:
    """The biases as contiguous rows for the kernels ((E, D) and (T*E_t, D) values), or
    ``shared`` as a valid pointer the kernels do not read where there are none."""
    sb = shared if shared_bias is None else shared_bias.contiguous()
    tb = sb if task_bias is None else task_bias.contiguous()
    return sb, tb


@functools.cache
def _kernels():
    """The forward kernel and the two backward kernels, built on first use."""
    triton, tl = kernels._triton()

    @triton.jit
    def mix_forward(g_ptr, s_ptr, te_ptr, sb_ptr, tb_ptr, out_ptr, B, D, E, ET,
                    s_gt, s_gb, s_gk, s_se, s_sb, s_tt, s_tk, s_tb, s_ot, s_ob,
                    HAS_BIAS: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)  # tasks vary fastest: neighbours share the S tiles in L2
        offs_b = tl.program_id(1).to(tl.int64) * BB + tl.arange(0, BB)
        offs_d = tl.arange(0, BD)
        mb = offs_b < B
        md = offs_d < D
        m2 = mb[:, None] & md[None, :]
        acc = tl.zeros((BB, BD), dtype=tl.float32)
        for e in range(E):
            g = tl.load(g_ptr + t * s_gt + offs_b * s_gb + e * s_gk, mask=mb, other=0.0).to(tl.float32)
            s = tl.load(s_ptr + e * s_se + offs_b[:, None] * s_sb + offs_d[None, :], mask=m2, other=0.0)
            s = s.to(tl.float32)
            if HAS_BIAS:  # as the PyTorch form adds them: the bias in the experts' dtype, the sum rounded
                s = (s + tl.load(sb_ptr + e * D + offs_d, mask=md, other=0.0).to(s_ptr.dtype.element_ty).to(tl.float32)[None, :])
                s = s.to(s_ptr.dtype.element_ty).to(tl.float32)
            acc += g[:, None] * s
        for k in range(ET):
            g = tl.load(g_ptr + t * s_gt + offs_b * s_gb + (E + k) * s_gk, mask=mb, other=0.0).to(tl.float32)
            v = tl.load(te_ptr + t * s_tt + k * s_tk + offs_b[:, None] * s_tb + offs_d[None, :], mask=m2, other=0.0)
            v = v.to(tl.float32)
            if HAS_BIAS:
                v = (v + tl.load(tb_ptr + (t * ET + k) * D + offs_d, mask=md, other=0.0).to(te_ptr.dtype.element_ty).to(tl.float32)[None, :])
                v = v.to(te_ptr.dtype.element_ty).to(tl.float32)
            acc += g[:, None] * v
        tl.store(out_ptr + t * s_ot + offs_b[:, None] * s_ob + offs_d[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def mix_backward_shared(g_ptr, s_ptr, sb_ptr, do_ptr, dg_ptr, ds_ptr, sbp_ptr, T, B, D,
                            s_gt, s_gb, s_gk, s_se, s_sb, s_dot, s_dob, s_dgt, s_dgb, s_dgk,
                            HAS_BIAS: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr):
        e = tl.program_id(0).to(tl.int64)  # experts vary fastest: neighbours share the dL/dcgc tiles
        blk = tl.program_id(1)
        offs_b = blk.to(tl.int64) * BB + tl.arange(0, BB)
        offs_d = tl.arange(0, BD)
        mb, md = offs_b < B, offs_d < D
        m2 = mb[:, None] & md[None, :]
        tile = e * s_se + offs_b[:, None] * s_sb + offs_d[None, :]
        s = tl.load(s_ptr + tile, mask=m2, other=0.0).to(tl.float32)
        if HAS_BIAS:
            s = (s + tl.load(sb_ptr + e * D + offs_d, mask=md, other=0.0).to(s_ptr.dtype.element_ty).to(tl.float32)[None, :])
            s = tl.where(m2, s.to(s_ptr.dtype.element_ty).to(tl.float32), 0.0)
        acc = tl.zeros((BB, BD), dtype=tl.float32)
        for t in range(T):
            do = tl.load(do_ptr + t * s_dot + offs_b[:, None] * s_dob + offs_d[None, :], mask=m2,
                         other=0.0).to(tl.float32)
            g = tl.load(g_ptr + t * s_gt + offs_b * s_gb + e * s_gk, mask=mb, other=0.0).to(tl.float32)
            acc += g[:, None] * do
            tl.store(dg_ptr + t * s_dgt + offs_b * s_dgb + e * s_dgk, tl.sum(s * do, axis=1), mask=mb)
        tl.store(ds_ptr + tile, acc.to(ds_ptr.dtype.element_ty), mask=m2)
        if HAS_BIAS:  # this block's share of the bias gradient (masked rows hold zeros)
            tl.store(sbp_ptr + (e * tl.num_programs(1) + blk) * D + offs_d, tl.sum(acc, axis=0), mask=md)

    @triton.jit
    def mix_backward_task(g_ptr, te_ptr, tb_ptr, do_ptr, dg_ptr, dte_ptr, tbp_ptr, B, D, E, ET,
                          s_gt, s_gb, s_gk, s_tt, s_tk, s_tb, s_dot, s_dob, s_dgt, s_dgb, s_dgk,
                          s_dtt, s_dtk, s_dtb, HAS_BIAS: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        offs_b = blk.to(tl.int64) * BB + tl.arange(0, BB)
        offs_d = tl.arange(0, BD)
        mb, md = offs_b < B, offs_d < D
        m2 = mb[:, None] & md[None, :]
        do = tl.load(do_ptr + t * s_dot + offs_b[:, None] * s_dob + offs_d[None, :], mask=m2,
                     other=0.0).to(tl.float32)
        for k in range(ET):
            g = tl.load(g_ptr + t * s_gt + offs_b * s_gb + (E + k) * s_gk, mask=mb, other=0.0).to(tl.float32)
            v = tl.load(te_ptr + t * s_tt + k * s_tk + offs_b[:, None] * s_tb + offs_d[None, :], mask=m2,
                        other=0.0).to(tl.float32)
            if HAS_BIAS:
                v = (v + tl.load(tb_ptr + (t * ET + k) * D + offs_d, mask=md, other=0.0).to(te_ptr.dtype.element_ty).to(tl.float32)[None, :])
                v = v.to(te_ptr.dtype.element_ty).to(tl.float32)
            tl.store(dg_ptr + t * s_dgt + offs_b * s_dgb + (E + k) * s_dgk, tl.sum(v * do, axis=1), mask=mb)
            d_te = g[:, None] * do
            tl.store(dte_ptr + t * s_dtt + k * s_dtk + offs_b[:, None] * s_dtb + offs_d[None, :],
                     d_te.to(dte_ptr.dtype.element_ty), mask=m2)
            if HAS_BIAS:  # masked rows: do and g load as zeros
                tl.store(tbp_ptr + ((t * ET + k) * tl.num_programs(1) + blk) * D + offs_d, tl.sum(d_te, axis=0),
                         mask=md)

    return mix_forward, mix_backward_shared, mix_backward_task
