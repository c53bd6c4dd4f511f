"""The gradient methods beside adaTT against hand-computed results, and through the trainer.

PCGrad (seed 004), MoCoGrad (seed 002), GradNorm and MGDA (seed 003), uncertainty weighting
and equal weighting: each on constructed gradients, then a few real training steps each.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from corehelpers import make_batch

from ple_adatt.config import (
    STRATEGY_NAMES,
    ConfigError,
    TaskSpec,
    TransferConfig,
    load_train_config,
)
from ple_adatt.training import Trainer, build_system
from ple_adatt.transfer import (
    MGDA,
    STRATEGIES,
    GradNorm,
    MoCoGrad,
    PCGrad,
    build_strategy,
)
from ple_adatt.transfer.gradnorm import gradnorm_step
from ple_adatt.transfer.mgda import min_norm_weights
from ple_adatt.transfer.mocograd import mocograd_combine
from ple_adatt.transfer.pcgrad import pcgrad_combine

ROOT = Path(__file__).resolve().parents[2]
ALL = torch.tensor([True, True])


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------------------- registry


def test_config_names_are_the_registry_keys_in_order():
    assert tuple(STRATEGIES) == STRATEGY_NAMES


def test_unknown_strategy_is_rejected_with_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown transfer.strategy 'cagrad'; valid: adatt, equal, gradnorm, "
                                         r"mgda, mocograd, pcgrad, uncertainty$"):
        build_strategy(["a"], TransferConfig(strategy="cagrad"))
    with pytest.raises(ConfigError, match=r"key `transfer.strategy` is 'cagrad'; allowed values: adatt, pcgrad, "
                                          r"mocograd, gradnorm, mgda, uncertainty, equal"):
        load_train_config(ROOT / "configs/train/cpu_small.yaml", ["transfer.strategy=cagrad"])


def test_gradnorm_with_uncertainty_weighting_is_rejected_with_the_fix():
    with pytest.raises(ConfigError, match=r"cannot be combined with `training.loss_weighting: uncertainty`; "
                                          r"set `training.loss_weighting: fixed`"):
        load_train_config(ROOT / "configs/train/cpu_small.yaml",
                          ["transfer.strategy=gradnorm", "training.loss_weighting=uncertainty"])


@pytest.mark.parametrize("override, match", [
    ("transfer.mocograd.beta=1.0", r"`transfer.mocograd.beta` must be in \[0, 1\)"),
    ("transfer.gradnorm.lr=0", r"`transfer.gradnorm.lr` must be > 0"),
    ("transfer.mgda.on=latent", r"`transfer.mgda.on`: 'latent' is not allowed; allowed values: 'params', "
                                r"'representation'"),
])
def test_method_settings_are_validated(override, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config(ROOT / "configs/train/cpu_small.yaml", [override])


# ------------------------------------------------------------------------------ PCGrad


def test_pcgrad_projects_two_conflicting_gradients_onto_each_others_normal_plane():
    # g1.g2 = -1: g1' = g1 - (-1/2) g2 = (0.5, 0.5); g2' = g2 - (-1/1) g1 = (0, 1)
    out = pcgrad_combine(t([1.0, 0.0], [-1.0, 1.0]), ALL)
    torch.testing.assert_close(out, t(0.5, 1.5))
    assert float(t(0.5, 0.5) @ t(-1.0, 1.0)) == 0.0  # the projection is orthogonal to g2


def test_pcgrad_leaves_agreeing_gradients_alone():
    torch.testing.assert_close(pcgrad_combine(t([1.0, 0.0], [1.0, 1.0]), ALL), t(2.0, 1.0))


def test_pcgrad_ignores_absent_tasks_and_uses_a_random_order_for_three():
    g = t([1.0, 0.0], [-1.0, 1.0], [-1.0, -1.0])
    torch.testing.assert_close(pcgrad_combine(g, torch.tensor([True, True, False])), t(0.5, 1.5))
    # with three tasks the order matters; over draws both orders of task 0's partners show up
    outs = {tuple(round(v, 4) for v in pcgrad_combine(g, torch.ones(3, dtype=torch.bool), 0, d).tolist())
            for d in range(12)}
    assert len(outs) > 1
    # the strategy draws new orders every step, on its own counter
    s = PCGrad(["a", "b", "c"], seed=0)
    outs = {tuple(round(v, 4) for v in s.shared_gradient(g, torch.ones(3, dtype=torch.bool)).tolist())
            for _ in range(12)}
    assert len(outs) > 1 and int(s.draws) == 12


# ---------------------------------------------------------------------------- MoCoGrad


def test_mocograd_calibrates_conflicting_gradients_with_the_other_tasks_momentum():
    g = t([1.0, 0.0], [-1.0, 1.0])
    m = t([2.0, 0.0], [0.0, 2.0])
    # g1' = g1 + 0.5 * |g1|/|m2| * m2 = (1, 0.5); g2' = g2 + 0.5 * sqrt(2)/2 * m1 = (-1 + sqrt(2)/2, 1)
    out = mocograd_combine(g, m, ALL, strength=0.5)
    torch.testing.assert_close(out, t(math.sqrt(2) / 2, 1.5))
    # agreeing gradients pass unchanged
    torch.testing.assert_close(mocograd_combine(t([1.0, 0.0], [1.0, 1.0]), m, ALL, 0.5), t(2.0, 1.0))


def test_mocograd_momentum_update_and_checkpoint_round_trip():
    s = MoCoGrad(["a", "b"], beta=0.9, strength=0.5)
    g1, g2 = t([1.0, 0.0], [0.0, 2.0]), t([3.0, 0.0], [0.0, 4.0])
    s.update_momentum(g1, ALL)
    torch.testing.assert_close(s.momentum, g1)  # the first observation is copied
    s.update_momentum(g2, torch.tensor([True, False]))  # b absent: keeps its momentum
    torch.testing.assert_close(s.momentum, t([0.9 * 1 + 0.1 * 3, 0.0], [0.0, 2.0]))
    assert s.momentum_count.tolist() == [2, 1]
    state = s.state_dict()
    assert {"momentum", "momentum_count", "affinity_computer.affinity_matrix"} <= set(state)
    fresh = MoCoGrad(["a", "b"])
    fresh.load_state_dict(state)  # the lazily sized buffer takes the saved shape
    torch.testing.assert_close(fresh.momentum, s.momentum)
    assert fresh.momentum_count.tolist() == [2, 1]


def test_mocograd_shared_gradient_uses_the_momentum_including_this_step():
    s = MoCoGrad(["a", "b"], beta=0.5, strength=1.0)
    s.shared_gradient(t([1.0, 0.0], [0.0, 1.0]), ALL)  # no conflict: momentum = g
    out = s.shared_gradient(t([1.0, 0.0], [-1.0, 1.0]), ALL)
    m = t([1.0, 0.0], [-0.5, 1.0])  # 0.5 * old + 0.5 * new
    expected = t(1.0, 0.0) + (1.0 / m[1].norm()) * m[1] + t(-1.0, 1.0) + (math.sqrt(2) / 1.0) * m[0]
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------------------- GradNorm


def test_gradnorm_raises_the_weight_of_the_task_that_trains_slower():
    # equal gradient norms; task 0 kept its loss (ratio 1), task 1 halved it (ratio 0.5)
    # r = (4/3, 2/3); targets = r**1.5 * mean G = (1.540, 0.544); sign(G - target) = (-1, +1)
    w = gradnorm_step(torch.ones(2), torch.ones(2), t(1.0, 0.5), ALL, alpha=1.5, lr=0.025)
    torch.testing.assert_close(w, t(1.025, 0.975))
    assert float(w.sum()) == pytest.approx(2.0)


def test_gradnorm_with_alpha_zero_equalises_gradient_norms_and_renormalises_to_t():
    # alpha 0: target = mean G; task 0's weighted gradient is the largest -> its weight falls
    w = gradnorm_step(torch.ones(3), t(4.0, 1.0, 1.0), torch.ones(3), torch.ones(3, dtype=torch.bool),
                      alpha=0.0, lr=0.3)
    # grad_w = sign(G - 2) * n / 2 = (2, -0.5, -0.5); w - 0.3 grad = (0.4, 1.15, 1.15), sum 2.7 -> * 3 / 2.7
    torch.testing.assert_close(w, t(0.4, 1.15, 1.15) * (3 / 2.7))


def test_gradnorm_strategy_applies_weights_and_records_initial_losses():
    s = GradNorm(["a", "b"], alpha=1.5, lr=0.1)
    losses = t(2.0, 1.0)
    out, _ = s.transfer_losses(losses, ALL, t([1.0, 0.0], [0.0, 1.0]), epoch=0)
    torch.testing.assert_close(out, losses)  # weights start at 1
    torch.testing.assert_close(s.initial_losses, losses)
    s.transfer_losses(t(2.0, 0.5), ALL, t([1.0, 0.0], [0.0, 1.0]), epoch=0)  # b trains faster
    assert s.loss_weights[0] > 1.0 > s.loss_weights[1]
    assert float(s.loss_weights.sum()) == pytest.approx(2.0)


# -------------------------------------------------------------------------------- MGDA


def gram(*rows):
    g = t(*rows).double()
    return g @ g.T


@pytest.mark.parametrize("rows, expected", [
    ([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5]),
    ([[2.0, 0.0], [0.0, 1.0]], [0.2, 0.8]),  # closed form for two: (g2 - g1).g2 / |g1 - g2|^2
    ([[1.0, 0.0], [3.0, 1.0]], [1.0, 0.0]),  # g1.g2 >= |g1|^2: the smaller gradient dominates
    ([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [1 / 3, 1 / 3, 1 / 3]),
    ([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [0.5, 0.5, 0.0]),  # the third lies outside the min-norm face
    ([[1.0, 0.0], [-1.0, 0.0], [0.0, 5.0]], [0.5, 0.5, 0.0]),  # the origin is in the hull: norm 0
])
def test_mgda_min_norm_weights_hit_known_points(rows, expected):
    a = min_norm_weights(gram(*rows))
    torch.testing.assert_close(a, torch.tensor(expected, dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("T, P, seed", [(16, 40, 0), (16, 5, 1), (7, 100, 2), (12, 12, 3)])
def test_mgda_solution_satisfies_the_kkt_conditions(T, P, seed):
    g = torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g[0] = g[1]  # linearly dependent rows make the free-set system singular
    M = g @ g.T
    a = min_norm_weights(M)
    assert float(a.min()) >= 0 and float(a.sum()) == pytest.approx(1.0)
    grad = M @ a
    val = float(a @ grad)
    assert float(grad.min()) >= val - 1e-8 * float(M.diagonal().max())  # no vertex improves
    # and nothing a long Frank-Wolfe run finds is better
    x = torch.full((T,), 1.0 / T, dtype=torch.float64)
    for k in range(20000):
        s = torch.zeros(T, dtype=torch.float64)
        s[int((M @ x).argmin())] = 1.0
        x = x + 2.0 / (k + 2) * (s - x)
    assert val <= float(x @ M @ x) + 1e-10


def test_mgda_shared_gradient_is_the_scaled_min_norm_direction():
    s = MGDA(["a", "b", "c"])
    g = t([2.0, 0.0], [0.0, 1.0], [9.0, 9.0])
    out = s.shared_gradient(g, torch.tensor([True, True, False]))
    torch.testing.assert_close(s.last_weights, t(0.2, 0.8, 0.0))
    torch.testing.assert_close(out, 2 * t(0.4, 0.8))  # n = 2 present tasks


# -------------------------------------------------------------- through the real trainer

SPECS = [TaskSpec("ctr", "a", "binary"), TaskSpec("cvr", "b", "binary"), TaskSpec("ltv", "c", "regression")]


def trainer_for(strategy: str, extra=()):
    cfg = load_train_config(ROOT / "configs/train/cpu_small.yaml", [
        f"transfer.strategy={strategy}", "training.shared_expert_epochs=2", "training.batch_size=32",
        "transfer.adatt.warmup_epochs=0", "transfer.adatt.freeze_epoch=1", *extra])
    torch.manual_seed(0)
    system = build_system(cfg, SPECS, 5, [4, 4], 3)
    data, val = make_batch(128), make_batch(48, seed=1)
    data.y, val.y = data.y[:, [0, 1, 3]], val.y[:, [0, 1, 3]]
    return Trainer(system, data, val, cfg, torch.device("cpu"), log=lambda m: None)


@pytest.mark.parametrize("strategy", [*STRATEGY_NAMES, "mgda-ub"])
def test_every_strategy_trains_through_the_trainer(strategy):
    extra = ["transfer.mgda.on=representation"] if strategy == "mgda-ub" else []
    tr = trainer_for(strategy.removesuffix("-ub"), extra)
    before = {k: v.clone() for k, v in tr.system.state_dict().items()}
    tr.run_phase1()
    after = tr.system.state_dict()
    assert len(tr.history) == 2 and all(math.isfinite(h.val["val_loss"]) for h in tr.history)
    assert not torch.equal(before["model.shared_experts.experts.expert_0.w1"],
                           after["model.shared_experts.experts.expert_0.w1"])
    A = after["transfer.affinity_computer.affinity_matrix"]
    assert int(after["transfer.affinity_computer.update_count"]) > 0 and not torch.equal(A, torch.eye(3))
    if strategy in ("pcgrad", "mocograd", "gradnorm", "mgda", "mgda-ub"):  # every step, not every 2nd
        assert int(after["transfer.affinity_computer.update_count"]) == tr.global_step
    if strategy == "uncertainty":
        assert tr.system.criterion.log_vars is not None and float(after["criterion.log_vars"].abs().sum()) > 0
    if strategy == "gradnorm":
        w = after["transfer.loss_weights"]
        assert float(w.sum()) == pytest.approx(3.0) and not torch.allclose(w, torch.ones(3))
    if strategy == "mocograd":
        assert after["transfer.momentum"].shape[0] == 3 and int(after["transfer.momentum_count"].min()) > 0
    if strategy != "adatt":
        assert all(h.transfer_share == 0.0 and h.transfer_phase == strategy.removesuffix("-ub")
                   for h in tr.history)


@pytest.mark.parametrize("accum", [1, 2])
def test_gradient_surgery_replaces_only_the_shared_experts_gradient(accum):
    tr = trainer_for("mgda", [f"training.gradient_accumulation_steps={accum}"])
    model = tr.system.model
    b = tr.train_data.subset(torch.arange(32))
    shared = model.shared_parameters()
    # previous micro-batch's accumulated gradient
    prior = [torch.full_like(p, 0.5) if accum > 1 else None for p in shared]
    for p, g in zip(shared, prior):
        p.grad = None if g is None else g.clone()
    step = tr.forward_losses(b, 0, False)
    grads, _ = step.surgery
    before = tr._shared_grads()
    (step.total / accum).backward()
    tower_grad = model.tower.weight.grad.clone()
    tr._replace_shared_gradient(step, before, 1.0, accum)
    a = tr.system.transfer.last_weights
    n = int(step.losses.present.sum())
    expected = n * (a @ grads) / accum
    got = torch.cat([p.grad.flatten() for p in shared])
    base = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for p, g in zip(shared, prior)])
    torch.testing.assert_close(got, base + expected)
    assert not torch.allclose(expected * accum, grads.sum(0))  # MGDA differs from the plain sum here
    torch.testing.assert_close(model.tower.weight.grad, tower_grad)  # non-shared: ordinary backward


# ------------------------------------------- Gram-space surgery against the explicit loops


def _pcgrad_loop(g: torch.Tensor, present: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """The paper's algorithm on explicit vectors (float64), in the given per-task orders."""
    g = g.double()
    out = torch.zeros_like(g[0])
    for i in range(len(g)):
        if not present[i]:
            continue
        gi = g[i].clone()
        for j in orders[i].tolist():
            if j != i and present[j] and float(g[j] @ g[j]) > 1e-20 and float(gi @ g[j]) < 0:
                gi = gi - (gi @ g[j]) / (g[j] @ g[j]) * g[j]
        out += gi
    return out


