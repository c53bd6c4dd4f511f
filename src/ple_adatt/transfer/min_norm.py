"""MGDA's min-norm problem on the device: one Triton program, no host read.

The problem (Sener & Koltun 2018; :mod:`ple_adatt.transfer.mgda`) is

    min_a  a^T M a   subject to   a_i >= 0,  sum_i a_i = 1   (i over the present tasks)

for the tasks' Gram matrix ``M``. :func:`ple_adatt.transfer.mgda.min_norm_weights` solves it
exactly on the host in float64, which reads the Gram matrix back every step: on CUDA a
synchronisation per step, and no whole-step CUDA graph. :func:`min_norm_weights_device` runs
the same primal active-set method in a single Triton program on the device, in float64
registers, so a step with MGDA needs no host read and can be captured:

* start at the vertex with the smallest norm; the free set F holds the tasks whose weight may
  be positive;
* solve the equality-constrained problem on F in closed form: ``y = M_FF^-1 1``,
  ``target = y / sum(y)``, by Gauss-Jordan without pivot exchange, which the ridge makes safe:
  ``M`` gets ``r I``, 1e-7 of its largest diagonal entry, so that the float32 Gram matrix of
  linearly dependent gradients (indefinite by about 1e-8) is positive definite; the host
  solver's pseudo-inverse plays that part in float64;
* step towards the target, or up to the first weight that reaches zero (it leaves F);
* at the target, release the bound task with the most negative multiplier
  ``(M a)_i - a^T M a``; stop when none is negative (the KKT conditions hold).

The loop runs at most ``20 T + 20`` iterations (the host solver's cap); ``info`` receives the
iterations used and whether the KKT conditions were met, for the trainer to read with its
other metrics. Up to :data:`MAX_TASKS` tasks (the registers hold a square tile of the next
power of two). On the CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``),
which the tests use.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..kernels import KernelGuard, _triton, require_runnable

__all__ = ["MAX_TASKS", "GUARD", "min_norm_weights_device", "num_warps", "solver_runs_on", "tile"]

MAX_TASKS = 64
# of the largest diagonal entry, added to the present tasks' diagonal: keeps the float32 Gram
# matrix of linearly dependent gradients (indefinite by about 1e-8 of its largest entry)
# positive definite; it moves the objective by at most this much
RIDGE = 1e-7
TOL = 1e-10  # as the host solver's

GUARD = KernelGuard("MGDA's device min-norm solver", "the host solver (no CUDA graph for MGDA)")


def solver_runs_on(device: torch.device) -> bool:
    """Whether the device solver can run on ``device``: CUDA with triton, or the CPU under
    Triton's interpreter; and it has not been switched off in this process."""
    try:
        require_runnable("the device min-norm solver", device)
    except RuntimeError:
        return False
    return not GUARD.failed()


