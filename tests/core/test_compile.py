"""training.compile: the compiled trunk, heads and losses train exactly like eager mode.

This caught a real bug: the multiclass loss's (k, K, B) permuted cross-entropy compiled to a
backward that put the gradients on permuted classes (torch 2.13, CPU inductor), while the
forward values matched. One cold compile takes about 45 s on the 2-core CI machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from corehelpers import BATCH_SPECS, make_batch

from ple_adatt.config import load_train_config
from ple_adatt.training import Trainer, build_system, make_optimizer

ROOT = Path(__file__).resolve().parents[2]
SPECS = BATCH_SPECS


def _three_adatt_steps(compiled: bool, device: str = "cpu", mode: str = "default",
                       gpu_layers: bool | None = None) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    overrides = ["transfer.grad_interval=1", "transfer.adatt.warmup_epochs=0", "transfer.adatt.freeze_epoch=3",
                 f"training.compile={'true' if compiled else 'false'}", f"training.compile_mode={mode}",
                 f"device={device}", "training.use_amp=false"]
    cfg = load_train_config(ROOT / "configs/train/cpu_small.yaml", overrides)
    torch.manual_seed(0)
    system = build_system(cfg, SPECS, 5, [4, 4], 3)
    system.model.tower_dropout.p = 0.0
    system.model.gpu_layers = gpu_layers
    trainer = Trainer(system, make_batch(384), make_batch(64, seed=1), cfg, torch.device(device), log=lambda m: None)
    opt, scaler = make_optimizer(system, cfg, fused=trainer.sync_free), trainer.make_scaler()
    totals = []
    for i in range(3):
        idx = torch.arange(i * 128, (i + 1) * 128, device=device)
        step = trainer.forward_losses(trainer.train_data.subset(idx), epoch=1, use_cluster_heads=False)
        trainer.backward(step, scaler)
        trainer.optimizer_step(opt, scaler)
        trainer.global_step += 1
        totals.append(float(step.total))
    return totals, system.transfer.affinity_computer.affinity_matrix.clone(), system.model.head.weight.detach().clone()


def test_compiled_training_matches_eager_on_losses_affinity_and_weights():
    eager, compiled = _three_adatt_steps(False), _three_adatt_steps(True)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5, abs=1e-6)
    assert float((compiled[1] - eager[1]).abs().max()) < 1e-5  # affinity from the per-task gradients
    assert float((compiled[2] - eager[2]).abs().max()) < 1e-5  # heads after three AdamW steps


def test_the_gpus_layers_compile_to_the_eager_training_without_tracing_the_kernels_checks(monkeypatch):
    """The GPU's layers (custom autograd functions, the biases left to the mixture, the towers'
    kernel path) under torch.compile on the CPU, against eager steps with the same layers. Under
    compile the fused kernels give way to the PyTorch forms, and their availability checks
    must not be traced at all (on CUDA a traced check is a graph break in the middle of the
    trunk): each is asked only outside compiled code."""
    from ple_adatt import mixture, relu_dgrad, towers

    asked = []
    for module in (mixture, towers, relu_dgrad):
        monkeypatch.setattr(module, "fused_available", lambda device: asked.append(torch.compiler.is_compiling()))
    eager, compiled = _three_adatt_steps(False, gpu_layers=True), _three_adatt_steps(True, gpu_layers=True)
    assert asked and not any(asked)  # asked in the eager run, never while compiling
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5, abs=1e-6)
    assert float((compiled[1] - eager[1]).abs().max()) < 1e-5
    assert float((compiled[2] - eager[2]).abs().max()) < 1e-5



@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])  # reduce-overhead: CUDA graphs
def test_compiled_training_matches_eager_on_cuda(mode):
    eager, compiled = _three_adatt_steps(False, "cuda"), _three_adatt_steps(True, "cuda", mode)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-3, abs=1e-4)  # TF32 on both sides
    assert float((compiled[1] - eager[1]).abs().max()) < 1e-3
    assert float((compiled[2] - eager[2]).abs().max()) < 1e-3


@pytest.mark.parametrize("use_cluster_heads", [False, True])
def test_the_compiled_parts_trace_as_one_graph_each(use_cluster_heads):
    """A graph break (a host read, data-dependent Python control flow) splits a compiled part
    and costs its fusion on the GPU without failing anything: dynamo's own report must show
    one graph and no break for the trunk, the heads and the losses (all five loss kinds)."""
    import torch._dynamo

    cfg = load_train_config(ROOT / "configs/train/cpu_small.yaml")
    torch.manual_seed(0)
    system = build_system(cfg, SPECS, 5, [4, 4], 3)
    model = system.model
    b = make_batch(64)
    gates, cgc, _ = model.trunk(b.x_num, b.x_cat)
    out = model.heads_forward(cgc, b.cluster, use_cluster_heads)
    parts = {
        "trunk": (model.trunk, (b.x_num, b.x_cat)),
        "heads": (model.heads_forward, (cgc, b.cluster, use_cluster_heads)),
        "losses": (system.criterion.forward, (out, b.y, model.target_loc, model.target_scale, model.item_embeddings)),
    }
    for name, (fn, args) in parts.items():
        torch._dynamo.reset()
        report = torch._dynamo.explain(fn)(*args)
        assert (report.graph_count, report.graph_break_count) == (1, 0), (name, report.break_reasons)
