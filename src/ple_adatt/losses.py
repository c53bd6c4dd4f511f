"""Per-task losses and loss weighting (seed section 9).

Losses are computed for all tasks of a type at once (binary, multiclass, regression) on
the model's (T, B, O) output, masked by target availability, so the hot loop has no
per-task Python work beyond retrieval tasks. Binary tasks use BCE or focal loss (computed
in float32, per-task alpha/gamma; seed M-2/M-3), multiclass cross-entropy over each
task's own classes, regression MSE or Huber on standardised targets, retrieval InfoNCE
with in-batch negatives. Then fixed per-task weights or uncertainty weighting (Kendall,
Gal & Cipolla, CVPR 2018; log-variance clamped to [-4, 4], precision to [0.001, 100]).
adaTT is applied after this weighting, by the transfer strategy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TaskLossConfig
from .model import HeadSpec

__all__ = ["MultiTaskLoss", "LossOutput", "gate_entropy"]

LOG_VAR_RANGE = (-4.0, 4.0)
PRECISION_RANGE = (1e-3, 100.0)
_PROB_EPS = 1e-7


@dataclass
class LossOutput:
    raw: Tensor  # (T,) unweighted mean loss per task (0 where absent)
    weighted: Tensor  # (T,) after fixed or uncertainty weighting (0 where absent)
    present: Tensor  # (T,) bool: the task has at least one target in the batch
    counts: Tensor  # (T,) number of available targets


def gate_entropy(gates: Tensor) -> Tensor:
    """Mean entropy of the CGC gate distributions, (T, B, K) -> scalar."""
    g = gates.float().clamp_min(1e-12)
    return -(g * g.log()).sum(-1).mean()


class MultiTaskLoss(nn.Module):
    """Masked per-task losses, grouped by task type, plus fixed or uncertainty weighting."""

    def __init__(self, heads: list[HeadSpec], loss_cfgs: list[TaskLossConfig], weighting: str = "fixed"):
        super().__init__()
        if weighting not in ("fixed", "uncertainty"):
            raise ValueError(f"unknown loss weighting {weighting!r}; valid: fixed, uncertainty")
        self.heads = list(heads)
        self.weighting = weighting
        T = len(heads)
        self.register_buffer("weights", torch.tensor([c.weight for c in loss_cfgs], dtype=torch.float32))
        self.log_vars = nn.Parameter(torch.zeros(T)) if weighting == "uncertainty" else None

        def idx(kind: str) -> Tensor:
            return torch.tensor([i for i, h in enumerate(heads) if h.type == kind], dtype=torch.long)

        self.register_buffer("bin_idx", idx("binary"), persistent=False)
        self.register_buffer("mc_idx", idx("multiclass"), persistent=False)
        self.register_buffer("reg_idx", idx("regression"), persistent=False)
        self.retrieval = [i for i, h in enumerate(heads) if h.type == "retrieval"]
        self.register_buffer("retrieval_idx", torch.tensor(self.retrieval, dtype=torch.long), persistent=False)
        b = self.bin_idx.tolist()
        self.register_buffer("focal", torch.tensor([loss_cfgs[i].loss == "focal" for i in b]), persistent=False)
        self.register_buffer("alpha", torch.tensor([loss_cfgs[i].alpha for i in b]), persistent=False)
        self.register_buffer("gamma", torch.tensor([loss_cfgs[i].gamma for i in b]), persistent=False)
        r = self.reg_idx.tolist()
        self.register_buffer("huber", torch.tensor([loss_cfgs[i].loss == "huber" for i in r]), persistent=False)
        self.register_buffer("delta", torch.tensor([loss_cfgs[i].delta for i in r]), persistent=False)
        mc = self.mc_idx.tolist()
        widest = max([heads[i].output_dim for i in mc], default=1)
        classes = torch.arange(widest).view(1, -1) < torch.tensor([heads[i].output_dim for i in mc] or [1]).view(-1, 1)
        self.register_buffer("class_mask", classes[: len(mc)], persistent=False)  # (T_mc, K)
        self.infonce_temperature = [loss_cfgs[i].temperature for i in self.retrieval]

    # ---------------------------------------------------------------------- per type

    @staticmethod
    def _masked_mean(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Mean over available rows per task: values, mask (k, B) -> (k,), counts (k,)."""
        m = mask.to(values.dtype)
        counts = m.sum(1)
        return (values * m).sum(1) / counts.clamp_min(1.0), counts

    def _binary(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logit = out[self.bin_idx, :, 0].float()  # (k, B)
        target = y[:, self.bin_idx].t()  # (k, B)
        mask = ~torch.isnan(target)
        t = torch.nan_to_num(target, nan=0.0)
        bce = F.binary_cross_entropy_with_logits(logit, t, reduction="none")
        p = torch.sigmoid(logit).clamp(_PROB_EPS, 1 - _PROB_EPS)
        p_t = t * p + (1 - t) * (1 - p)
        a = self.alpha.view(-1, 1)
        alpha_t = t * a + (1 - t) * (1 - a)
        focal = alpha_t * (1 - p_t).pow(self.gamma.view(-1, 1)) * bce
        loss = torch.where(self.focal.view(-1, 1), focal, bce)
        return self._masked_mean(loss, mask)

    def _multiclass(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        k_max = self.class_mask.shape[1]
        logits = out[self.mc_idx, :, :k_max].float()  # (k, B, K)
        logits = logits.masked_fill(~self.class_mask.unsqueeze(1), -1e9)
        target = y[:, self.mc_idx].t()  # (k, B)
        mask = ~torch.isnan(target)
        t = torch.nan_to_num(target, nan=0.0).long()
        # rows flattened to (k*B, K): the (k, K, B) permuted form compiled to a wrong backward
        # under torch.compile (torch 2.13, CPU inductor: gradients landed on permuted classes)
        ce = F.cross_entropy(logits.reshape(-1, k_max), t.reshape(-1), reduction="none").view_as(t)  # (k, B)
        return self._masked_mean(ce, mask)

    def _regression(self, out: Tensor, y: Tensor, loc: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        pred = out[self.reg_idx, :, 0].float()  # (k, B), standardised units
        target = y[:, self.reg_idx].t()
        mask = ~torch.isnan(target)
        t = (torch.nan_to_num(target, nan=0.0) - loc[self.reg_idx].view(-1, 1)) / scale[self.reg_idx].view(-1, 1)
        diff = pred - t
        mse = diff.pow(2)
        d = self.delta.view(-1, 1)
        huber = torch.where(diff.abs() < d, 0.5 * diff.pow(2), d * (diff.abs() - 0.5 * d))
        return self._masked_mean(torch.where(self.huber.view(-1, 1), huber, mse), mask)

    @staticmethod
    def infonce(query: Tensor, items: nn.Embedding, target: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """InfoNCE with in-batch negatives over the rows that have a target.

        Rows sharing the same item are not used as each other's negatives.
        """
        mask = ~torch.isnan(target)
        ids = torch.nan_to_num(target, nan=0.0).long()
        q = F.normalize(query.float(), dim=-1)  # (B, D)
        v = F.normalize(items(ids).float(), dim=-1)  # (B, D)
        # float32 under any autocast: float16 logits could not hold the -1e9 below (nor 1/temperature)
        with torch.autocast(q.device.type, enabled=False):
            logits = q @ v.t() / temperature  # (B, B): row b vs every in-batch positive
        same = ids.view(-1, 1) == ids.view(1, -1)
        valid_col = mask.view(1, -1) & (~same | torch.eye(len(ids), dtype=torch.bool, device=ids.device))
        logits = logits.masked_fill(~valid_col, -1e9)
        loss = F.cross_entropy(logits, torch.arange(len(ids), device=ids.device), reduction="none")
        m = mask.to(loss.dtype)
        count = m.sum()
        return (loss * m).sum() / count.clamp_min(1.0), count

    # ------------------------------------------------------------------------- forward

    def forward(self, out: Tensor, y: Tensor, loc: Tensor, scale: Tensor,
                item_embeddings: nn.ModuleDict | None = None) -> LossOutput:
        T = len(self.heads)
        raw = out.new_zeros(T, dtype=torch.float32)
        counts = out.new_zeros(T, dtype=torch.float32)
        if len(self.bin_idx):
            v, c = self._binary(out, y)
            raw = raw.index_copy(0, self.bin_idx, v)
            counts = counts.index_copy(0, self.bin_idx, c)
        if len(self.mc_idx):
            v, c = self._multiclass(out, y)
            raw = raw.index_copy(0, self.mc_idx, v)
            counts = counts.index_copy(0, self.mc_idx, c)
        if len(self.reg_idx):
            v, c = self._regression(out, y, loc, scale)
            raw = raw.index_copy(0, self.reg_idx, v)
            counts = counts.index_copy(0, self.reg_idx, c)
        for k, (i, temp) in enumerate(zip(self.retrieval, self.infonce_temperature)):
            h = self.heads[i]
            if item_embeddings is None:
                raise ValueError(f"retrieval task {h.name!r} needs the model's item embeddings")
            v, c = self.infonce(out[i, :, : h.output_dim], item_embeddings[h.name], y[:, i], temp)
            at = self.retrieval_idx[k : k + 1]  # a device tensor: no host-to-device copy per step
            raw = raw.index_copy(0, at, v.view(1))
            counts = counts.index_copy(0, at, c.view(1))
        present = counts > 0
        if self.log_vars is not None:
            log_var = self.log_vars.clamp(*LOG_VAR_RANGE)
            precision = torch.exp(-log_var).clamp(*PRECISION_RANGE)
            weighted = 0.5 * precision * raw + 0.5 * log_var
        else:
            weighted = self.weights * raw
        weighted = weighted * present.to(weighted.dtype)
        return LossOutput(raw, weighted, present, counts)
