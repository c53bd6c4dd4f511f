"""A fused Triton kernel for the per-task gradients on the shared experts (adaTT's measurement).

For every task ``t`` and shared expert ``e`` (an MLP ``s = relu(x W1 + b1) W2 + b2``), with
``ds_te = gate_te * dL_t/dcgc_t`` the task's gradient at the expert's output (B, d):

    dh_te  = (ds_te W2_e^T) * [pre_e > 0]        (B, h)
    gW1_te = x^T dh_te      gb1_te = sum_b dh_te   (i, h), (h,)
    gW2_te = hid_e^T ds_te  gb2_te = sum_b ds_te   (h, d), (d,)

The kernel reads ``ds`` for all tasks and experts from one (E, B, T, d) tensor that a small
kernel writes first (:func:`expert_output_grads`, 0.27 GB in bf16 at the seed's shape): plain
loads feed the products and pipeline, where a gate product computed in the loop stalled them.

The plain PyTorch form (:meth:`SharedExperts.per_task_grads`) materialises ``dh`` for all
tasks: T * E * B * h values (2 GiB in bf16 at the seed's shape), written once, masked and
read again. Here one program owns a (task, expert, block of hidden units) and walks the
batch in tiles, chaining the three matrix products on chip (as flash attention chains its
two), so ``dh`` never reaches device memory. Programs of one (expert, block) for all tasks
run side by side and share the ``pre``/``x`` tiles through L2. The result is written
straight into the (T, P) gradient matrix, in the order of ``SharedExperts.parameters()``.
``x`` is padded to the tile width with a ones column, then zeros, so ``gb1`` is the ones
column's row of the ``gW1`` product rather than a reduction of every ``dh`` tile across threads
(sm_90: 7-43 fewer registers per config, up to 24 KB less shared memory).

Two tile layouts compete in the autotuner, so the faster on the GPU at hand wins: ``HROWS``
(the hidden block as rows: both register tiles feed the next product as its left operand,
as P does in flash attention) and the batch tile as rows (the first layout, measured on an
H100 at about 90 TFLOP/s). :func:`tuned_config` says which won.

Two variants split the work differently (:data:`VARIANTS`): ``fused`` does all of it in the
kernel; ``split`` leaves ``gW2`` (a third of the FLOPs) to one cuBLAS GEMM per expert over
all tasks, ``hid^T @ [ds_1 .. ds_T]`` (each expert's slice of ``ds`` is its (B, T*d) operand),
and keeps the kernel to the chained ``dh -> gW1`` pair, with half the accumulator registers
per program. ``split_bits`` is ``split`` with the ReLU mask read as bits: a small kernel packs
``pre > 0`` into one int32 word per 32 batch rows (:func:`relu_mask_bits`, 8 MB at the seed's
shape, against the 134 MB bf16 hidden layer that ``split`` reads for the mask); each program's
tile then loads 16 times fewer bytes for it. The per-task kernel reads its tiles from L2 (the
programs of one expert and hidden block share ``x`` and the mask, those of one task and expert
share ``ds``): at the seed's shape that is 40-48 KB per tile step for 1-2 M multiply-adds, about
4-8 TB/s at the H100's measured kernel time, near what its L2 delivers; the mask is a third of
those bytes at BH = 128. On CUDA the first call for a shape times the variants once and keeps
the fastest (:func:`tuned_config` says which).

Triton is optional: :func:`available` says whether the kernel can run (CUDA tensors and an
importable triton); the model falls back to the PyTorch form otherwise. On the CPU the
kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``), which the tests use.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch
from torch import Tensor

__all__ = ["available", "preferred", "batch_kind", "check_once", "checked", "failed", "shared_task_grads", "shared_task_grads_or_none",
           "tuned_config", "KernelGuard", "GUARD", "LAYOUTS", "VARIANTS"]

LAYOUTS = ("hrows", "brows")  # hidden block as rows / batch tile as rows
VARIANTS = ("fused", "split", "split_bits")  # all in the kernel / gW2 as a cuBLAS GEMM / and the mask as bits
DEFAULT_LAYOUTS = LAYOUTS  # what the autotuner chooses among (the bench times each on its own)
DEFAULT_VARIANT: str | None = None  # None: the faster, timed once per shape (the bench forces each)
# gb1 from a ones column of the padded x (where x has room below the tile width); False: the
# row reduction of every dh tile that came before it (the bench's --grads times both)
GB1_FROM_ONES_COLUMN = True
# The autotuner's tile configs, (BB, BH, warps, stages), per (variant, layout): those that
# compile for sm_90 without spilling registers and with warpgroup MMAs (HGMMA), by
# bench/kernel_report.py (which tests/test_bench_scripts.py runs with --check). The first
# layout's configs as measured on the H100 (64x64x8x3, 64x128x8x2, 128x64x8x2, 32x128x4x3)
# all spilled: 300-2000 bytes of stack, with 255 registers.
TILES = {
    ("fused", "hrows"): [(64, 64, 8, 3), (64, 64, 8, 2), (32, 64, 8, 3), (64, 64, 8, 4)],
    ("fused", "brows"): [(32, 64, 8, 3)],  # its only config without spills (some dots on HMMA)
    ("split", "hrows"): [(64, 128, 8, 2), (64, 128, 8, 3), (64, 128, 8, 4), (128, 64, 8, 2), (128, 128, 8, 2),
                         (64, 64, 8, 3)],
    ("split", "brows"): [(64, 64, 8, 3), (128, 64, 8, 2), (64, 64, 8, 2)],
}
# the mask as bits: the same tiles (every BB a multiple of the 32 rows of a mask word)
TILES["split_bits", "hrows"] = TILES["split", "hrows"]
TILES["split_bits", "brows"] = TILES["split", "brows"]
MASK_WORD = 32  # batch rows per word of the packed ReLU mask

logger = logging.getLogger(__name__)


class KernelGuard:
    """The per-process state of one optional Triton kernel: checked once against its
    PyTorch reference on first use, and switched off for the rest of the process by its first
    failure (a compile or launch error, or a check it fails), with one warning. A kernel that
    a Triton or driver bug breaks then costs speed, never a wrong result or a failed run."""

    def __init__(self, what: str, fallback: str) -> None:
        self.what, self.fallback = what, fallback
        self.failures: list[str] = []  # why it was switched off; the first is reported
        self.checked = False  # the first-use comparison has run
        self.kinds: set[bool | int] = set()  # the kinds it ran on (:func:`batch_kind`; a tile width)

    def failed(self) -> bool:
        return bool(self.failures)

    def needs_check(self, kind: bool | int | None = None) -> bool:
        """Whether a call on a batch of ``kind`` must be checked first: nothing checked yet, or
        only batches of the other kind (an epoch's last, shorter batch runs a variant that
        Triton compiled apart). A guard marked checked with no kind recorded trusts every kind."""
        return not self.checked or (kind is not None and bool(self.kinds) and kind not in self.kinds)

    def mark_checked(self, kind: bool | int | None = None) -> None:
        self.checked = True
        if kind is not None:
            self.kinds.add(kind)

    def switch_off(self, why: str) -> None:
        if not self.failures:
            logger.warning("%s off for this process (%s); using %s", self.what, why.splitlines()[0],
                           self.fallback)
        self.failures.append(why)

    def reason(self) -> str | None:
        return self.failures[0] if self.failures else None


def require_runnable(what: str, device: torch.device) -> None:
    """Raise, naming ``what``, unless its Triton kernels can run on ``device``: CUDA with
    triton, or the CPU under Triton's interpreter."""
    if _triton() is None:
        raise RuntimeError(f"{what} needs triton (pip install triton)")
    if device.type != "cuda" and not interpreted():
        raise RuntimeError(f"{what} runs on CUDA (or on the CPU under TRITON_INTERPRET=1), not on {device.type}")


