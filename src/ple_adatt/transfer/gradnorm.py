"""GradNorm: adaptive loss weights that balance gradient magnitudes (seed ``003_...``).

Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: Gradient Normalization for Adaptive
Loss Balancing in Deep Multitask Networks", ICML 2018. Each task ``i`` has a weight
``w_i``; with ``G_i = |grad_W (w_i L_i)|`` on the shared parameters ``W`` (here: the
shared experts), ``L~_i = L_i(t) / L_i(0)`` and ``r_i = L~_i / mean_j L~_j`` (the relative
inverse training rate), the weights descend the GradNorm loss

    L_grad = sum_i | G_i - mean_j(G_j) * r_i ** alpha |

with the target held constant, and are then renormalised to sum to the task count T.
A task that trains slower than the others (``r_i > 1``) gets a larger target and its
weight grows. ``dL_grad / dw_i = sign(G_i - target_i) * |grad_W L_i|`` is applied in
closed form; it is divided by ``mean_j G_j`` so that ``lr`` does not depend on the scale
of the gradients (the paper uses Adam on the weights for the same reason).

Where this departs from the seed's sketch (``003_...``), on purpose: the sketch's target uses
``L_i / mean_j L_j`` (current losses) and the norm of the first shared tensor only; here the
target uses the paper's training-rate ratio ``L_i(t) / L_i(0)``, and ``G_i`` is the norm over
all shared-expert parameters, the same set adaTT measures (the paper takes the last shared
layer).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MeasuredStrategy

__all__ = ["GradNorm", "gradnorm_step"]

_EPS = 1e-12


def gradnorm_step(weights: Tensor, grad_norms: Tensor, loss_ratio: Tensor, present: Tensor, *,
                  alpha: float, lr: float) -> Tensor:
    """One GradNorm update of the loss weights, renormalised to sum to T.

    ``weights`` (T,) current ``w``; ``grad_norms`` (T,) ``|grad_W L_i|`` of the unweighted
    (GradNorm-wise) losses; ``loss_ratio`` (T,) ``L_i(t) / L_i(0)``; ``present`` (T,) bool.
    Absent tasks keep their weight (before renormalisation).
    """
    w = weights.float()
    p = present.to(torch.bool)
    pf, count = p.float(), p.sum().clamp_min(1)  # means over present tasks, no host read
    n = grad_norms.float()
    G = w * n  # (T,) weighted gradient norms
    mean_g = (G * pf).sum() / count
    ratio = loss_ratio.float()
    r = ratio / ((ratio * pf).sum() / count).clamp_min(_EPS)  # relative inverse training rate
    target = (mean_g * r.clamp_min(0).pow(alpha)).detach()
    grad_w = torch.sign(G - target) * n / mean_g.clamp_min(_EPS)
    new = torch.where(p, (w - lr * grad_w).clamp_min(1e-3), w)
    return torch.where(p.any(), new * (len(new) / new.sum()), w)  # no task present: unchanged


class GradNorm(MeasuredStrategy):
    """GradNorm, Chen et al. ICML 2018 (seed ``003_...``): learned loss weights, sum kept at T.

    Buffers: ``loss_weights`` (T,), ``initial_losses`` (T,) (``L_i(0)``: the first loss
    observed for each task; 0 until then).
    """

    name = "gradnorm"
    needs_gradients_every_step = True
    affinity_only = False  # the gradients steer the update itself

    def __init__(self, task_names: list[str], *, alpha: float = 1.5, lr: float = 0.025, ema_decay: float = 0.9):
        super().__init__(task_names, ema_decay)
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.register_buffer("loss_weights", torch.ones(self.n_tasks))
        self.register_buffer("initial_losses", torch.zeros(self.n_tasks))

    def transfer_losses(self, losses: Tensor, present: Tensor, task_gradients: Tensor | None,
                        epoch: int) -> tuple[Tensor, Tensor | None]:
        """Weighted losses ``w_i L_i`` with the current weights, then one GradNorm update."""
        self.measure(task_gradients)
        w = self.loss_weights.detach().clone()  # the update below is in place
        out = losses * w.to(losses.dtype)
        if task_gradients is not None:
            self.update_weights(losses.detach(), present, task_gradients)
        return out, None

    @torch.no_grad()
    def update_weights(self, losses: Tensor, present: Tensor, task_gradients: Tensor) -> None:
        losses = losses.float()
        new_init = (self.initial_losses <= 0) & present & (losses > 0)
        self.initial_losses.copy_(torch.where(new_init, losses, self.initial_losses))
        ok = present & (self.initial_losses > 0)
        ratio = torch.where(ok, losses / self.initial_losses.clamp_min(_EPS), torch.ones_like(losses))
        norms = task_gradients.float().norm(dim=1)
        self.loss_weights.copy_(gradnorm_step(self.loss_weights, norms, ratio, ok, alpha=self.alpha, lr=self.lr))
