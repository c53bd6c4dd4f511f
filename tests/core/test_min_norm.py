"""MGDA's device min-norm solver (ple_adatt.transfer.min_norm): one Triton program, here under
Triton's interpreter, against the host solver; its first-use check and fallback through the
trainer; and the iteration cap's event. On a GPU, tests/core/test_gpu.py runs MGDA compiled,
sync-free and under real CUDA graphs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from corehelpers import BATCH_SPECS, make_batch, reset_guard
from graph_emulator import EmulatedCudaGraphs

from ple_adatt.config import ConfigError, load_train_config
from ple_adatt.training import Trainer, build_system
from ple_adatt.transfer import min_norm
from ple_adatt.transfer.mgda import MGDA, min_norm_weights
from ple_adatt.transfer.min_norm import min_norm_weights_device

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("interpreter")


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    reset_guard(monkeypatch, min_norm.GUARD)


def _objective(a: torch.Tensor, M: torch.Tensor) -> float:
    return float(a.double() @ M @ a.double())


def _host(M: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    a = torch.zeros(M.shape[0], dtype=torch.float64)
    idx = present.nonzero().flatten()
    if len(idx):
        a[idx] = min_norm_weights(M[idx][:, idx])
    return a


def _rows(T: int, P: int, seed: int) -> torch.Tensor:
    return torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _duplicate(g):
    g[1] = g[0]  # a singular free-set system
    return g


def _origin_inside(g):
    g[2] = -g[0] - g[1]  # the origin is in the hull: the minimum is 0
    return g


def _common(g):
    return g + 3 * g[:1]  # a shared component: a large face, many iterations


CASES = {
    "random": (5, 12, None),
    "duplicate rows": (5, 12, _duplicate),
    "origin in the hull": (5, 12, _origin_inside),
    "a common direction": (6, 20, _common),
    "fewer parameters than tasks": (9, 4, None),  # 16-wide tile
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("absent", [False, True])
def test_the_device_solver_reaches_the_host_solvers_minimum(case, absent):
    T, P, shape = CASES[case]
    g = _rows(T, P, len(case))
    g = shape(g) if shape else g
    M = g @ g.T
    present = torch.ones(T, dtype=torch.bool)
    if absent:
        present[T - 1] = False
    info = torch.zeros(2, dtype=torch.int32)
    a = min_norm_weights_device(M.float(), present, info=info)
    ref = _host(M, present)
    assert info[1] == 1 and 0 < info[0] <= 20 * T + 20  # the KKT conditions met, under the cap
    assert float(a.min()) >= 0 and float(a.sum()) == pytest.approx(1.0, abs=1e-6)
    if absent:
        assert a[T - 1] == 0
    scale = float(M.diagonal().max())
    assert _objective(a, M) <= _objective(ref, M) + 1e-7 * scale  # float32 Gram against float64
    grad = M @ a.double()  # and no vertex of the present tasks improves on it
    assert float(grad[present].min()) >= _objective(a, M) - 1e-6 * scale


@pytest.mark.parametrize("rows, expected", [
    ([[2.0, 0.0], [0.0, 1.0]], [0.2, 0.8]),  # closed form for two
    ([[1.0, 0.0], [3.0, 1.0]], [1.0, 0.0]),  # the smaller gradient dominates
    ([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [0.5, 0.5, 0.0]),
])
def test_the_device_solver_hits_known_points(rows, expected):
    g = torch.tensor(rows)
    a = min_norm_weights_device(g @ g.T, torch.ones(len(rows), dtype=torch.bool))
    torch.testing.assert_close(a, torch.tensor(expected), atol=1e-6, rtol=0)


def test_dependent_gradients_converge_instead_of_cycling_to_the_cap():
    """More tasks than directions: the float32 Gram matrix is indefinite by about 1e-8 of its
    largest entry, and without the ridge on the diagonal the loop cycled to its cap (seed 4 did,
    and 13 of 200 seeds)."""
    for seed in range(16):
        g = torch.randn(4, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        M = g @ g.T
        info = torch.zeros(2, dtype=torch.int32)
        a = min_norm_weights_device(M.float(), torch.ones(4, dtype=torch.bool), info=info)
        assert info[1] == 1 and int(info[0]) <= 12, (seed, info.tolist())
        assert _objective(a, M) <= _objective(min_norm_weights(M), M) + 1e-6 * float(M.diagonal().max()), seed


def test_the_degenerate_cases():
    M = torch.tensor([[4.0, 1.0, 0.0], [1.0, 9.0, 0.0], [0.0, 0.0, 0.0]])
    none = torch.zeros(3, dtype=torch.bool)
    assert torch.equal(min_norm_weights_device(M, none), torch.zeros(3))  # no task present
    one = torch.tensor([False, True, False])
    assert torch.equal(min_norm_weights_device(M, one), torch.tensor([0.0, 1.0, 0.0]))
    # a zero gradient is the minimum itself
    torch.testing.assert_close(min_norm_weights_device(M, torch.ones(3, dtype=torch.bool)), torch.tensor([0.0, 0.0, 1.0]))
    zeros = torch.zeros(3, 3)  # every gradient zero: uniform over the present tasks
    torch.testing.assert_close(min_norm_weights_device(zeros, torch.tensor([True, False, True])),
                               torch.tensor([0.5, 0.0, 0.5]))


def test_the_iteration_cap_leaves_feasible_weights_and_says_so():
    g = _common(_rows(6, 20, 3))
    info = torch.zeros(2, dtype=torch.int32)
    a = min_norm_weights_device((g @ g.T).float(), torch.ones(6, dtype=torch.bool), info=info, max_iter=1)
    assert info.tolist() == [1, 0]
    assert float(a.min()) >= 0 and float(a.sum()) == pytest.approx(1.0, abs=1e-6)


def test_bad_arguments_are_named(monkeypatch):
    with pytest.raises(ValueError, match=r"square \(T, T\) gram.*\(3, 2\)"):
        min_norm_weights_device(torch.zeros(3, 2), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at most 64 tasks, got 65; set transfer.mgda.solver: host"):
        min_norm_weights_device(torch.zeros(65, 65), torch.ones(65, dtype=torch.bool))
    with pytest.raises(ValueError, match="mgda.solver device takes at most 64 tasks"):
        MGDA([f"t{i}" for i in range(65)], solver="device")
    with pytest.raises(ValueError, match="unknown mgda.solver 'gpu'; valid: auto, device, host"):
        MGDA(["a", "b"], solver="gpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU that cannot run the kernel
    with pytest.raises(RuntimeError, match="solver: device runs on CUDA .*TRITON_INTERPRET=1.*not on cpu"):
        MGDA(["a", "b"], solver="device").weights(torch.eye(2), torch.ones(2, dtype=torch.bool))
    assert MGDA(["a", "b"], solver="auto").on_device(torch.device("cpu")) is False  # auto: the host on a CPU


def test_the_config_key_is_checked():
    with pytest.raises(ConfigError, match=r"`transfer.mgda.solver`: 'gpu' is not allowed; allowed values: 'auto', "
                                          r"'device', 'host'"):
        load_train_config(ROOT / "configs/train/cpu_small.yaml", ["transfer.mgda.solver=gpu"])


# -------------------------------------------------------------------- through the trainer


def _trainer(extra=(), backend=None, log=None) -> Trainer:
    cfg = load_train_config(ROOT / "configs/train/cpu_small.yaml", [
        "transfer.strategy=mgda", "training.batch_size=128", "training.shared_expert_epochs=2",
        "training.early_stopping_patience=10", *extra])
    torch.manual_seed(0)
    trainer = Trainer(build_system(cfg, BATCH_SPECS, 5, [4, 4], 3), make_batch(544), make_batch(64, seed=1), cfg,
                      torch.device("cpu"), log=log or (lambda m: None))
    trainer.sync_free = True
    trainer.graph_backend = backend
    return trainer


def test_a_solver_that_fails_its_check_hands_over_to_the_host_and_to_eager_steps(monkeypatch):
    """A device solver that a Triton or driver bug breaks (here: one that writes uniform weights)
    is caught by the first-use check: the host solver takes over, the graphed run's steps run
    eagerly and say so, and the run trains exactly like one on the host solver."""
    torch.manual_seed(1)
    host = _trainer(["transfer.mgda.solver=host"])
    host.run_phase1()

    def uniform(gram, present, out, info, max_iter):
        out.copy_(present.float() / present.float().sum())
        info.copy_(torch.tensor([1, 1], dtype=torch.int32))

    monkeypatch.setattr(min_norm, "_solve", uniform)
    lines: list[str] = []
    torch.manual_seed(1)
    broken = _trainer(["transfer.mgda.solver=device"], EmulatedCudaGraphs(), lines.append)
    broken.run_phase1()
    assert min_norm.GUARD.failed() and "objective exceeds the host solver's" in min_norm.GUARD.reason()
    assert broken.step_graphs.captures == 0
    assert any("mgda's steps run eagerly (the device min-norm solver is off: its objective exceeds" in m
               for m in lines)
    for re, rb in zip(host.history, broken.history):
        assert rb.task_losses == pytest.approx(re.task_losses, rel=1e-6)
    a, b = host.system.state_dict(), broken.system.state_dict()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-7), k


def test_steps_at_the_iteration_cap_are_an_epoch_event(monkeypatch):
    real = min_norm._solve
    monkeypatch.setattr(min_norm, "_solve", lambda gram, present, out, info, max_iter: real(gram, present, out, info, 1))
    trainer = _trainer(["transfer.mgda.solver=device", "training.shared_expert_epochs=1"])
    trainer.run_phase1()
    capped = [e for e in trainer.events if e["event"] == "mgda_solver_capped"]
    assert len(capped) == 1 and 1 <= capped[0]["steps"] <= 5  # 5 steps in the epoch (4 full, 1 short)
    assert trainer.history[0].events == ["mgda_solver_capped"]
    assert int(trainer.system.transfer.capped_steps) == 0  # counted per epoch


def test_the_first_use_check_waits_for_a_step_that_exercises_the_solver():
    """Non-finite gradients, one present task or zero gradients compare nothing: the guard stays
    unchecked (and the host solver is not asked: it refuses non-finite input), until a step
    with two present tasks checks it."""
    s = MGDA(["a", "b", "c"], solver="device")
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    one = torch.tensor([True, False, False])
    for grads, present in ((torch.full((3, 2), float("nan")), torch.ones(3, dtype=torch.bool)),
                           (g, one), (torch.zeros(3, 2), torch.ones(3, dtype=torch.bool))):
        s.weights(grads, present)
        assert not min_norm.GUARD.checked
    torch.testing.assert_close(s.weights(g, torch.tensor([True, True, False])), torch.tensor([0.8, 0.2, 0.0]))
    assert min_norm.GUARD.checked and not min_norm.GUARD.failed() and min_norm.GUARD.kinds == {min_norm.tile(3)}


def test_steps_are_not_captured_before_the_solvers_first_use_check():
    """The check reads on the host: until it has run, MGDA's steps stay eager (a capture would
    fail on the read), silently; once it has, they are captured."""
    from ple_adatt.step_graphs import StepGraphs
    from ple_adatt.training import make_optimizer

    lines: list[str] = []
    trainer = _trainer(["transfer.mgda.solver=device"], EmulatedCudaGraphs(), lines.append)
    opt = make_optimizer(trainer.system, trainer.cfg, fused=True, capturable=True)
    graphs = StepGraphs(trainer, opt, trainer.make_scaler(), 128, trainer.graph_backend)
    assert not graphs.capturable() and lines == []
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [2.0, 2.0], [0.5, 1.0]])
    trainer.system.transfer.weights(g, torch.ones(5, dtype=torch.bool))  # the check runs
    assert graphs.capturable() and lines == []