def batch_kind(rows: int) -> bool:
    """Triton compiles a kernel apart for a row count that 16 divides and one it does not: the
    kind of a batch, for the first-use checks (each kind is checked on its first batch)."""
    return rows % 16 == 0


def matches_reference(guard: KernelGuard, fused, reference, args: tuple, tol: float = 2e-2,
                      differentiable: bool = True, kind: bool | None = None) -> bool | None:
    """The first-use check of a fused op: ``fused(*args)`` against ``reference(*args)``, and for
    an autograd-aware op (``differentiable``) the gradients of every tensor argument too
    (detached copies; ``None`` arguments pass through), each relative to the reference's largest
    magnitude (bf16 outputs round at about 4e-3). One host read. A mismatch (a NaN where the
    reference is finite counts as one) switches ``guard`` off (one warning) and returns False.
    Where the reference itself is not finite (a step whose loss overflowed: its backward
    carries NaN by design) nothing can be compared: None, and the guard stays unchecked."""
    if differentiable:
        ins = [None if a is None else a.detach().requires_grad_() for a in args]
        given = [a for a in ins if a is not None]
        with torch.enable_grad():
            outs = [fn(*ins) for fn in (fused, reference)]
            # its own generator: the check must not shift the training's random stream
            gen = torch.Generator(device=outs[1].device).manual_seed(0)
            grad = torch.randn(outs[1].shape, generator=gen, device=outs[1].device).to(outs[1].dtype)
            grads = [torch.autograd.grad(o, given, grad) for o in outs]
    else:
        outs, grads = [fn(*args) for fn in (fused, reference)], [(), ()]
    finite, worst = [], []
    for a, b in zip((outs[0], *grads[0]), (outs[1], *grads[1])):
        a, b = a.detach().float(), b.detach().float()
        finite.append(torch.isfinite(b).all().float())
        worst.append((a - b).abs().max() / b.abs().max().clamp_min(1e-30) if b.numel() else b.new_zeros(()))
    stats = torch.stack([*finite, *worst]).tolist()  # the one host read
    n = len(finite)
    if min(stats[:n]) < 1:
        return None
    # only now: a check that ran out of memory (the trainer skips that batch) runs again next time
    guard.mark_checked(kind)
    worst_value = max(stats[n:], key=lambda v: math.inf if math.isnan(v) else v)
    if math.isnan(worst_value) or worst_value > tol:
        guard.switch_off(f"its result differs from the PyTorch form by {worst_value:.3g} of the largest value")
        return False
    return True


