"""adaTT against hand-computed values (seed sections 2-7)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from ple_adatt import AdaptiveTaskTransfer, TaskAffinityComputer

TASKS = ["a", "b", "c", "d"]
GROUPS = {"g1": {"members": ["a", "b"], "intra_strength": 0.8}, "g2": {"members": ["c", "x"], "intra_strength": 0.6}}


def make(**kw) -> AdaptiveTaskTransfer:
    args = dict(task_groups=GROUPS, warmup_epochs=2, freeze_epoch=6)
    args.update(kw)
    return AdaptiveTaskTransfer(TASKS, **args)


# ------------------------------------------------------------------ TaskAffinityComputer


def test_affinity_starts_at_identity_and_first_update_copies_observation():
    comp = TaskAffinityComputer(["a", "b", "c"])
    assert torch.equal(comp.affinity_matrix, torch.eye(3))
    assert int(comp.update_count) == 0
    g = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 2.0]), "c": torch.tensor([3.0, 3.0])}
    cos = comp.compute_affinity(g)
    s = 1 / math.sqrt(2)
    expected = torch.tensor([[1.0, 0.0, s], [0.0, 1.0, s], [s, s, 1.0]])
    torch.testing.assert_close(cos, expected)
    torch.testing.assert_close(comp.get_affinity_matrix(), expected)
    assert int(comp.update_count) == 1


def test_affinity_ema_sequence_matches_hand_computation():
    comp = TaskAffinityComputer(["a", "b"], ema_decay=0.9)
    obs = [
        {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0, 0.0])},  # cos 1
        {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([-1.0, 0.0])},  # cos -1
        {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0])},  # cos 0
    ]
    a01 = []
    for g in obs:
        comp.compute_affinity(g)
        a01.append(float(comp.affinity_matrix[0, 1]))
    # A1 = 1 (copied), A2 = 0.9*1 + 0.1*(-1) = 0.8, A3 = 0.9*0.8 + 0.1*0 = 0.72
    assert a01 == pytest.approx([1.0, 0.8, 0.72])
    assert float(comp.affinity_matrix[0, 0]) == pytest.approx(1.0)
    assert int(comp.update_count) == 3


def test_missing_task_counts_as_zero_gradient():
    comp = TaskAffinityComputer(["a", "b", "c"])
    comp.compute_affinity({"a": torch.tensor([1.0, 1.0]), "c": torch.tensor([2.0, 2.0])})
    a = comp.affinity_matrix
    assert float(a[0, 2]) == pytest.approx(1.0)
    assert torch.equal(a[1], torch.zeros(3))  # zero gradient: norm clamped, cosine 0 everywhere


def test_affinity_is_clamped_after_every_update():
    comp = TaskAffinityComputer(["a", "b"], ema_decay=0.9)
    comp.compute_affinity({"a": torch.tensor([1.0]), "b": torch.tensor([1.0])})
    comp.affinity_matrix.fill_(2.0)  # as if float error had accumulated
    comp.compute_affinity({"a": torch.tensor([1.0]), "b": torch.tensor([1.0])})
    assert float(comp.affinity_matrix.max()) == 1.0  # 0.9*2 + 0.1*1 = 1.9 -> 1.0


def test_unknown_task_gradient_is_rejected():
    comp = TaskAffinityComputer(["a"])
    with pytest.raises(ValueError, match="unknown tasks"):
        comp.compute_affinity({"zz": torch.ones(2)})


# -------------------------------------------------------------------------- construction


def test_freeze_must_come_after_warmup():
    with pytest.raises(ValueError, match=r"freeze_epoch \(2\) must be greater than warmup_epochs \(2\)"):
        make(warmup_epochs=2, freeze_epoch=2)


def test_group_prior_is_row_normalised_with_intra_and_inter_strength():
    t = make()
    p = t.group_prior
    # row a: [0, 0.8 (b, same group), 0.3, 0.3] / 1.4 ; row c: [0.3, 0.3, 0, 0.3] / 0.9 (x is not a task)
    torch.testing.assert_close(p[0], torch.tensor([0.0, 0.8, 0.3, 0.3]) / 1.4)
    torch.testing.assert_close(p[2], torch.tensor([0.3, 0.3, 0.0, 0.3]) / 0.9)
    torch.testing.assert_close(p.sum(1), torch.ones(4))
    assert torch.equal(p.diagonal(), torch.zeros(4))
    assert isinstance(t.transfer_weights, torch.nn.Parameter)
    assert torch.equal(t.transfer_weights.detach(), torch.zeros(4, 4))


@pytest.mark.parametrize("epoch,ratio", [(0, 0.5), (2, 0.5), (3, 0.4), (4, 0.3), (5, 0.2), (6, 0.1), (12, 0.1)])
def test_blend_ratio_anneals_linearly_between_warmup_and_freeze(epoch, ratio):
    assert make().blend_ratio(epoch) == pytest.approx(ratio)


# ------------------------------------------------------------------------------ phases


def losses(**vals: float) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, requires_grad=True) for k, v in vals.items()}


def grads() -> dict[str, torch.Tensor]:
    return {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0, 0.1]), "c": torch.tensor([0.0, 1.0]),
            "d": torch.tensor([-1.0, 0.0])}


def test_warmup_returns_losses_unchanged_but_measures_affinity():
    t = make()
    L = losses(a=1.0, b=2.0, c=3.0, d=4.0)
    out = t.compute_transfer_loss(L, grads(), epoch=0)
    assert {k: float(v.detach()) for k, v in out.items()} == {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    assert int(t.affinity_computer.update_count) == 1
    assert float(t.affinity_computer.affinity_matrix[0, 3]) == pytest.approx(-1.0)


def _expected_weights(t: AdaptiveTaskTransfer, ratio: float, present: list[bool]) -> torch.Tensor:
    A = t.affinity_computer.affinity_matrix
    R = (t.transfer_weights.detach() + A) * (1 - ratio) + t.group_prior * ratio
    W = torch.zeros(4, 4)
    for i in range(4):
        cols = [j for j in range(4) if j != i and present[j] and float(A[i, j]) > t.neg_threshold]
        if cols:
            e = torch.exp(torch.stack([R[i, j] / t.temperature for j in cols]))
            for k, j in enumerate(cols):
                W[i, j] = e[k] / e.sum()
    return W


def test_dynamic_phase_transfer_loss_matches_hand_computation():
    t = make(transfer_lambda=0.1, max_transfer_ratio=0.5)
    L = losses(a=1.0, b=2.0, c=3.0, d=4.0)
    out = t.compute_transfer_loss(L, grads(), epoch=3)  # dynamic, r = 0.4
    W = _expected_weights(t, 0.4, [True] * 4)
    # d's gradient is opposite to a's and b's: blocked both ways with exactly zero weight
    assert float(W[0, 3]) == 0.0 and float(W[3, 0]) == 0.0
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0])
    for i, n in enumerate(TASKS):
        transfer = min(0.1 * float(W[i] @ vals), 0.5 * float(vals[i]))
        assert float(out[n].detach()) == pytest.approx(float(vals[i]) + transfer, rel=1e-6)
    # get_transfer_matrix uses the recorded epoch (0 until on_epoch_end): r = prior_blend_start
    torch.testing.assert_close(t.get_transfer_matrix(), _expected_weights(t, 0.5, [True] * 4))
    out["a"].backward()
    assert t.transfer_weights.grad is not None and float(t.transfer_weights.grad.abs().sum()) > 0


def test_blocked_self_and_absent_tasks_get_exactly_zero_weight():
    t = make()
    t.compute_transfer_loss(losses(a=1.0, b=1.0, c=1.0, d=1.0), grads(), epoch=3)
    present = torch.tensor([True, False, True, True])  # b absent
    L = torch.tensor([1.0, 0.0, 3.0, 4.0])
    enhanced, w = t.transfer_losses(L, present, None, epoch=3)
    w = w.detach()
    assert torch.equal(w.diagonal(), torch.zeros(4))
    assert torch.equal(w[:, 1], torch.zeros(4))  # absent task: never a partner
    assert float(w[0, 3]) == 0.0  # blocked
    torch.testing.assert_close(w, _expected_weights(t, 0.4, [True, False, True, True]))
    assert float(enhanced[1].detach()) == 0.0  # an absent task gets no loss at all
    out = t.compute_transfer_loss({"a": torch.tensor(1.0), "c": torch.tensor(3.0), "d": torch.tensor(4.0)}, None, 3)
    assert set(out) == {"a", "c", "d"}


def test_task_without_eligible_partner_gets_no_transfer():
    t = make()
    t.compute_transfer_loss(losses(a=1.0, b=1.0, c=1.0, d=1.0), grads(), epoch=3)
    # d is blocked from a and b; with c absent it has no partner left
    out = t.compute_transfer_loss({"a": torch.tensor(1.0), "b": torch.tensor(1.0), "d": torch.tensor(5.0)}, None, 3)
    assert float(out["d"].detach()) == 5.0


def test_transfer_is_capped_at_max_ratio_of_own_loss():
    t = make(transfer_lambda=1.0, max_transfer_ratio=0.5)
    t.compute_transfer_loss(losses(a=1.0, b=1.0, c=1.0, d=1.0), grads(), epoch=3)
    out = t.compute_transfer_loss({"a": torch.tensor(0.1), "b": torch.tensor(100.0)}, None, 3)
    assert float(out["a"].detach()) == pytest.approx(0.1 + 0.05)  # lambda*100 capped at 0.5*0.1


def test_frozen_phase_uses_final_ratio_detaches_weights_and_stops_measuring():
    t = make()
    t.compute_transfer_loss(losses(a=1.0, b=2.0, c=3.0, d=4.0), grads(), epoch=3)
    assert t.on_epoch_end(5) == []
    assert not bool(t.is_frozen)
    frozen_flag = t.is_frozen
    assert t.on_epoch_end(6) == ["adatt_freeze_epoch"]
    assert bool(t.is_frozen) and t.is_frozen is frozen_flag  # updated in place
    assert int(t.current_epoch) == 6
    count = int(t.affinity_computer.update_count)
    before = t.affinity_computer.affinity_matrix.clone()
    out = t.compute_transfer_loss(losses(a=1.0, b=2.0, c=3.0, d=4.0), grads(), epoch=7)
    assert int(t.affinity_computer.update_count) == count
    assert torch.equal(t.affinity_computer.affinity_matrix, before)
    W = _expected_weights(t, 0.1, [True] * 4)
    vals = [1.0, 2.0, 3.0, 4.0]
    for i, n in enumerate(TASKS):
        transfer = min(0.1 * sum(float(W[i, j]) * vals[j] for j in range(4)), 0.5 * vals[i])
        assert float(out[n].detach()) == pytest.approx(vals[i] + transfer, rel=1e-6)
    sum(out.values()).backward()
    assert t.transfer_weights.grad is None


def test_detect_negative_transfer_lists_pairs_below_threshold():
    t = make()
    t.compute_transfer_loss(losses(a=1.0, b=1.0, c=1.0, d=1.0), grads(), epoch=0)
    assert t.detect_negative_transfer() == {"a": ["d"], "b": ["d"], "d": ["a", "b"]}


def test_state_dict_round_trips_with_weights_only_and_restores_frozen_state():
    t = make()
    t.compute_transfer_loss(losses(a=1.0, b=1.0, c=1.0, d=1.0), grads(), epoch=3)
    t.on_epoch_end(6)
    buf = io.BytesIO()
    torch.save(t.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert {"affinity_computer.affinity_matrix", "affinity_computer.update_count", "group_prior",
            "current_epoch", "is_frozen", "transfer_weights"} <= set(state)
    fresh = make()
    fresh.load_state_dict(state)
    assert fresh.phase(7) == "frozen"
    assert torch.equal(fresh.affinity_computer.affinity_matrix, t.affinity_computer.affinity_matrix)
