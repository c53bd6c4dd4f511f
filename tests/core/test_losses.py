"""Losses and weighting against hand-computed values (seed section 9)."""

from __future__ import annotations

import math

import pytest
import torch

from ple_adatt.config import TaskLossConfig
from ple_adatt.losses import LOG_VAR_RANGE, MultiTaskLoss, gate_entropy
from ple_adatt.model import HeadSpec

HEADS = [HeadSpec("f", "binary", 1), HeadSpec("b", "binary", 1), HeadSpec("m", "multiclass", 3),
         HeadSpec("h", "regression", 1), HeadSpec("s", "regression", 1)]
CFGS = [TaskLossConfig(loss="focal", alpha=0.25, gamma=2.0, weight=2.0), TaskLossConfig(loss="bce"),
        TaskLossConfig(loss="ce"), TaskLossConfig(loss="huber", delta=1.0), TaskLossConfig(loss="mse")]


def run(out, y, weighting="fixed"):
    crit = MultiTaskLoss(HEADS, CFGS, weighting)
    return crit, crit(out, y, torch.zeros(5), torch.ones(5), None)


def test_each_loss_type_matches_its_formula():
    out = torch.zeros(5, 2, 3)
    out[0, :, 0] = torch.tensor([0.5, -1.0])  # focal logits
    out[1, :, 0] = torch.tensor([2.0, 0.0])  # bce logits
    out[2, :, :] = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])  # ce logits
    out[3, :, 0] = torch.tensor([0.0, 0.0])  # huber pred
    out[4, :, 0] = torch.tensor([1.0, 3.0])  # mse pred
    y = torch.tensor([[1.0, 1.0, 2.0, 0.5, 0.0],
                      [0.0, float("nan"), 0.0, 3.0, 1.0]])
    crit, lo = run(out, y)
    # focal: alpha_t (1 - p_t)^gamma * bce, per row, then the mean
    def focal(logit, t):
        p = 1 / (1 + math.exp(-logit))
        pt = p if t else 1 - p
        at = 0.25 if t else 0.75
        return at * (1 - pt) ** 2 * -math.log(pt)
    f = (focal(0.5, 1) + focal(-1.0, 0)) / 2
    b = -math.log(1 / (1 + math.exp(-2.0)))  # the nan row is masked out
    ce = ((-math.log(math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3)))) + math.log(3)) / 2
    huber = (0.5 * 0.5**2 + 1.0 * (3.0 - 0.5)) / 2
    mse = (1.0 + 4.0) / 2
    torch.testing.assert_close(lo.raw, torch.tensor([f, b, ce, huber, mse]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lo.counts, torch.tensor([2.0, 1.0, 2.0, 2.0, 2.0]))
    torch.testing.assert_close(lo.weighted, lo.raw * torch.tensor([2.0, 1, 1, 1, 1]))
    assert lo.present.all()


def test_task_without_targets_is_absent_with_zero_loss():
    out = torch.randn(5, 3, 3)
    y = torch.randn(3, 5).abs().round().clamp(0, 1)
    y[:, 1] = float("nan")
    _, lo = run(out, y)
    assert lo.present.tolist() == [True, False, True, True, True]
    assert float(lo.weighted[1]) == 0.0 and float(lo.raw[1]) == 0.0


def test_uncertainty_weighting_clamps_log_variance():
    out = torch.zeros(5, 2, 3)
    y = torch.zeros(2, 5)
    crit, lo = run(out, y, "uncertainty")
    with torch.no_grad():
        crit.log_vars.copy_(torch.tensor([10.0, -10.0, 0.0, 1.0, 0.0]))
    lo = crit(out, y, torch.zeros(5), torch.ones(5), None)
    lv = torch.tensor([10.0, -10.0, 0.0, 1.0, 0.0]).clamp(*LOG_VAR_RANGE)
    expected = 0.5 * torch.exp(-lv) * lo.raw + 0.5 * lv
    torch.testing.assert_close(lo.weighted, expected)
    assert float(lv[0]) == 4.0 and float(lv[1]) == -4.0


def test_infonce_prefers_the_matching_item():
    items = torch.nn.Embedding(3, 2)
    with torch.no_grad():
        items.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    good, n = MultiTaskLoss.infonce(q, items, torch.tensor([0.0, 1.0]), 0.1)
    bad, _ = MultiTaskLoss.infonce(q, items, torch.tensor([1.0, 0.0]), 0.1)
    assert int(n) == 2 and float(good) < float(bad)
    # row 0: logits [1, 0] / 0.1 -> loss log(1 + e^-10)
    assert float(good) == pytest.approx(math.log(1 + math.exp(-10)), rel=1e-3)  # float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_infonce_under_half_precision_autocast_computes_in_float32(dtype):
    """training.amp_dtype: float16 with a retrieval task: float16 logits cannot hold the
    -1e9 that masks in-batch duplicates (the masked_fill raised an overflow error)."""
    torch.manual_seed(0)
    items = torch.nn.Embedding(6, 8)
    q = torch.randn(5, 8)
    target = torch.tensor([0.0, 1.0, 1.0, float("nan"), 4.0])  # a shared item (masked) and a missing target
    ref, n = MultiTaskLoss.infonce(q, items, target, 0.05)
    with torch.autocast("cpu", dtype=dtype):
        got, m = MultiTaskLoss.infonce(q, items, target, 0.05)
    assert got.dtype == torch.float32 and int(m) == int(n) == 4
    assert float(got) == pytest.approx(float(ref), rel=1e-6)


def test_gate_entropy_of_uniform_gates_is_log_k():
    g = torch.full((2, 5, 4), 0.25)
    assert float(gate_entropy(g)) == pytest.approx(math.log(4))
