"""The report's analysis functions on hand-made matrices (no training)."""

from __future__ import annotations

import numpy as np
import pytest

from ple_adatt.reporting import analysis

TASKS = ["a1", "a2", "a3", "b1", "b2", "b3"]
GROUPS = {"A": {"members": ["a1", "a2", "a3"]}, "B": {"members": ["b1", "b2", "b3"]}}


def blocks(within: float = 0.6, cross: float = -0.2) -> np.ndarray:
    c = np.full((6, 6), cross)
    c[:3, :3] = within
    c[3:, 3:] = within
    np.fill_diagonal(c, 1.0)
    return c


def test_cosine_form_unit_diagonal_and_unmeasured_rows() -> None:
    c = blocks()
    a = 0.65 * c  # the EMA started from a zero observation: everything scaled by its mass
    a[5, :] = a[:, 5] = 0.0  # a task that never had a gradient
    out = analysis.cosine_form(a)
    np.testing.assert_allclose(np.diag(out), 1.0)
    np.testing.assert_allclose(out[:5, :5], c[:5, :5])
    assert np.all(out[5, :5] == 0) and np.all(out[:5, 5] == 0)
    # the identity a never-updated computer starts from stays the identity
    np.testing.assert_allclose(analysis.cosine_form(np.eye(3)), np.eye(3))


def test_group_order_puts_ungrouped_last() -> None:
    order, groups = analysis.group_order(["b1", "x", "a1", "b2"], {"A": {"members": ["a1", "zz"]},
                                                                   "B": {"members": ["b1", "b2"]}})
    assert order == ["a1", "b1", "b2", "x"]
    assert [g["name"] for g in groups] == ["A", "B", "(ungrouped)"]


def test_agreement_perfect_and_misplaced() -> None:
    order, groups = analysis.group_order(TASKS, GROUPS)
    prior = np.zeros((6, 6))
    res = analysis.agreement(TASKS, blocks(), prior, groups, [True] * 6)
    assert res["score"] == 1.0
    assert [g["verdict"] for g in res["groups"]] == ["supported", "supported"]
    assert not any(t["misplaced"] for t in res["tasks"])
    assert res["silhouette"] > 0.5
    # b1 configured in A: it is closer to B, and A is no longer clean
    wrong = {"A": {"members": ["a1", "a2", "a3", "b1"]}, "B": {"members": ["b2", "b3"]}}
    _, g2 = analysis.group_order(TASKS, wrong)
    res = analysis.agreement(TASKS, blocks(), prior, g2, [True] * 6)
    row = next(t for t in res["tasks"] if t["task"] == "b1")
    assert row["misplaced"] and row["best_other_group"] == "B" and row["gap"] == pytest.approx(0.8)
    assert res["score"] < 1.0


def test_regrouping_recovers_blocks_and_names_them() -> None:
    wrong = {"A": {"members": ["a1", "a2", "b1"]}, "B": {"members": ["a3", "b2", "b3"]}}
    _, groups = analysis.group_order(TASKS, wrong)
    res = analysis.suggest_regrouping(TASKS, blocks(), groups, [True] * 6)
    assert {g["name"]: g["members"] for g in res["groups"]} == {"A": ["a1", "a2", "a3"], "B": ["b1", "b2", "b3"]}
    assert {(m["task"], m["from"], m["to"]) for m in res["moves"]} == {("b1", "A", "B"), ("a3", "B", "A")}
    assert res["structure"] == "strong" and res["recommended"]
    assert res["silhouette_suggested"] > res["silhouette_configured"]


def test_regrouping_on_noise_is_not_recommended() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 6)) * 0.05
    c = np.clip((x + x.T) / 2, -1, 1)
    np.fill_diagonal(c, 1.0)
    _, groups = analysis.group_order(TASKS, GROUPS)
    res = analysis.suggest_regrouping(TASKS, c, groups, [True] * 6)
    assert res["structure"] == "weak" and not res["recommended"]


def test_average_linkage_is_deterministic() -> None:
    d = 1 - blocks()
    assert analysis.average_linkage(d, 2) == [0, 0, 0, 1, 1, 1]
    assert analysis.average_linkage(d, 6) == list(range(6))
    assert analysis.average_linkage(d, 1) == [0] * 6


def _hist(values: list[float]) -> list[dict]:
    out = []
    for e, v in enumerate(values):
        m = np.eye(3)
        m[0, 1] = m[1, 0] = v
        out.append({"phase": "phase1", "epoch": e, "step": 10 * (e + 1), "matrix": m.tolist()})
    return out


def test_negative_transfer_since_and_duration() -> None:
    hist = _hist([0.1, -0.2, 0.05, -0.15, -0.3])
    a = np.array(hist[-1]["matrix"])
    res = analysis.negative_transfer_pairs(["x", "y", "z"], a, -0.1, hist)
    (p,) = res["blocked"]
    assert (p["a"], p["b"]) == ("x", "y") and p["affinity"] == -0.3
    # `epoch` stays the manifest's 0-based index; `epoch_1based` is what the console printed
    assert p["since"] == {"phase": "phase1", "epoch": 3, "epoch_1based": 4, "step": 40}
    assert p["epochs_below"] == 2 and p["steps_below_at_most"] == 50 - 30
    assert p["first_below"]["epoch"] == 1 and p["epochs_ever_below"] == 3 and p["min_affinity"] == -0.3
    # recovered: below once, fine at the end
    hist = _hist([0.1, -0.2, 0.05])
    res = analysis.negative_transfer_pairs(["x", "y", "z"], np.array(hist[-1]["matrix"]), -0.1, hist)
    assert res["blocked"] == [] and res["recovered"][0]["first_below"]["epoch"] == 1


