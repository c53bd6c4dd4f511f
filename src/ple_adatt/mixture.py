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


def reference_mixture(gates: Tensor, shared: Tensor, task: Tensor | None) -> Tensor:
    """The PyTorch form: ``gates`` (T, B, K), ``shared`` (E, B, d), ``task`` (T, E_t, B, d) or
    None; K = E + E_t. Returns (T, B, d) in the experts' dtype.

    unbind, not indexing: its backward writes the experts' gradient once (one stack), where
    each index's backward writes a zero-filled full-size gradient to be summed."""
    experts = shared.unbind(0)
    if task is not None:
        experts += task.unbind(1)  # E_t x (T, B, d)
    cgc = gates[..., :1] * experts[0]
    for k in range(1, len(experts)):
        cgc = torch.addcmul(cgc, gates[..., k:k + 1], experts[k])
    return cgc.to(shared.dtype)


def failed() -> bool:
    """True once the kernels failed to build, launch or check in this process."""
    return GUARD.failed()


def fused_available(device: torch.device) -> bool:
    """True when the fused mixture runs compiled here: CUDA, triton, and no earlier failure."""
    return kernels.available(device) and not failed()


def gated_mixture(gates: Tensor, shared: Tensor, task: Tensor | None, fused: bool = True) -> Tensor:
    """The CGC mixture: the fused kernel where it can run (and ``fused``), else PyTorch."""
    if not fused or torch.compiler.is_compiling() or not fused_available(gates.device) or gates.shape[1] == 0:
        return reference_mixture(gates, shared, task)
    try:
        if not GUARD.checked:
            if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
                return reference_mixture(gates, shared, task)  # the check needs autograd: until it has run
            if not _check_once(gates, shared, task):
                return reference_mixture(gates, shared, task)
        return fused_mixture(gates, shared, task)
    except torch.cuda.OutOfMemoryError:
        raise  # the batch's problem, not the kernels': the trainer skips it and the kernels stay on
    except Exception as exc:  # noqa: BLE001 - any Triton/driver failure: keep training on PyTorch
        GUARD.switch_off(f"{type(exc).__name__}: {exc}")
        return reference_mixture(gates, shared, task)


def _check_once(gates: Tensor, shared: Tensor, task: Tensor | None, tol: float = 2e-2) -> bool:
    """Compare the kernel's forward and gradients with the PyTorch form's once per process, on
    the batch at hand (detached copies; one host read). Relative to each result's largest
    magnitude: bf16 outputs round at about 4e-3."""
    GUARD.checked = True
    ins = [t.detach().requires_grad_() for t in (gates, shared, *(() if task is None else (task,)))]
    with torch.enable_grad():
        outs = [fn(ins[0], ins[1], ins[2] if task is not None else None)
                for fn in (fused_mixture, reference_mixture)]
        # its own generator: the check must not shift the training's random stream
        gen = torch.Generator(device=outs[1].device).manual_seed(0)
        grad = torch.randn(outs[1].shape, generator=gen, device=outs[1].device).to(outs[1].dtype)
        grads = [torch.autograd.grad(o, ins, grad) for o in outs]
    worst = 0.0
    for a, b in zip((outs[0], *grads[0]), (outs[1], *grads[1])):
        a, b = a.detach().float(), b.detach().float()
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)))
    if worst > tol:
        GUARD.switch_off(f"its result differs from the PyTorch form by {worst:.3g} of the largest value")
        return False
    return True


def fused_mixture(gates: Tensor, shared: Tensor, task: Tensor | None) -> Tensor:
    """The Triton kernels (autograd-aware): same contract as :func:`reference_mixture`."""
    if kernels._triton() is None:
        raise RuntimeError("the fused CGC mixture needs triton (pip install triton)")
    if gates.device.type != "cuda" and not kernels.interpreted():
        raise RuntimeError(f"the fused CGC mixture runs on CUDA (or on the CPU under TRITON_INTERPRET=1), "
                           f"not on {gates.device.type}")
    T, B, K = gates.shape
    E = shared.shape[0]
    e_t = 0 if task is None else task.shape[1]
    if E + e_t != K:
        raise ValueError(f"gates have {K} columns for {E} shared and {e_t} task experts")
    return _FusedMixture.apply(gates, shared, task)


