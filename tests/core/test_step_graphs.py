"""Whole-step CUDA graphs (training.cuda_graph) without a GPU.

The replays here are emulated (tests/core/graph_emulator.py records the step's aten ops and
re-runs them on the captured tensors, as a CUDA graph does); tests/core/test_gpu.py runs the
same comparison with real CUDA graphs on a GPU. A graphed run must train exactly like the
eager run: same losses, same parameters, same affinity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo
from corehelpers import BATCH_SPECS, DeferredSideStream, make_batch
from graph_emulator import EmulatedCudaGraphs

from ple_adatt.config import ConfigError, load_train_config
from ple_adatt.step_graphs import StepGraphs
from ple_adatt.training import Trainer, build_system, make_optimizer
from ple_adatt.transfer.adatt import TaskAffinityComputer

ROOT = Path(__file__).resolve().parents[2]
CFG = ROOT / "configs/train/cpu_small.yaml"


def _trainer(strategy: str, graphs: EmulatedCudaGraphs | None, extra: list[str] = ()) -> Trainer:
    cfg = load_train_config(CFG, [f"transfer.strategy={strategy}", "transfer.grad_interval=2",
                                  "transfer.adatt.warmup_epochs=1", "transfer.adatt.freeze_epoch=3",
                                  "training.batch_size=128", "training.shared_expert_epochs=4",
                                  "training.cluster_finetune_epochs=2", "training.early_stopping_patience=10",
                                  *extra])
    torch.manual_seed(0)
    system = build_system(cfg, BATCH_SPECS, 5, [4, 4], 3)
    # 8 full batches and a last one of 32 rows per epoch
    trainer = Trainer(system, make_batch(1056), make_batch(64, seed=1), cfg, torch.device("cpu"), log=lambda m: None)
    trainer.sync_free = True  # the CUDA path: no host checks in the step
    trainer.graph_backend = graphs
    return trainer


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.system.state_dict().items()}


@pytest.mark.parametrize("strategy,extra", [
    ("adatt", []), ("adatt", ["transfer.measure_in_backward=false"]), ("equal", []), ("uncertainty", []),
    # the measurement launched from the backward's hook (on CUDA: on a second stream)
    ("adatt", ["transfer.measure_stream=true"]),
    # dropout draws from the generator inside the graph; two parameter groups in the fused AdamW
    ("adatt", ["model.tower_dropout=0.2", "training.expert_lr={expert_0: {lr: 0.01}}"]),
    # gradient surgery replaces the shared experts' gradient inside the graph; the random
    # orders come from a draw counter on the device
    ("pcgrad", []), ("mocograd", []), ("gradnorm", []),
    # MGDA's min-norm weights solved on the device (one Triton program; two epochs: the
    # interpreter here takes about 0.1 s a solve)
    ("mgda", ["transfer.mgda.solver=device", "training.shared_expert_epochs=2"]),
])
def test_emulated_graph_replays_train_exactly_like_eager_steps(strategy, extra):
    torch.manual_seed(1)
    eager = _trainer(strategy, None, extra)
    eager.run_phase1()
    backend = EmulatedCudaGraphs()
    torch.manual_seed(1)
    graphed = _trainer(strategy, backend, extra)
    if graphed.measure_side is not None:  # the eager run measures in the hook; this one at the join
        graphed.measure_side = DeferredSideStream()
    graphed.run_phase1()
    assert graphed.measure_side is None or graphed.measure_side.launches > 0
    # both kinds of step (measuring, plain) captured in each epoch (4 but for MGDA); the
    # gradient methods measure every step
    kinds = 1 if getattr(graphed.system.transfer, "needs_gradients_every_step", False) else 2
    epochs = graphed.cfg.training.shared_expert_epochs
    assert len(backend.captured) == graphed.step_graphs.captures == epochs * kinds
    assert [r.transfer_phase for r in graphed.history] == [r.transfer_phase for r in eager.history]
    for re, rg in zip(eager.history, graphed.history):
        assert rg.task_losses == pytest.approx(re.task_losses, rel=1e-5, abs=1e-6)
        assert rg.val["val_loss"] == pytest.approx(re.val["val_loss"], rel=1e-5)
    a, b = _state(eager), _state(graphed)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6), k
    assert not torch.equal(graphed.system.transfer.affinity_computer.affinity_matrix, torch.eye(5))


def test_emulated_graph_replays_phase2_fine_tuning_like_eager():
    runs = []
    for backend in (None, EmulatedCudaGraphs()):
        torch.manual_seed(1)
        t = _trainer("adatt", backend, ["training.shared_expert_epochs=1"])
        t.run_phase1()
        t.run_phase2()
        runs.append(t)
    assert len(runs[1].graph_backend.captured) >= 3  # phase 1 (measuring, plain), phase 2 (plain)
    a, b = _state(runs[0]), _state(runs[1])
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6), k


def test_the_emulation_catches_state_that_a_step_rebinds(monkeypatch):
    """The negative control: an affinity update that rebinds its buffer instead of writing
    into it trains fine eagerly, and goes stale under graph replay."""

    def rebinding_update(self, grad_matrix):
        with torch.no_grad():
            g = grad_matrix.float()
            n = g / g.norm(dim=1, keepdim=True).clamp(min=1e-8)
            cos = n @ n.t()
            self.affinity_matrix = torch.where(self.update_count > 0, 0.9 * self.affinity_matrix + 0.1 * cos, cos)
            self.update_count += 1  # in place: the count moves, the matrix is read from its old storage
            return cos

    monkeypatch.setattr(TaskAffinityComputer, "update", rebinding_update)
    finals = []
    for backend in (None, EmulatedCudaGraphs()):
        torch.manual_seed(1)
        t = _trainer("adatt", backend)
        t.run_phase1()
        finals.append(t.system.transfer.affinity_computer.affinity_matrix.clone())
    assert not torch.allclose(finals[0], finals[1], atol=1e-4)


def test_a_host_read_inside_a_captured_step_fails_the_capture(monkeypatch):
    trainer = _trainer("adatt", EmulatedCudaGraphs())
    cfg = trainer.cfg
    opt = make_optimizer(trainer.system, cfg, fused=True, capturable=True)
    graphs = StepGraphs(trainer, opt, trainer.make_scaler(), 128, trainer.graph_backend, warmup_steps=1)
    idx = torch.arange(128)
    graphs.step(idx, 1, False, False)  # warm-up: eager
    original = Trainer.optimizer_step

    def reading_step(self, opt, scaler):
        original(self, opt, scaler)
        float(next(self.system.parameters()).sum())  # a host read that a graph cannot replay

    monkeypatch.setattr(Trainer, "optimizer_step", reading_step)
    with pytest.raises(RuntimeError, match="capturing the plain training step failed .*reads a tensor back to the host"
                                          ".*training.cuda_graph: false"):
        graphs.step(idx, 1, False, False)


def test_step_graphs_take_full_batches_only():
    trainer = _trainer("adatt", EmulatedCudaGraphs())
    opt = make_optimizer(trainer.system, trainer.cfg, fused=True, capturable=True)
    graphs = StepGraphs(trainer, opt, trainer.make_scaler(), 128, trainer.graph_backend)
    with pytest.raises(ValueError, match="batches of 128 rows, got 32"):
        graphs.step(torch.arange(32), 0, False, True)


def test_cuda_graph_on_a_cpu_device_runs_eagerly_and_says_so():
    cfg = load_train_config(CFG, ["training.cuda_graph=true", "training.shared_expert_epochs=1",
                                  "training.batch_size=128"])
    torch.manual_seed(0)
    lines: list[str] = []
    trainer = Trainer(build_system(cfg, BATCH_SPECS, 5, [4, 4], 3), make_batch(256), make_batch(64, seed=1), cfg,
                      torch.device("cpu"), log=lines.append)
    assert trainer.graph_backend is None
    assert any("training.cuda_graph needs CUDA" in line for line in lines)
    trainer.run_phase1()
    assert len(trainer.history) == 1


@pytest.mark.parametrize("override,message", [
    ("training.gradient_accumulation_steps=2", "gradient_accumulation_steps: 1"),
    ("transfer.strategy=mgda,transfer.mgda.solver=host", "mgda.solver: host"),
    ("transfer.grad_method=loop", "grad_method: loop"),
])
def test_cuda_graph_configs_that_cannot_replay_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_train_config(CFG, ["training.cuda_graph=true", *override.split(",")])
    assert "training.cuda_graph" in str(e.value) and "cpu_small.yaml" in str(e.value)


def test_cuda_graph_with_compiles_own_graphs_is_rejected():
    with pytest.raises(ConfigError, match="captures CUDA graphs of its own"):
        load_train_config(CFG, ["training.cuda_graph=true", "training.compile=true",
                                "training.compile_mode=reduce-overhead"])


def test_emulated_graph_replays_of_compiled_parts_train_like_eager_steps():
    """training.compile with training.cuda_graph: dynamo and AOTAutograd (the aot_eager
    backend runs the compiled graphs' aten ops, so the emulation records them; inductor's
    generated kernels would bypass it) inside replayed steps, against plain eager training."""
    runs = []
    for backend in (None, EmulatedCudaGraphs()):
        torch.manual_seed(1)
        t = _trainer("adatt", backend)
        if backend is not None:
            torch._dynamo.reset()
            t.system.model.compile_parts(backend="aot_eager")
            t.system.criterion.compile(backend="aot_eager")
        t.run_phase1()
        runs.append(t)
    assert runs[1].step_graphs.captures == 8
    assert runs[1].system.model._trunk_fn is not None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3  # trunk, heads, losses compiled
    torch._dynamo.reset()  # no compiled code cached for later tests
    a, b = _state(runs[0]), _state(runs[1])
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6), k