def test_changing_pairs_rank_by_range_and_keep_blocked() -> None:
    hist = _hist([0.0, 0.5, 0.1])
    res = analysis.changing_pairs(["x", "y", "z"], hist, top=1, always=[("z", "y")])
    assert [(r["a"], r["b"], r["reason"]) for r in res] == [("x", "y", "most changing"), ("y", "z", "blocked")]
    assert res[0]["range"] == 0.5 and res[0]["change"] == pytest.approx(0.1)


def test_transfer_shares_per_task() -> None:
    hist = [{"phase": "phase1", "epoch": 0, "step": 5, "transfer_phase": "dynamic", "transfer_share": 0.2,
             "task_losses": {"x": 3.0, "y": 2.0}, "raw_losses": {"x": 1.0, "y": 2.0}}]
    (e,) = analysis.transfer_shares(["x", "y"], hist, [2.0, 1.0])
    assert e["tasks"] == {"x": pytest.approx(1 / 3), "y": 0.0}
    (e,) = analysis.transfer_shares(["x", "y"], hist, None)
    assert e["tasks"] == {"x": None, "y": None} and e["total"] == 0.2


def test_gcd_and_tci_definitions() -> None:
    rows = analysis.gcd_pairs(["x", "y", "z"], np.array([[1, -0.5, 0.2], [-0.5, 1, 0], [0.2, 0, 1.0]]),
                              [True, True, False])
    assert rows == [{"a": "x", "b": "y", "cos": -0.5, "gcd": 1.5, "conflict": True}]
    t = {r["task"]: r for r in analysis.tci({"x": 1.1, "y": 0.9}, {"x": 1.0, "y": 1.0, "z": 2.0})}
    assert t["x"]["tci"] == pytest.approx(-0.1) and t["x"]["conflict"]
    assert t["y"]["tci"] == pytest.approx(0.1) and not t["y"]["conflict"]
    assert t["z"]["tci"] is None  # no joint loss for z


def _noisy_blocks(seed: int, within: float, noise: float) -> np.ndarray:
    """Two planted groups of 6 tasks with symmetric pair noise of sd ``noise``."""
    n = 12
    rng = np.random.default_rng(seed)
    e = rng.normal(0, noise, (n, n))
    c = np.zeros((n, n)) + np.triu(e, 1) + np.triu(e, 1).T
    c[:6, :6] += within
    c[6:, 6:] += within
    np.fill_diagonal(c, 1.0)
    return c


TASKS12 = [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(6)]
PLANTED12 = {"A": {"members": TASKS12[:6]}, "B": {"members": TASKS12[6:]}}


def test_a_gap_within_the_noise_is_only_weakly_closer() -> None:
    """Pure noise (no group structure) gives about half the tasks a positive gap; the rule flags
    about 1 in 160 (z > 2.5), where the bare sign (the old rule) flagged every one of them."""
    _, groups = analysis.group_order(TASKS12, PLANTED12)
    weak = flagged = 0
    for seed in range(40):
        res = analysis.agreement(TASKS12, _noisy_blocks(seed, 0.0, 0.03), np.zeros((12, 12)), groups, [True] * 12)
        for t in res["tasks"]:
            assert t["weakly_closer"] == (0 < t["gap"] <= t["min_gap"])
            assert t["misplaced"] == (t["gap"] > t["min_gap"])
            assert t["min_gap"] == pytest.approx(analysis.MISPLACED_Z * t["noise"])
            weak += t["weakly_closer"]
            flagged += t["misplaced"]
    assert weak > 0.4 * 480 and flagged <= 0.02 * 480, (weak, flagged)


def test_a_moved_task_is_flagged_beyond_the_noise() -> None:
    c = _noisy_blocks(0, 0.1, 0.03)
    _, planted = analysis.group_order(TASKS12, PLANTED12)
    assert not any(t["misplaced"] for t in analysis.agreement(TASKS12, c, np.zeros((12, 12)), planted,
                                                              [True] * 12)["tasks"])
    moved = {"A": {"members": TASKS12[:5]}, "B": {"members": TASKS12[5:]}}  # a5 configured in B
    _, groups = analysis.group_order(TASKS12, moved)
    res = analysis.agreement(TASKS12, c, np.zeros((12, 12)), groups, [True] * 12)
    assert [t["task"] for t in res["tasks"] if t["misplaced"]] == ["a5"]
    row = next(t for t in res["tasks"] if t["task"] == "a5")
    assert row["best_other_group"] == "A" and row["gap"] > row["min_gap"] > 0 and row["z"] > analysis.MISPLACED_Z
    # the noise is the spread of the cross-group pairs that do not involve a5 (a5's own pairs,
    # really within-group, would inflate it)
    rest = [c[i, j] for i in range(12) for j in range(i + 1, 12) if 5 not in (i, j)
            and (i < 5 or i == 5) != (j < 5 or j == 5)]
    assert row["noise"] == pytest.approx(np.std(rest, ddof=1) * np.sqrt(1 / 6 + 1 / 5))