def _last_dim_dense(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _FusedMixture(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates: Tensor, shared: Tensor, task: Tensor | None) -> Tensor:
        shared = shared.contiguous()  # the backward writes d_shared (empty_like) with these strides
        task = None if task is None else _last_dim_dense(task)
        T, B, _ = gates.shape
        E, _, D = shared.shape
        e_t = 0 if task is None else task.shape[1]
        out = torch.empty(T, B, D, dtype=shared.dtype, device=shared.device)
        te = shared if task is None else task  # a valid pointer when there are no task experts
        ts = (0, 0, 0) if task is None else (task.stride(0), task.stride(1), task.stride(2))
        bd = kernels._pow2(D)
        _kernels()[0][(T, -(-B // BLOCK_ROWS))](
            gates, shared, te, out, B, D, E, e_t,
            gates.stride(0), gates.stride(1), gates.stride(2), shared.stride(0), shared.stride(1), *ts,
            out.stride(0), out.stride(1), BB=BLOCK_ROWS, BD=bd, num_warps=NUM_WARPS)
        ctx.save_for_backward(gates, shared, task)
        ctx.e_t = e_t
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        gates, shared, task = ctx.saved_tensors
        d_out = _last_dim_dense(d_out)
        T, B, K = gates.shape
        E, _, D = shared.shape
        bd, rows = kernels._pow2(D), -(-B // BLOCK_ROWS)
        d_gates = torch.empty(T, B, K, dtype=gates.dtype, device=gates.device)
        d_shared = torch.empty_like(shared)
        fwd_bwd = _kernels()
        fwd_bwd[1][(E, rows)](
            gates, shared, d_out, d_gates, d_shared, T, B, D,
            gates.stride(0), gates.stride(1), gates.stride(2), shared.stride(0), shared.stride(1),
            d_out.stride(0), d_out.stride(1), d_gates.stride(0), d_gates.stride(1), d_gates.stride(2),
            BB=BLOCK_ROWS, BD=bd, num_warps=NUM_WARPS)
        d_task = None
        if task is not None:
            d_task = torch.empty_like(task)
            fwd_bwd[2][(T, rows)](
                gates, task, d_out, d_gates, d_task, B, D, E, ctx.e_t,
                gates.stride(0), gates.stride(1), gates.stride(2), task.stride(0), task.stride(1), task.stride(2),
                d_out.stride(0), d_out.stride(1), d_gates.stride(0), d_gates.stride(1), d_gates.stride(2),
                d_task.stride(0), d_task.stride(1), d_task.stride(2), BB=BLOCK_ROWS, BD=bd,
                num_warps=NUM_WARPS)
        return d_gates, d_shared, d_task


@functools.cache
def _kernels():
    """The forward kernel and the two backward kernels, built on first use."""
    triton, tl = kernels._triton()

    @triton.jit
    def mix_forward(g_ptr, s_ptr, te_ptr, out_ptr, B, D, E, ET,
                    s_gt, s_gb, s_gk, s_se, s_sb, s_tt, s_tk, s_tb, s_ot, s_ob,
                    BB: tl.constexpr, BD: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)  # tasks vary fastest: neighbours share the S tiles in L2
        offs_b = tl.program_id(1).to(tl.int64) * BB + tl.arange(0, BB)
        offs_d = tl.arange(0, BD)
        mb = offs_b < B
        m2 = mb[:, None] & (offs_d < D)[None, :]
        acc = tl.zeros((BB, BD), dtype=tl.float32)
        for e in range(E):
            g = tl.load(g_ptr + t * s_gt + offs_b * s_gb + e * s_gk, mask=mb, other=0.0).to(tl.float32)
            s = tl.load(s_ptr + e * s_se + offs_b[:, None] * s_sb + offs_d[None, :], mask=m2, other=0.0)
            acc += g[:, None] * s.to(tl.float32)
        for k in range(ET):
            g = tl.load(g_ptr + t * s_gt + offs_b * s_gb + (E + k) * s_gk, mask=mb, other=0.0).to(tl.float32)
            v = tl.load(te_ptr + t * s_tt + k * s_tk + offs_b[:, None] * s_tb + offs_d[None, :], mask=m2, other=0.0)
            acc += g[:, None] * v.to(tl.float32)
        tl.store(out_ptr + t * s_ot + offs_b[:, None] * s_ob + offs_d[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def mix_backward_shared(g_ptr, s_ptr, do_ptr, dg_ptr, ds_ptr, T, B, D,
                            s_gt, s_gb, s_gk, s_se, s_sb, s_dot, s_dob, s_dgt, s_dgb, s_dgk,
                            BB: tl.constexpr, BD: tl.constexpr):
        e = tl.program_id(0).to(tl.int64)  # experts vary fastest: neighbours share the dL/dcgc tiles
        offs_b = tl.program_id(1).to(tl.int64) * BB + tl.arange(0, BB)
        offs_d = tl.arange(0, BD)
        mb = offs_b < B
        m2 = mb[:, None] & (offs_d < D)[None, :]
        tile = e * s_se + offs_b[:, None] * s_sb + offs_d[None, :]
        s = tl.load(s_ptr + tile, mask=m2, other=0.0).to(tl.float32)
        acc = tl.zeros((BB, BD), dtype=tl.float32)
        for t in range(T):
            do = tl.load(do_ptr + t * s_dot + offs_b[:, None] * s_dob + offs_d[None, :], mask=m2,
                         other=0.0).to(tl.float32)
            g = tl.load(g_ptr + t * s_gt + offs_b * s_gb + e * s_gk, mask=mb, other=0.0).to(tl.float32)
            acc += g[:, None] * do
            tl.store(dg_ptr + t * s_dgt + offs_b * s_dgb + e * s_dgk, tl.sum(s * do, axis=1), mask=mb)
        tl.store(ds_ptr + tile, acc.to(ds_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def mix_backward_task(g_ptr, te_ptr, do_ptr, dg_ptr, dte_ptr, B, D, E, ET,
                          s_gt, s_gb, s_gk, s_tt, s_tk, s_tb, s_dot, s_dob, s_dgt, s_dgb, s_dgk,
                          s_dtt, s_dtk, s_dtb, BB: tl.constexpr, BD: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs_b = tl.program_id(1).to(tl.int64) * BB + tl.arange(0, BB)
        offs_d = tl.arange(0, BD)
        mb = offs_b < B
        m2 = mb[:, None] & (offs_d < D)[None, :]
        do = tl.load(do_ptr + t * s_dot + offs_b[:, None] * s_dob + offs_d[None, :], mask=m2,
                     other=0.0).to(tl.float32)
        for k in range(ET):
            g = tl.load(g_ptr + t * s_gt + offs_b * s_gb + (E + k) * s_gk, mask=mb, other=0.0).to(tl.float32)
            v = tl.load(te_ptr + t * s_tt + k * s_tk + offs_b[:, None] * s_tb + offs_d[None, :], mask=m2,
                        other=0.0).to(tl.float32)
            tl.store(dg_ptr + t * s_dgt + offs_b * s_dgb + (E + k) * s_dgk, tl.sum(v * do, axis=1), mask=mb)
            tl.store(dte_ptr + t * s_dtt + k * s_dtk + offs_b[:, None] * s_dtb + offs_d[None, :],
                     (g[:, None] * do).to(dte_ptr.dtype.element_ty), mask=m2)

    return mix_forward, mix_backward_shared, mix_backward_task