@functools.cache
def _kernel():
    triton, tl = _triton()

    @triton.jit
    def min_norm_kernel(m_ptr, present_ptr, out_ptr, info_ptr, T, s_r, s_c, max_iter,
                        tol, ridge, BT: tl.constexpr):
        r = tl.arange(0, BT)
        valid = r < T
        p = tl.load(present_ptr + r, mask=valid, other=0) != 0
        both = p[:, None] & p[None, :]
        m = tl.load(m_ptr + r[:, None] * s_r + r[None, :] * s_c, mask=both, other=0.0).to(tl.float64)
        m = 0.5 * (m + tl.trans(m))
        eye = r[:, None] == r[None, :]
        diag = tl.sum(tl.where(eye, m, 0.0), axis=1)
        n = tl.sum(p.to(tl.int32), axis=0)
        scale = tl.max(tl.where(p, tl.abs(diag), 0.0), axis=0)
        m = m / tl.where(scale > 0, scale, 1.0)
        # the ridge on the present tasks' diagonal: a float32 Gram matrix of dependent gradients
        # is indefinite by about 1e-8 of its largest entry, and without it the loop cycled to the
        # cap; the ridged matrix is positive definite, which the elimination below relies on
        m = m + tl.where(eye & both, ridge, 0.0)
        diag = tl.sum(tl.where(eye, m, 0.0), axis=1)
        k0 = tl.argmin(tl.where(p, diag, 1e30), axis=0)
        a = tl.where(r == k0, 1.0, 0.0).to(tl.float64)
        free = r == k0
        done = tl.where((scale > 0) & (n > 0), 0, 1)
        it = 0
        while (done == 0) & (it < max_iter):
            # M_FF y = 1_F (M ridged), the bound tasks' rows as the identity with 0 on the right
            mat = tl.where(free[:, None] & free[None, :], m, 0.0) + tl.where(eye & ~free[:, None], 1.0, 0.0)
            rhs = tl.where(free, 1.0, 0.0).to(tl.float64)
            for k in range(0, T):  # Gauss-Jordan (the padding rows are the identity already): no
                # pivot exchange on an SPD matrix
                row = tl.sum(tl.where(r[:, None] == k, mat, 0.0), axis=0)
                col = tl.sum(tl.where(r[None, :] == k, mat, 0.0), axis=1)
                pivot = tl.sum(tl.where(r == k, row, 0.0), axis=0)
                f = tl.where(r == k, 0.0, col / pivot)
                mat = mat - f[:, None] * row[None, :]
                rhs = rhs - f * tl.sum(tl.where(r == k, rhs, 0.0), axis=0)
            y = rhs / tl.sum(tl.where(eye, mat, 0.0), axis=1)
            target = y / tl.sum(y, axis=0)
            dirn = target - a
            if tl.max(tl.abs(dirn), axis=0) <= tol:
                g = tl.sum(m * a[None, :], axis=1)  # M a: the bounds' multipliers follow
                mu = tl.where(free | ~p, 1e30, g - tl.sum(a * g, axis=0))
                if tl.min(mu, axis=0) >= -tol:
                    done = 1
                else:
                    free = free | (r == tl.argmin(mu, axis=0))
            else:
                shrinking = free & (dirn < -tol)
                ratio = tl.where(shrinking, -a / tl.where(shrinking, dirn, -1.0), 1e30)
                first = tl.min(ratio, axis=0)
                a = a + tl.minimum(first, 1.0) * dirn
                if first < 1.0:
                    blocked = r == tl.argmin(ratio, axis=0)
                    a = tl.where(blocked, 0.0, a)
                    free = free & ~blocked
            it += 1
        a = tl.maximum(a, 0.0)
        a = a / tl.sum(a, axis=0)
        uniform = tl.where(p, 1.0 / tl.maximum(n, 1).to(tl.float64), 0.0)
        a = tl.where(scale > 0, a, uniform)
        a = tl.where(p, a, 0.0)
        tl.store(out_ptr + r, a.to(tl.float32), mask=valid)
        tl.store(info_ptr, it)
        tl.store(info_ptr + 1, done)

    return min_norm_kernel


def min_norm_weights_device(gram: Tensor, present: Tensor, *, info: Tensor | None = None,
                            max_iter: int | None = None) -> Tensor:
    """The min-norm weights over the present tasks, (T, T), (T,) bool -> (T,) float32 on
    ``gram``'s device, absent tasks 0 (all 0 when no task is present; uniform over the present
    ones when their gradients are all zero). ``info`` (2,) int32, if given, receives the
    iterations used and 1 where the KKT conditions were met (0: the iteration cap stopped it).
    No host read."""
    T = gram.shape[0]
    if gram.dim() != 2 or gram.shape[1] != T or present.shape != (T,):
        raise ValueError(f"min_norm_weights_device needs a square (T, T) gram and a (T,) present mask, "
                         f"got {tuple(gram.shape)} and {tuple(present.shape)}")
    if T > MAX_TASKS:
        raise ValueError(f"the device min-norm solver takes at most {MAX_TASKS} tasks, got {T}; "
                         "set transfer.mgda.solver: host")
    require_runnable("the device min-norm solver", gram.device)
    out = torch.empty(T, dtype=torch.float32, device=gram.device)
    if info is None:
        info = torch.empty(2, dtype=torch.int32, device=gram.device)
    _solve(gram, present.to(torch.int8), out, info, max_iter or 20 * T + 20)
    return out


# an operator of its own, so that what records a step's ops (a dispatch mode: the tests' CUDA
# graph emulation) sees the solve as one op that writes ``out`` and ``info``
@torch.library.custom_op("ple_adatt::min_norm_solve", mutates_args=("out", "info"))
def _solve(gram: Tensor, present: Tensor, out: Tensor, info: Tensor, max_iter: int) -> None:
    T = gram.shape[0]
    BT = tile(T)
    _kernel()[(1,)](gram, present, out, info, T, gram.stride(0), gram.stride(1), max_iter, TOL, RIDGE, BT=BT,
                    num_warps=num_warps(BT))


def tile(T: int) -> int:
    """The square register tile's side for T tasks: the next power of two."""
    return max(2, 1 << (T - 1).bit_length())


def num_warps(bt: int) -> int:
    """Warps for a ``bt`` x ``bt`` float64 tile: those that compile for sm_90 without spilling
    (``bench/kernel_report.py``): up to 16 one warp (its reductions stay in shuffles), 32 four,
    64 eight (four spill there)."""
    return 1 if bt <= 16 else 4 if bt <= 32 else 8
