"""What every non-adaTT strategy shares: affinity measurement and a fixed phase name.

The strategy interface (see ``ple_adatt.transfer``) has one required method,
``transfer_losses``, and two optional hooks that the gradient methods add:

* ``needs_gradients_every_step`` (class attribute): the trainer extracts per-task gradients
  on the shared experts every step instead of every ``transfer.grad_interval`` steps;
* ``shared_gradient(task_grads (T, P), present (T,), representation (T, R) | None) -> (P,)``:
  called after the backward of the summed loss; its result replaces the shared experts'
  gradient (the other parameters keep the ordinary gradient of the summed loss).
  ``gradient_source = "representation"`` asks the trainer to pass the per-task gradients on
  the shared experts' outputs as ``representation`` as well (MGDA-UB).
* ``affinity_only`` (class attribute): the per-task gradients only feed the affinity
  measurement (``observe``), whose cosines do not change when a task's gradient is scaled.
  The trainer may then read them from the training backward itself
  (``transfer.measure_in_backward``) instead of a separate backward through the heads.
* ``observing`` (attribute or property, default True): False where a measurement would change
  nothing (adaTT's frozen phase); the trainer then takes no per-task gradients.
"""

from __future__ import annotations

from torch import Tensor, nn

from .adatt import TaskAffinityComputer

__all__ = ["MeasuredStrategy"]


class MeasuredStrategy(nn.Module):
    """Base of the strategies other than adaTT: measures task affinity, transfers nothing.

    Affinity (seed ``000_...`` sections 2-3, :class:`TaskAffinityComputer`) is measured for
    every strategy so that reports compare; it never changes the training of these methods.
    """

    name = "measured"
    needs_gradients_every_step = False
    gradient_source = "params"  # or "representation"
    transfers_loss = False  # no loss is borrowed between tasks (the trainer's transfer_share is 0)
    affinity_only = True  # the gradient methods (PCGrad, MoCoGrad, MGDA, GradNorm) set False
    observing = True  # the affinity is measured in every phase

    def __init__(self, task_names: list[str], ema_decay: float = 0.9):
        super().__init__()
        self.task_names = list(task_names)
        self.n_tasks = len(self.task_names)
        self.affinity_computer = TaskAffinityComputer(self.task_names, ema_decay)

    def measure(self, task_gradients: Tensor | None) -> None:
        if task_gradients is not None:
            self.affinity_computer.update(task_gradients)

    def observe(self, task_gradients: Tensor) -> None:
        """Per-task gradients read after the backward (``transfer.measure_in_backward``)."""
        self.measure(task_gradients)

    def transfer_losses(self, losses: Tensor, present: Tensor, task_gradients: Tensor | None,
                        epoch: int) -> tuple[Tensor, Tensor | None]:
        self.measure(task_gradients)
        return losses, None

    def on_epoch_end(self, epoch: int) -> list[str]:
        return []

    def phase(self, epoch: int) -> str:
        return self.name
