"""MGDA: the min-norm point in the convex hull of the task gradients (seed ``003_...``).

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018
(after Désidéri's multiple-gradient descent algorithm). The common descent direction is
``d = sum_i a_i g_i`` with ``a`` solving

    min_a | sum_i a_i g_i |^2   subject to   a_i >= 0, sum_i a_i = 1,

a quadratic program over the T x T Gram matrix ``M = G G^T``. The seed's sketch calls
``scipy.optimize.minimize``; here :func:`min_norm_weights` solves it exactly in torch with
a primal active-set method (finite termination; each iteration solves the KKT system of
the equality-constrained problem on the free set), so no scipy runs in the training loop.

``on: representation`` is MGDA-UB: the weights ``a`` come from the gradients on the
shared representation (the shared experts' outputs) instead of the shared parameters,
an upper bound that is cheaper to form in the paper; the update is still ``sum a_i g_i``.
The shared update is scaled by the number n of present tasks, so that equal weights
``a_i = 1/n`` give the plain sum.

``solver``: ``host`` is :func:`min_norm_weights`, which reads the Gram matrix back every step
(on CUDA a synchronisation per step, and no whole-step CUDA graph); ``device`` is the same
active-set method as one Triton program (:mod:`ple_adatt.transfer.min_norm`), no host read,
so MGDA steps can be captured; ``auto`` (the default) takes the device solver on CUDA with
triton and the host solver elsewhere. The device solver's first result in a process is checked
against the host solver's (the objectives must agree); a mismatch or a kernel failure switches it
off for the process, with one warning, and the host solver takes over (and whole-step graphs
with it: the trainer then runs MGDA's steps eagerly).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import require_runnable
from . import min_norm
from .base import MeasuredStrategy
from .linalg import gram_matrix

__all__ = ["MGDA", "SOLVERS", "min_norm_weights"]

SOLVERS = ("auto", "device", "host")
#: the device solver's first-use check: its objective may exceed the host solver's by this much
#: of the Gram matrix's largest diagonal entry. The device solves a float32 Gram matrix: about
#: 1e-8 seen at a few hundred parameters; at a million (the seed's shared experts) float32 sums
#: can move entries by about 1e-6 of the largest. A broken solver misses by far more (uniform
#: weights instead of the minimum: 1e-2 and up)
CHECK_TOL = 1e-4


def _kkt_solve(M: Tensor, free: Tensor) -> tuple[Tensor, float]:
    """Minimise a^T M a on the free set with sum(a) = 1; returns (a (T,), multiplier nu)."""
    idx = torch.nonzero(free, as_tuple=False).flatten()
    k = len(idx)
    K = torch.zeros(k + 1, k + 1, dtype=M.dtype)
    K[:k, :k] = M[idx][:, idx]
    K[:k, k] = 1.0
    K[k, :k] = 1.0
    rhs = torch.zeros(k + 1, dtype=M.dtype)
    rhs[k] = 1.0
    sol = torch.linalg.pinv(K) @ rhs  # pinv: linearly dependent gradients make M_FF singular
    a = torch.zeros(M.shape[0], dtype=M.dtype)
    a[idx] = sol[:k]
    return a, float(sol[k])


def min_norm_weights(gram: Tensor, tol: float = 1e-10, max_iter: int | None = None) -> Tensor:
    """Exact minimiser ``a`` of ``a^T gram a`` over the probability simplex, (T, T) -> (T,).

    Primal active-set method in float64: start at the vertex with the smallest norm; solve
    the equality-constrained problem on the free set; step to it or to the first bound that
    blocks; release the bound with the most negative multiplier ``(M a)_i - a^T M a`` until
    none is negative (the KKT conditions of the QP hold).
    """
    M = gram.detach().double().cpu()
    T = M.shape[0]
    if T == 1:
        return torch.ones(1, dtype=gram.dtype)
    scale = float(M.diagonal().abs().max())
    if scale <= 0:
        return torch.full((T,), 1.0 / T, dtype=gram.dtype)
    M = M / scale
    M = 0.5 * (M + M.T)
    k0 = int(M.diagonal().argmin())
    a = torch.zeros(T, dtype=M.dtype)
    a[k0] = 1.0
    free = torch.zeros(T, dtype=torch.bool)
    free[k0] = True
    for _ in range(max_iter or 20 * T + 20):
        target, _nu = _kkt_solve(M, free)
        p = target - a
        if float(p.abs().max()) <= tol:
            grad = M @ a  # multipliers of the bounds a_i >= 0 (i not free)
            mu = grad - float(a @ grad)
            mu[free] = 0.0
            j = int(mu.argmin())
            if float(mu[j]) >= -tol:
                break
            free[j] = True
            continue
        step, block = 1.0, -1
        for i in torch.nonzero(free & (p < -tol), as_tuple=False).flatten().tolist():
            t = float(-a[i] / p[i])
            if t < step:
                step, block = t, i
        a = a + step * p
        if block >= 0:
            a[block] = 0.0
            free[block] = False
    a = a.clamp_min(0.0)
    return (a / a.sum()).to(gram.dtype)


class MGDA(MeasuredStrategy):
    """MGDA / MGDA-UB, Sener & Koltun NeurIPS 2018 (seed ``003_...``): min-norm common direction.

    Buffer ``last_weights`` (T,): the ``a`` of the latest step (absent tasks 0), for logs.
    Non-persistent buffers of the device solver: ``solver_info`` (2,) its last iterations and
    convergence flag, ``capped_steps`` () the steps whose solve the iteration cap stopped.
    """

    name = "mgda"
    needs_gradients_every_step = True
    affinity_only = False  # the gradients steer the update itself

    def __init__(self, task_names: list[str], *, on: str = "params", ema_decay: float = 0.9,
                 solver: str = "auto"):
        super().__init__(task_names, ema_decay)
        if on not in ("params", "representation"):
            raise ValueError(f"unknown mgda.on {on!r}; valid: params, representation")
        if solver not in SOLVERS:
            raise ValueError(f"unknown mgda.solver {solver!r}; valid: {', '.join(SOLVERS)}")
        if solver == "device" and self.n_tasks > min_norm.MAX_TASKS:
            raise ValueError(f"mgda.solver device takes at most {min_norm.MAX_TASKS} tasks, got {self.n_tasks}; "
                             "use solver host")
        self.on = on
        self.gradient_source = on
        self.solver = solver
        self.register_buffer("last_weights", torch.zeros(self.n_tasks))
        self.register_buffer("solver_info", torch.zeros(2, dtype=torch.int32), persistent=False)
        self.register_buffer("capped_steps", torch.zeros((), dtype=torch.int32), persistent=False)

    def on_device(self, device: torch.device) -> bool:
        """Whether the weights are solved on ``device`` without a host read (the device solver)."""
        if self.solver == "host" or self.n_tasks > min_norm.MAX_TASKS:
            return False
        if self.solver == "auto" and device.type != "cuda":
            return False
        if self.solver == "device":
            require_runnable("transfer.mgda.solver: device", device)
        return min_norm.solver_runs_on(device)

    def capturable(self, device: torch.device) -> bool:
        """Whether a step can be captured in a CUDA graph: no host read in it. Not before the
        device solver's first-use check has run (it reads on the host): those steps run eagerly."""
        try:
            return self.on_device(device) and not self._check_pending()
        except RuntimeError:
            return False

    def _check_pending(self) -> bool:
        return min_norm.GUARD.needs_check(min_norm.tile(self.n_tasks))

    def host_reason(self) -> str | None:
        """Why the weights are solved on the host, for the trainer's log; None while the device
        solver only waits for its first-use check (nothing to report)."""
        if self.solver != "host" and not min_norm.GUARD.failed() and self._check_pending():
            return None
        if self.solver == "host":
            return "transfer.mgda.solver: host"
        off = min_norm.GUARD.reason()
        return f"the device min-norm solver is off: {off.splitlines()[0]}" if off else "the device solver cannot run here"

    def weights(self, grads: Tensor, present: Tensor) -> Tensor:
        """Min-norm weights over the present tasks' rows of ``grads`` (T, P) -> (T,)."""
        if self.on_device(grads.device):
            a = self._device_weights(grads, present)
            if a is not None:
                return a
        return self._host_weights(grads, present)

    def _device_weights(self, grads: Tensor, present: Tensor) -> Tensor | None:
        guard = min_norm.GUARD
        try:
            a = min_norm.min_norm_weights_device(gram_matrix(grads.float()), present, info=self.solver_info)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - a Triton or driver failure: the host solver takes over
            guard.switch_off(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return None
        self.capped_steps.add_(1 - self.solver_info[1])
        kind = min_norm.tile(self.n_tasks)  # each tile width compiles apart: each is checked
        if guard.needs_check(kind):
            g = grads.double()
            gram = g @ g.T
            # host reads until the check has run: only a step with two present tasks, finite
            # gradients and a nonzero one exercises the solver's loop; others wait for the next
            if not (int(present.sum()) >= 2 and bool(torch.isfinite(gram).all())
                    and float(gram.diagonal()[present].max()) > 0):
                return a
            ref = self._host_weights(grads, present)
            excess = float((a.double() @ gram @ a.double() - ref.double() @ gram @ ref.double())
                           / gram.diagonal().max())
            off_simplex = not abs(float(a.sum()) - 1) <= 1e-5
            guard.mark_checked(kind)
            if not excess <= CHECK_TOL or off_simplex:
                guard.switch_off(f"its objective exceeds the host solver's by {excess:.3g} of the largest "
                                 f"diagonal entry" + (f", and its weights sum to {float(a.sum()):.6g}" if off_simplex else ""))
                return ref
        return a

    def _host_weights(self, grads: Tensor, present: Tensor) -> Tensor:
        idx = torch.nonzero(present, as_tuple=False).flatten()
        a = torch.zeros(grads.shape[0], dtype=torch.float32, device=grads.device)
        if len(idx) == 0:
            return a
        g = grads[idx].double()
        a[idx] = min_norm_weights(g @ g.T).to(a.device, torch.float32)
        return a

    def shared_gradient(self, task_grads: Tensor, present: Tensor, representation: Tensor | None = None) -> Tensor:
        src = representation if self.on == "representation" else task_grads
        if src is None:
            raise ValueError("mgda with on=representation needs the gradients on the shared representation")
        a = self.weights(src, present)
        self.last_weights.copy_(a)
        n = present.sum().to(task_grads.dtype)  # a device value: no host read
        return n * (a.to(task_grads.dtype) @ task_grads)

    def on_epoch_end(self, epoch: int) -> list[str | tuple[str, dict]]:
        """``mgda_solver_capped`` with the number of steps whose device solve the iteration cap
        stopped (their weights feasible, possibly short of the minimum); the host solver
        (``transfer.mgda.solver: host``) has no such case."""
        capped = int(self.capped_steps)  # one host read per epoch
        self.capped_steps.zero_()
        return [("mgda_solver_capped", {"steps": capped})] if capped else []