def _mocograd_loop(g: torch.Tensor, m: torch.Tensor, present: torch.Tensor, orders: torch.Tensor,
                   strength: float) -> torch.Tensor:
    g, m = g.double(), m.double()
    out = torch.zeros_like(g[0])
    for i in range(len(g)):
        if not present[i]:
            continue
        gi = g[i].clone()
        for j in orders[i].tolist():
            if j != i and present[j] and float(m[j].norm()) > 1e-12 and float(gi @ g[j]) < 0:
                gi = gi + strength * gi.norm() / m[j].norm() * m[j]
        out += gi
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gram_space_pcgrad_and_mocograd_equal_the_explicit_loops(seed):
    from ple_adatt.transfer.pcgrad import random_orders

    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(7, 40, generator=gen)  # random directions: about half the pairs conflict
    m = torch.randn(7, 40, generator=gen)
    present = torch.tensor([True, True, False, True, True, True, False])
    orders = random_orders(7, 100 + seed, 3, torch.device("cpu"))
    fast = pcgrad_combine(g, present, 100 + seed, 3)
    torch.testing.assert_close(fast.double(), _pcgrad_loop(g, present, orders), rtol=1e-4, atol=1e-4)
    fast = mocograd_combine(g, m, present, 0.5, 100 + seed, 3)
    torch.testing.assert_close(fast.double(), _mocograd_loop(g, m, present, orders, 0.5), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(pcgrad_combine(g, present, 1), g[present].sum(0))


def test_random_orders_are_uniform_permutations_that_change_with_every_draw():
    from ple_adatt.transfer.pcgrad import random_orders

    n, draws = 6, 3000
    orders = torch.stack([random_orders(n, 7, d, torch.device("cpu")) for d in range(draws)])  # (draws, n, n)
    assert torch.equal(orders.sort(dim=2).values, torch.arange(n).expand(draws, n, n))  # every row a permutation
    assert torch.equal(random_orders(n, 7, 11, torch.device("cpu")), orders[11])  # (seed, draw) fixes them
    assert not torch.equal(random_orders(n, 8, 11, torch.device("cpu")), orders[11])
    assert len({tuple(o.flatten().tolist()) for o in orders}) == draws
    # each task comes first in a row about equally often: chi-square with n - 1 = 5 degrees of freedom
    counts = torch.bincount(orders[:, :, 0].flatten(), minlength=n).double()
    expected = draws * n / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # p < 0.001 for 5 degrees of freedom
    # and the position of task 0 in row 1 is uniform too (no bias from the row index)
    pos = (orders[:, 1, :] == 0).double().argmax(dim=1)
    counts = torch.bincount(pos, minlength=n).double()
    assert float(((counts - draws / n) ** 2 / (draws / n)).sum()) < 20.5


def test_gradnorm_step_without_present_tasks_keeps_the_weights():
    w = torch.tensor([0.5, 1.5])
    out = gradnorm_step(w, torch.ones(2), torch.ones(2), torch.zeros(2, dtype=torch.bool), alpha=1.5, lr=0.1)
    torch.testing.assert_close(out, w)