# the rows a fused op's first-use check runs on: the kernels treat rows alike, so the first rows
# check them, and the check (both forms, forward and backward, at once) then costs a fraction of a
# step's memory. On the whole batch, the first run of the seed's shape peaked at 3.17 GiB on an
# H100 (1.27 GiB now), and a batch near the GPU's memory would have run out in every check, the
# trainer skipping every batch.
FIRST_USE_ROWS = 2048


def first_rows(args: tuple, batch_dims: tuple, rows: int | None = None) -> tuple:
    """``args`` cut to their first rows along each one's batch dimension (``batch_dims``, one per
    argument; None for an argument without one, such as a weight), as views: at most ``rows``
    (default :data:`FIRST_USE_ROWS`), as many as leave the same remainder modulo 16 as the whole
    batch, since Triton compiles a kernel apart for a row count that 16 divides and one it does
    not, and the check must run the variant the batch runs."""
    rows = FIRST_USE_ROWS if rows is None else rows
    _check_batch_dims(args, batch_dims)

    def cut(a: Tensor, d: int) -> Tensor:
        n = a.shape[d]
        return a if n <= rows else a.narrow(d, 0, rows - (rows - n) % 16)

    return tuple(a if d is None or a is None else cut(a, d) for a, d in zip(args, batch_dims, strict=True))


def _check_batch_dims(args: tuple, batch_dims: tuple) -> None:
    if len(batch_dims) != len(args):
        raise ValueError(f"{len(batch_dims)} batch dimensions for {len(args)} arguments")


def checked_call(guard: KernelGuard, fused, reference, args: tuple, wanted: bool, available,
                 differentiable: bool = True, check_reference=None, batch_dims: tuple | None = None,
                 out_batch_dim: int = 1):
    """``fused(*args)`` where ``wanted`` (the caller's switch), outside ``torch.compile`` (whose
    inductor fuses the PyTorch form itself) and ``available()`` (device, triton, guard; asked
    last, so that dynamo never traces it: on CUDA that would be a graph break), else
    ``reference(*args)``.

    The first call is checked against the reference (:func:`matches_reference`), or against
    ``check_reference`` where the fallback rounds differently from the fused op in a way that the
    check must not count (a ReLU whose mask flips where the two forms round a value near zero
    differently):
    - an autograd-aware op with its gradients, at its first call with autograd on; where
      ``batch_dims`` names each argument's batch dimension, both forms run on the batch's first
      rows (:func:`first_rows`): a check on the whole batch held both forms, forward and
      backward, at once;
    - an op that runs inside a backward (``differentiable=False``) on its values: the fused op on
      the whole batch (an autotuner keyed on the batch then picks the configuration the batch
      runs), its first rows along ``out_batch_dim`` against the reference's on the first rows.
    An error in the fused op (a Triton or driver failure) switches ``guard`` off with one warning
    and the reference takes over: a broken kernel costs speed, never a wrong model or a failed
    run. An out-of-memory error is the batch's, and raised."""
    if batch_dims is not None:  # the caller's bug, raised here: inside the try it would switch the kernel off
        _check_batch_dims(args, batch_dims)
    if not wanted or torch.compiler.is_compiling() or not available():
        return reference(*args)
    kind = None if batch_dims is None else next(
        (batch_kind(a.shape[d]) for a, d in zip(args, batch_dims) if a is not None and d is not None), None)
    try:
        if guard.needs_check(kind):
            if differentiable and (not torch.is_grad_enabled() or torch.is_inference_mode_enabled()):
                return reference(*args)  # the check needs autograd: until it has run
            check, checked, whole = fused, args, []
            if batch_dims is not None:
                checked = first_rows(args, batch_dims)
                if not differentiable:
                    def check(*_):
                        whole.append(fused(*args))  # the batch's result, returned once it passes
                        return first_rows((whole[0],), (out_batch_dim,))[0]
            if not matches_reference(guard, check, check_reference or reference, checked,
                                     differentiable=differentiable, kind=kind):
                return reference(*args)  # a mismatch (now off), or nothing comparable yet
            if whole:
                return whole[0]
        return fused(*args)
    except torch.cuda.OutOfMemoryError:
        raise  # the batch's problem, not the kernels': the trainer skips it and the kernels stay on
    except Exception as exc:  # noqa: BLE001 - any Triton/driver failure: keep training on PyTorch
        guard.switch_off(f"{type(exc).__name__}: {exc}")
        return reference(*args)


# batched then stays on the einsum path
GUARD = KernelGuard("fused per-task gradient kernel", "the einsum path")


@functools.cache
def _triton():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def available(device: torch.device) -> bool:
    """True when the fused kernel runs compiled on ``device`` (CUDA with triton installed).

    On the CPU it runs only when asked for (``grad_method: fused``) under the interpreter,
    which must be switched on (``TRITON_INTERPRET=1``) before triton is first imported."""
    return device.type == "cuda" and _triton() is not None


@functools.cache
def _kernel(layouts: tuple[str, ...], with_w2: bool = True, bits: bool = False):
    triton, tl = _triton()

    variant = "fused" if with_w2 else "split_bits" if bits else "split"
    tiles = {lay: TILES[variant, lay] for lay in layouts}
    if interpreted():  # one config (the first layout asked for): the interpreter cannot time them
        tiles, layouts = {k: [(MASK_WORD if bits else 16, 16, 1, 1)] for k in tiles}, layouts[:1]
    configs = [triton.Config({"BB": bb, "BH": bh, "HROWS": lay == "hrows"}, num_warps=w, num_stages=st)
               for lay in layouts for bb, bh, w, st in tiles[lay]]

    @triton.autotune(configs=configs, key=["B", "IN", "H", "D", "BI", "BD", "ONES_COL"])
    @triton.jit
    def kernel(x_ptr, pre_ptr, w2_ptr, ds_ptr, out_ptr,
               B, IN, H, D, P, PE,
               s_xb, s_pe, s_pb, s_de, s_db, s_dt,
               BI: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, WITH_W2: tl.constexpr,
               ONES_COL: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, HROWS: tl.constexpr,
               MASK_BITS: tl.constexpr = False):
        # MASK_BITS: pre_ptr is the packed mask (E, ceil(B / 32), H) int32 (relu_mask_bits), bit j
        # of word w for row 32 w + j, and s_pe, s_pb its strides; only without WITH_W2
        t = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        e = tl.program_id(2).to(tl.int64)
        offs_h = hb * BH + tl.arange(0, BH)
        offs_i = tl.arange(0, BI)
        offs_d = tl.arange(0, BD)
        mh, md = offs_h < H, offs_d < D
        # with x's column IN all ones (ONES_COL), gW1's row IN is gb1 = sum_b dh, out of the
        # product for free, and it lies where gb1 is stored (right after gW1's IN rows)
        mi = offs_i < IN + 1 if ONES_COL else offs_i < IN
        w2 = tl.load(w2_ptr + e * H * D + offs_h[:, None] * D + offs_d[None, :],
                     mask=mh[:, None] & md[None, :], other=0.0)  # (BH, BD)
        if HROWS:
            acc_w1 = tl.zeros((BH, BI), dtype=tl.float32)  # gW1^T block
        else:
            acc_w1 = tl.zeros((BI, BH), dtype=tl.float32)
        acc_w2 = tl.zeros((BH, BD), dtype=tl.float32)
        acc_b1 = tl.zeros((BH,), dtype=tl.float32)
        acc_b2 = tl.zeros((BD,), dtype=tl.float32)
        for b0 in range(0, B, BB):
            offs_b = b0 + tl.arange(0, BB)
            mb = offs_b < B
            # (BB, BD): dL_t/ds_e on this tile, built by _ds_kernel: a plain load feeds the
            # product, so the loads pipeline (as K and V tiles do in flash attention)
            ds = tl.load(ds_ptr + e * s_de + offs_b[:, None] * s_db + t * s_dt + offs_d[None, :],
                         mask=mb[:, None] & md[None, :], other=0.0)
            if WITH_W2:
                acc_b2 += tl.sum(ds.to(tl.float32), axis=0)
            # x comes padded to BI columns (zeros): a row-only mask lets the load vectorise
            xt = tl.load(x_ptr + offs_b[:, None] * s_xb + offs_i[None, :], mask=mb[:, None], other=0.0)  # (BB, BI)
            if HROWS:
                # the hidden block as rows: the two register tiles (dh^T, hid^T) feed the next
                # product directly as its left operand
                dh_t = tl.dot(w2, tl.trans(ds), input_precision=PREC)  # (BH, BB)
                if MASK_BITS:
                    offs_w = b0 // 32 + tl.arange(0, BB // 32)
                    words = tl.load(pre_ptr + e * s_pe + offs_w[None, :] * s_pb + offs_h[:, None],
                                    mask=mh[:, None] & (offs_w[None, :] < (B + 31) // 32), other=0)
                    on = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1  # (BH, BB/32, 32)
                    dh_t = tl.where(tl.reshape(on, (BH, BB)) != 0, dh_t, 0.0)
                else:
                    pre_t = tl.load(pre_ptr + e * s_pe + offs_b[None, :] * s_pb + offs_h[:, None],
                                    mask=mh[:, None] & mb[None, :], other=0.0)  # (BH, BB)
                    dh_t = tl.where(pre_t > 0, dh_t, 0.0)
                if not ONES_COL:
                    acc_b1 += tl.sum(dh_t, axis=1)
                acc_w1 = tl.dot(dh_t.to(xt.dtype), xt, acc_w1, input_precision=PREC)
                if WITH_W2:
                    hid_t = tl.maximum(pre_t, 0.0).to(ds.dtype)
                    acc_w2 = tl.dot(hid_t, ds, acc_w2, input_precision=PREC)
            else:
                # the batch tile as rows: the register tiles are the right operand
                dh = tl.dot(ds, tl.trans(w2), input_precision=PREC)  # (BB, BH)
                if MASK_BITS:
                    offs_w = b0 // 32 + tl.arange(0, BB // 32)
                    words = tl.load(pre_ptr + e * s_pe + offs_w[:, None] * s_pb + offs_h[None, :],
                                    mask=(offs_w[:, None] < (B + 31) // 32) & mh[None, :], other=0)
                    on = (words[:, None, :] >> tl.arange(0, 32)[None, :, None]) & 1  # (BB/32, 32, BH)
                    dh = tl.where(tl.reshape(on, (BB, BH)) != 0, dh, 0.0)
                else:
                    pre = tl.load(pre_ptr + e * s_pe + offs_b[:, None] * s_pb + offs_h[None, :],
                                  mask=mb[:, None] & mh[None, :], other=0.0)  # (BB, BH)
                    dh = tl.where(pre > 0, dh, 0.0)
                if not ONES_COL:
                    acc_b1 += tl.sum(dh, axis=0)
                acc_w1 = tl.dot(tl.trans(xt), dh.to(xt.dtype), acc_w1, input_precision=PREC)
                if WITH_W2:
                    acc_w2 = tl.dot(tl.trans(tl.maximum(pre, 0.0).to(ds.dtype)), ds, acc_w2, input_precision=PREC)
        base = out_ptr + t * P + e * PE
        if HROWS:
            tl.store(base + offs_i[None, :] * H + offs_h[:, None], acc_w1, mask=mh[:, None] & mi[None, :])
        else:
            tl.store(base + offs_i[:, None] * H + offs_h[None, :], acc_w1, mask=mi[:, None] & mh[None, :])
        if not ONES_COL:
            tl.store(base + IN * H + offs_h, acc_b1, mask=mh)
        if WITH_W2:
            tl.store(base + IN * H + H + offs_h[:, None] * D + offs_d[None, :], acc_w2,
                     mask=mh[:, None] & md[None, :])
            if hb == 0:
                tl.store(base + IN * H + H + H * D + offs_d, acc_b2, mask=md)

    return kernel


def preferred(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``grad_method: batched`` takes the kernel: on CUDA under autocast (bf16 / fp16
    products). In float32 the einsums are faster (exact float32 products made it 10x slower)."""
    return available(device) and dtype != torch.float32 and not failed()


def failed() -> bool:
    """True once the kernel failed to compile, launch or check in this process."""
    return GUARD.failed()


def shared_task_grads_or_none(*args: Tensor, **kwargs: Tensor) -> Tensor | None:
    """:func:`shared_task_grads`, or None (with one warning) if Triton cannot build or launch it
    here, so ``grad_method: batched`` keeps training on the einsum path instead of failing.
    ``grad_method: fused`` calls :func:`shared_task_grads` and lets the error through."""
    try:
        return shared_task_grads(*args, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise  # the batch's problem (the einsum path would need more): the kernel stays on
    except Exception as exc:  # noqa: BLE001 - any Triton/driver failure means: use einsum
        first = str(exc).splitlines()[0] if str(exc) else ""
        GUARD.switch_off(f"{type(exc).__name__}: {first}; set transfer.grad_method: fused to see the whole error")
        return None


def check_once(fast: Tensor, reference: Tensor, tol: float = 1e-3, rows: int | None = None) -> Tensor | None:
    """The first kernel result of a process (and the first on a batch of ``rows``' other kind,
    :func:`batch_kind`) is compared with the einsum path's: the cosine
    matrices must agree within ``tol``, the affinity target of issue 8 (bf16 products measured
    about 1e-5 from the loop at the seed's shape, so a miss is a fault). On a mismatch the kernel is switched
    off for the process (one warning) and None is returned, so a Triton or driver that
    miscompiles it costs speed, never a wrong affinity."""
    def cos(g: Tensor) -> Tensor:
        n = torch.nn.functional.normalize(g.float(), dim=1)
        return n @ n.t()

    diff = float((cos(fast) - cos(reference)).abs().max())  # one host read, once per batch kind
    GUARD.mark_checked(None if rows is None else batch_kind(rows))
    if diff <= tol:
        return fast
    GUARD.switch_off(f"it disagrees with the einsum path (max cosine difference {diff:.3g})")
    return None


def checked(rows: int | None = None) -> bool:
    """Whether the kernel's result on a batch of ``rows`` needs no first-use check."""
    return not GUARD.needs_check(None if rows is None else batch_kind(rows))


def _pow2(n: int) -> int:
    return max(16, 1 << (int(n) - 1).bit_length())


def tuned_config() -> str | None:
    """The variant, layout and tiles chosen for the last shape tuned, if any."""
    if _triton() is None or _kernel.cache_info().currsize == 0 or not _CHOSEN:
        return None
    variant = list(_CHOSEN.values())[-1]
    best = getattr(_kernel(tuple(DEFAULT_LAYOUTS), variant == "fused", variant == "split_bits"), "best_config",
                   None)
    if best is None:
        return variant
    kw = dict(best.kwargs)
    layout = "hrows" if kw.pop("HROWS") else "brows"
    return (f"{variant}: {layout} {' '.join(f'{k}={v}' for k, v in kw.items())} "
            f"warps={best.num_warps} stages={best.num_stages}")


_CHOSEN: dict[tuple, str] = {}  # shape key -> variant, timed once per process


def _time_variants(run) -> str:
    """Time each variant on the device (after one untimed call, which also autotunes) and
    return the fastest. Host synchronisation here, once per shape and process. A variant
    that fails to build or launch is left out with a warning; if both fail, the first error
    is raised (and ``batched`` falls back to the einsums)."""
    times: dict[str, float] = {}
    errors: list[Exception] = []
    for v in VARIANTS:
        try:
            run(v)
        except Exception as exc:  # noqa: BLE001 - any Triton/driver failure: try the other variant
            logger.warning("fused per-task gradient kernel, variant %s unavailable: %s", v,
                           str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            errors.append(exc)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            run(v)
        end.record()
        end.synchronize()
        times[v] = start.elapsed_time(end)
    if not times:
        raise errors[0]
    best = min(times, key=times.get)
    logger.info("fused per-task gradients: %s (ms per 3 calls: %s)", best,
                ", ".join(f"{v} {t:.2f}" for v, t in times.items()))
    return best


def shared_task_grads(x: Tensor, pre: Tensor, w2: Tensor, d_cgc: Tensor, gates: Tensor,
                      layouts: tuple[str, ...] | None = None, variant: str | None = None,
                      hid: Tensor | None = None) -> Tensor:
    """Per-task gradients on every shared expert's (w1, b1, w2, b2), flattened: (T, P) float32.

    ``x`` (B, i) expert input; ``pre`` (E, B, h) first-layer pre-activation, or the hidden
    layer itself (the model passes that: the kernel reads ``pre > 0`` and ``relu(pre)``, the
    same for both), any strides with a unit last stride;
    ``w2`` (E, h, d); ``d_cgc`` (T, B, d) dL_t/dcgc_t; ``gates`` (T, B, K) whose first E
    columns weight the shared experts. Matrix products run in ``pre``'s dtype
    (bf16 under autocast) with float32 accumulation; float32 inputs use exact float32 products.
    ``layouts`` limits the autotuner to some of :data:`LAYOUTS` (default :data:`DEFAULT_LAYOUTS`);
    ``variant`` forces one of :data:`VARIANTS` (default: on CUDA the fastest, timed on the first
    call per shape; ``fused`` elsewhere). ``hid`` (E, B, h), relu(pre), saves the ``split``
    variants a pass.
    """
    layouts = tuple(DEFAULT_LAYOUTS if layouts is None else layouts)
    unknown = set(layouts) - set(LAYOUTS)
    if unknown or not layouts:
        raise ValueError(f"unknown kernel layouts {sorted(unknown)}; valid: {', '.join(LAYOUTS)}")
    variant = DEFAULT_VARIANT if variant is None else variant
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown kernel variant {variant!r}; valid: {', '.join(VARIANTS)}")
    E, B, H = pre.shape
    T, _, D = d_cgc.shape
    dtype = pre.dtype
    IN, BI = x.shape[1], _pow2(x.shape[1])
    if B * max(E * H, T * D, BI) >= 2**31:  # the kernels' row offsets are 32-bit
        raise ValueError(f"batch {B} too large for the fused kernel's 32-bit row offsets (batch x "
                         f"max(E*h, T*d, i) = {B * max(E * H, T * D, BI)} must stay under 2^31); "
                         "use a smaller batch or grad_method: einsum")
    if _triton() is None:
        raise RuntimeError("transfer.grad_method: fused needs triton (pip install triton); "
                           "use grad_method: batched, which falls back to einsum without it")
    if pre.device.type != "cuda" and not interpreted():
        raise RuntimeError(f"transfer.grad_method: fused runs on CUDA (or on the CPU under TRITON_INTERPRET=1), "
                           f"not on {pre.device.type}; use grad_method: batched or einsum")
    x = x.to(dtype)
    ones_col = IN < BI and GB1_FROM_ONES_COLUMN
    if IN != BI or not x.is_contiguous():  # the kernel loads BI columns of every row
        # columns up to the tile width (B x BI, 4 MB at the seed's shape): the kernel then
        # loads whole aligned rows, vectorised, where a mask at column IN made it load
        # element by element (sm_90: 32 scalar loads become cp.async, 234 -> 195 registers).
        # Column IN is ones, the rest zeros: gb1 then comes out of the gW1 product (ONES_COL)
        # instead of a row reduction of every dh tile
        padded = x.new_zeros(B, BI)
        padded[:, :IN] = x
        if ones_col:
            padded[:, IN] = 1
        x = padded
    w2 = w2.to(dtype).contiguous()
    if pre.stride(2) != 1:
        pre = pre.contiguous()
    ds, gb2 = expert_output_grads(d_cgc, gates, E, dtype)  # (E, B, T, D), (E, T, D)
    PE = IN * H + H + H * D + D

    def run(v: str) -> Tensor:
        out = torch.empty(T, E * PE, device=pre.device, dtype=torch.float32)

        def grid(meta):
            return (T, -(-H // meta["BH"]), E)

        bits = v == "split_bits"
        mask = relu_mask_bits(pre) if bits else pre
        _kernel(layouts, v == "fused", bits)[grid](
            x, mask, w2, ds, out, B, IN, H, D, E * PE, PE,
            x.stride(0), mask.stride(0), mask.stride(1), ds.stride(0), ds.stride(1), ds.stride(2),
            BI=BI, BD=_pow2(D), PREC="ieee" if dtype == torch.float32 else "tf32", WITH_W2=v == "fused",
            ONES_COL=ones_col, MASK_BITS=bits)
        if v != "fused":
            _w2_grads_by_gemm(out.view(T, E, PE), pre.clamp_min(0) if hid is None else hid, ds, gb2, IN)
        return out

    if variant is None:
        key = (IN, H, D, E, T, dtype, layouts)
        variant = _CHOSEN.get(key)
        if variant is None:
            variant = _time_variants(run) if pre.device.type == "cuda" else "fused"
            _CHOSEN[key] = variant
    return run(variant)


#: hidden units per program of the mask-packing kernel
BITS_COLS = 128


@functools.cache
def _bits_kernel():
    triton, tl = _triton()

    @triton.jit
    def bits_kernel(pre_ptr, words_ptr, B, H, s_pe, s_pb, s_oe, s_ow, BH: tl.constexpr):
        e = tl.program_id(0).to(tl.int64)
        w = tl.program_id(1)
        offs_h = tl.program_id(2) * BH + tl.arange(0, BH)
        j = tl.arange(0, 32)
        rows = w * 32 + j
        tile = tl.load(pre_ptr + e * s_pe + rows[:, None] * s_pb + offs_h[None, :],
                       mask=(rows[:, None] < B) & (offs_h[None, :] < H), other=0.0)  # (32, BH)
        # distinct powers of two: their sum is their OR (bit 31 wraps to the sign, as it should)
        word = tl.sum((tile > 0).to(tl.int32) << j[:, None], axis=0)
        tl.store(words_ptr + e * s_oe + w * s_ow + offs_h, word, mask=offs_h < H)

    return bits_kernel


def relu_mask_bits(pre: Tensor) -> Tensor:
    """``pre > 0`` packed along the batch, (E, B, H) -> (E, ceil(B / 32), H) int32: bit j of word
    w is row 32 w + j (rows past B are 0). ``pre`` any strides with a unit last stride."""
    E, B, H = pre.shape
    if pre.stride(2) != 1:
        pre = pre.contiguous()
    n = -(-B // MASK_WORD)
    out = torch.empty(E, n, H, dtype=torch.int32, device=pre.device)
    _bits_kernel()[(E, n, -(-H // BITS_COLS))](pre, out, B, H, pre.stride(0), pre.stride(1), out.stride(0),
                                               out.stride(1), BH=BITS_COLS)
    return out


#: rows per program of the ds kernel
DS_ROWS = 64


@functools.cache
def _ds_kernel():
    triton, tl = _triton()

    @triton.jit
    def ds_kernel(dc_ptr, g_ptr, ds_ptr, sum_ptr, B, T, D, s_dt, s_db, s_gt, s_gb, s_gk, s_oe, s_ob, s_ot,
                  BB: tl.constexpr, BD: tl.constexpr):
        e = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        offs_b = blk * BB + tl.arange(0, BB)
        offs_d = tl.arange(0, BD)
        mb, md = offs_b < B, offs_d < D
        m = mb[:, None] & md[None, :]
        for t in range(T):
            gate = tl.load(g_ptr + t * s_gt + offs_b * s_gb + e * s_gk, mask=mb, other=0.0).to(tl.float32)
            dc = tl.load(dc_ptr + t * s_dt + offs_b[:, None] * s_db + offs_d[None, :], mask=m, other=0.0)
            ds = dc.to(tl.float32) * gate[:, None]
            ds = ds.to(ds_ptr.dtype.element_ty)
            tl.store(ds_ptr + e * s_oe + offs_b[:, None] * s_ob + t * s_ot + offs_d[None, :], ds, mask=m)
            # this block's column sums (gb2's share), summed over blocks afterwards: no atomics,
            # so the result does not depend on the programs' order
            part = tl.sum(ds.to(tl.float32), axis=0)
            tl.store(sum_ptr + ((e * tl.num_programs(1) + blk) * T + t) * D + offs_d, part, mask=md)

    return ds_kernel


def expert_output_grads(d_cgc: Tensor, gates: Tensor, E: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``ds[e, b, t] = gate[t, b, e] * d_cgc[t, b]`` in ``dtype``, (E, B, T, D): every task's
    gradient at every shared expert's output, the product rounded once from float32. The
    kernel reads its (t, e) tiles as plain loads, and in this layout each expert's slice is
    the (B, T*D) operand of the ``split`` variant's gW2 GEMM. 0.27 GB in bf16 at the seed's
    shape, one write. Also the second-layer bias gradients ``gb2[e, t] = sum_b ds[e, b, t]``
    (E, T, D) in float32, from per-block sums of the same pass."""
    T, B, D = d_cgc.shape
    if d_cgc.stride(2) != 1:
        d_cgc = d_cgc.contiguous()
    ds = torch.empty(E, B, T, D, dtype=dtype, device=d_cgc.device)
    blocks = -(-B // DS_ROWS)
    sums = torch.empty(E, blocks, T, D, dtype=torch.float32, device=d_cgc.device)
    _ds_kernel()[(E, blocks)](
        d_cgc, gates, ds, sums, B, T, D, d_cgc.stride(0), d_cgc.stride(1), gates.stride(0), gates.stride(1),
        gates.stride(2), ds.stride(0), ds.stride(1), ds.stride(2), BB=DS_ROWS, BD=_pow2(D))
    return ds, sums.sum(1)


def _w2_grads_by_gemm(out: Tensor, hid: Tensor, ds: Tensor, gb2: Tensor, IN: int) -> None:
    """The ``split`` variant's second layer: gW2 of every task and expert as one batched GEMM
    over all tasks, ``hid_e^T @ [ds_1e .. ds_Te]``, and gb2 (E, T, D) from
    :func:`expert_output_grads`; written into ``out`` (T, E, PE) where the kernel left them out."""
    E, B, H = hid.shape
    T, D = gb2.shape[1:]
    gw2 = torch.bmm(hid.transpose(1, 2), ds.view(E, B, T * D))  # (E, H, T*D)
    o = IN * H + H
    out[:, :, o:o + H * D].view(T, E, H, D).copy_(gw2.view(E, H, T, D).permute(2, 0, 1, 3))  # one pass
    out[:, :, o + H * D:].copy_(gb2.transpose(0, 1))
