"""GPU variants of the core checks (skipped without CUDA): bf16 autocast, device placement."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from corehelpers import BATCH_SPECS, forward_with_distinct_heads, make_batch, reset_guard

from ple_adatt.config import load_train_config
from ple_adatt.losses import MultiTaskLoss
from ple_adatt.training import Trainer, build_system

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
SPECS = BATCH_SPECS


def _cuda_trainer(overrides: list[str], train_rows: int, val_rows: int, seed: int = 0) -> Trainer:
    """The cpu_small system on BATCH_SPECS, trained on CUDA (overrides on top of device=cuda)."""
    cfg = load_train_config(ROOT / "configs/train/cpu_small.yaml", ["device=cuda", *overrides])
    torch.manual_seed(seed)
    system = build_system(cfg, SPECS, 5, [4, 4], 3)
    return Trainer(system, make_batch(train_rows), make_batch(val_rows, seed=1), cfg, torch.device("cuda"),
                   log=lambda m: None)


def test_batched_task_gradients_match_the_loop_under_bf16_autocast():
    system, out, lo = forward_with_distinct_heads(256, "cuda", amp=True)
    assert isinstance(system.criterion, MultiTaskLoss)
    fast = system.model.shared_task_gradients(lo.weighted, lo.present, out, "batched")
    ref = system.model.shared_task_gradients(lo.weighted, lo.present, out, "loop")
    n1, n2 = (torch.nn.functional.normalize(g, dim=1) for g in (fast, ref))
    # issue 8's 1e-3, in bf16 too: the half path measured 1.2e-5 at this shape in float16 on the CPU
    # (tests/core/test_kernels_half.py); bf16 rounds 8x coarser
    assert float((n1 @ n1.T - n2 @ n2.T).abs().max()) < 1e-3


def test_training_runs_on_cuda_with_amp_and_data_on_the_device():
    trainer = _cuda_trainer(["training.use_amp=true", "training.shared_expert_epochs=2",
                             "transfer.adatt.warmup_epochs=0", "transfer.adatt.freeze_epoch=1",
                             "training.batch_size=64"], 512, 128)
    system = trainer.system
    assert trainer.train_data.y.is_cuda
    trainer.run_phase1()
    assert trainer.history[-1].val["val_loss"] < trainer.history[0].val["val_loss"] * 1.5
    assert all(torch.isfinite(p).all() for p in system.parameters())


@pytest.mark.parametrize("variant", ["fused", "split", "split_bits"])
@pytest.mark.parametrize("layout", ["hrows", "brows"])
@pytest.mark.parametrize("amp", [False, True])
def test_fused_kernel_matches_the_loop_on_cuda(amp, layout, variant, monkeypatch):
    from ple_adatt import kernels

    monkeypatch.setattr(kernels, "DEFAULT_LAYOUTS", (layout,))  # each tile layout compiled on its own
    monkeypatch.setattr(kernels, "DEFAULT_VARIANT", variant)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # an fp32 reference, not TF32
    system, out, lo = forward_with_distinct_heads(1000, "cuda", amp=amp)
    grads = {m: system.model.shared_task_gradients(lo.weighted, lo.present, out, m) for m in ("fused", "einsum", "loop")}
    cos = {m: torch.nn.functional.normalize(g, dim=1) @ torch.nn.functional.normalize(g, dim=1).T
           for m, g in grads.items()}
    tol = 1e-3  # issue 8's target, bf16 included (the loop runs under the same autocast)
    assert float((cos["fused"] - cos["loop"]).abs().max()) < tol
    assert float((cos["fused"] - cos["einsum"]).abs().max()) < tol
    if not amp:  # exact float32 products in the kernel
        rel = (grads["fused"] - grads["loop"]).norm() / grads["loop"].norm()
        assert float(rel) < 1e-4


@pytest.mark.parametrize("biases", [False, True], ids=["plain", "with-biases"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cgc_mixture_matches_pytorch_on_cuda(dtype, biases):
    """The compiled mixture kernels (ple_adatt.mixture) at an odd batch, forward and gradients,
    with and without the experts' biases; tests/core/test_mixture.py checks the same program
    under the interpreter on the CPU."""
    from ple_adatt import mixture

    assert mixture.fused_available(torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    T, B, D, E, ET = 16, 4099, 128, 4, 2
    gates = torch.softmax(torch.randn(T, B, E + ET, device="cuda", generator=g), -1).requires_grad_()
    shared = torch.randn(E, B, D, device="cuda", generator=g).to(dtype).requires_grad_()
    task = torch.randn(T, ET, B, D, device="cuda", generator=g).to(dtype).requires_grad_()
    ins = [gates, shared, task]
    if biases:  # float32, as the parameters are under autocast
        ins += [torch.randn(E, 1, D, device="cuda", generator=g).requires_grad_(),
                torch.randn(T, ET, 1, D, device="cuda", generator=g).requires_grad_()]
    grad = torch.randn(T, B, D, device="cuda", generator=g).to(dtype)
    results = []
    for fn in (mixture.fused_mixture, mixture.reference_mixture):
        out = fn(*ins)
        results.append((out, *torch.autograd.grad(out, ins, grad)))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        if biases and a.shape[-2] == 1:  # a bias gradient: a sum over 4099 rows (float32 vs bf16 terms)
            assert float((a - b).abs().max()) <= tol * float(b.abs().max())
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * 4)


def _fresh_guards(monkeypatch):
    """Every kernel guard as a new process finds it (on, unchecked): an earlier test's check
    must not decide this one's."""
    from ple_adatt import kernels, mixture, relu_dgrad, towers

    guards = [kernels.GUARD, mixture.GUARD, towers.GUARD, towers.HEAD_GUARD, relu_dgrad.GUARD]
    for guard in guards:
        reset_guard(monkeypatch, guard)
    return guards


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_tower_layer_matches_pytorch_on_cuda(dtype, monkeypatch):
    """The compiled bias+ReLU kernels of the towers (ple_adatt.towers) at an odd batch and the
    seed's widths, forward and gradients, under autocast for bf16 as the model runs them, against
    the PyTorch form of the same rounding (tightly), against baddbmm (the fallback: the outputs
    within bf16's rounding, the ReLU masks apart only near zero), and the first-use check passes;
    tests/core/test_towers.py checks the same program under the interpreter on the CPU."""
    from ple_adatt import towers

    _fresh_guards(monkeypatch)
    assert towers.fused_available(torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    T, B, d, h = 16, 4099, 128, 256
    args = (torch.randn(T, B, d, device="cuda", generator=g).requires_grad_(),
            (torch.randn(T, d, h, device="cuda", generator=g) / d ** 0.5).requires_grad_(),
            torch.randn(T, 1, h, device="cuda", generator=g).requires_grad_())
    results = []
    for fn in (towers.fused_tower_layer, towers.rounded_reference_tower_layer, towers.reference_tower_layer):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = fn(*args)
        grad = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
        results.append((out, *torch.autograd.grad(out, args, grad.to(out.dtype))))
    fused, rounded, baddbmm = results
    # the same rounding: equal up to the order of the bias gradient's sums
    for a, b in zip(fused, rounded, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert float((a.float() - b.float()).abs().max()) <= 1e-4 * float(b.float().abs().max())
    # baddbmm adds the bias before rounding: the outputs agree to bf16's rounding, and the masks
    # differ only where a value near zero rounds to the other side
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert float((fused[0].float() - baddbmm[0].float()).abs().max()) <= tol * float(baddbmm[0].float().abs().max())
    flipped = float(((fused[0] > 0) != (baddbmm[0] > 0)).float().mean())
    print(f"ReLU masks apart from baddbmm's ({dtype}): {flipped:.2e} of the values")
    assert flipped < (1e-5 if dtype == torch.float32 else 1e-2)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        towers.tower_layer(*args)  # the first-use check, as the model calls it
    assert towers.GUARD.checked and not towers.failed(), towers.GUARD.reason()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_tower_head_matches_pytorch_on_cuda(dtype, monkeypatch):
    """The compiled tower+head kernels at the seed's widths (one output per task) and an odd
    batch, under autocast for bf16: against the form of the same rounding (forward and every
    gradient), and the first-use check passes as the model calls it."""
    from ple_adatt import towers

    _fresh_guards(monkeypatch)
    g = torch.Generator(device="cuda").manual_seed(0)
    T, B, d, h, n_out = 16, 4099, 128, 256, 1
    args = (torch.randn(T, B, d, device="cuda", generator=g).requires_grad_(),
            (torch.randn(T, d, h, device="cuda", generator=g) / d ** 0.5).requires_grad_(),
            torch.randn(T, 1, h, device="cuda", generator=g).requires_grad_(),
            (torch.randn(T, h, n_out, device="cuda", generator=g) / h ** 0.5).requires_grad_(),
            torch.randn(T, 1, n_out, device="cuda", generator=g).requires_grad_())
    results = []
    for fn in (towers.fused_tower_head, towers.rounded_reference_tower_head):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = fn(*args)
        grad = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
        results.append((out, *torch.autograd.grad(out, args, grad.to(out.dtype))))
    # the kernel's float32 sums against cuBLAS's (TF32 off here): the output rounds once either way
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for a, b in zip(*results, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert float((a.float() - b.float()).abs().max()) <= tol * float(b.float().abs().max())
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        towers.tower_head(*args)
    assert towers.HEAD_GUARD.checked and not towers.HEAD_GUARD.failed(), towers.HEAD_GUARD.reason()


def test_every_kernel_passes_its_first_use_check_in_bf16_training(monkeypatch):
    """A training step with the GPU's layers under bf16 autocast, adaTT measuring: every fused
    kernel (per-task gradients, mixture, towers with the heads, then without, masked gradient)
    runs its first-use check against PyTorch and stays on. A check that fails here would quietly
    train on the slower PyTorch forms (the ninth session's tower kernel did on an H100, at 0.135
    of the largest value)."""
    from ple_adatt import towers

    guards = _fresh_guards(monkeypatch)
    # retrieval_dim 4: the widest head (the multiclass task's 3) fits the tower+head kernel
    trainer = _cuda_trainer(["training.use_amp=true", "transfer.grad_interval=1", "transfer.grad_method=batched",
                             "transfer.adatt.warmup_epochs=0", "transfer.adatt.freeze_epoch=5",
                             "model.retrieval_dim=4"], 512, 64)
    assert trainer.system.model.out_dim <= towers.MAX_FUSED_OUT
    from ple_adatt.training import make_optimizer

    opt, scaler = make_optimizer(trainer.system, trainer.cfg, fused=True), trainer.make_scaler()
    for i in range(3):
        trainer.system.model.fused_head = i < 2  # the last step: the towers' kernel and a GEMM for the heads
        idx = torch.arange(i * 128, (i + 1) * 128, device="cuda")
        trainer.backward(trainer.forward_losses(trainer.train_data.subset(idx), epoch=1, use_cluster_heads=False),
                         scaler)
        trainer.optimizer_step(opt, scaler)
        trainer.global_step += 1
    assert trainer.system.model._gpu_layers(torch.empty(0, device="cuda"))
    report = {g.what: (g.checked, g.reason() if g.failed() else "on") for g in guards}
    assert all(checked and state == "on" for checked, state in report.values()), report


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_masked_input_grad_matches_pytorch_on_cuda(dtype):
    """The compiled masked input-gradient kernel (ple_adatt.relu_dgrad) at the seed's task
    experts' widths and an odd batch, in the hidden layer's (B, G*h) layout, against cuBLAS and
    a threshold pass; tests/core/test_relu_dgrad.py checks the same program interpreted."""
    from ple_adatt import relu_dgrad

    assert relu_dgrad.fused_available(torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    G, B, i, o = 32, 4099, 256, 128
    grad = torch.randn(G, B, o, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(G, i, o, device="cuda", generator=g) / o ** 0.5).to(dtype)
    x = torch.randn(B, G * i, device="cuda", generator=g).clamp_min(0).to(dtype).view(B, G, i).transpose(0, 1)
    fused = relu_dgrad.fused_masked_input_grad(grad, weight, x)
    ref = relu_dgrad.reference_masked_input_grad(grad, weight, x)
    assert fused.dtype == ref.dtype and fused.stride() == x.stride()
    assert bool(((fused == 0) == (x == 0)).all())  # the mask exactly
    tol = 1e-3 if dtype == torch.float32 else 1e-2  # tf32 products in float32 (the trainer allows them)
    assert float((fused.float() - ref.float()).abs().max()) <= tol * float(ref.float().abs().max())


def test_compiled_training_step_matches_eager():
    cfg = load_train_config(ROOT / "configs/train/cpu_small.yaml", ["device=cuda", "training.use_amp=false"])
    losses = []
    for compiled in (False, True):
        torch.manual_seed(0)
        system = build_system(cfg, SPECS, 5, [4, 4], 3)
        system.model.tower_dropout.p = 0.0
        if compiled:
            system.model.compile_parts()
            system.criterion.compile()
        system = system.cuda()
        b = make_batch(512).to("cuda")
        out = system.model(b.x_num, b.x_cat, b.cluster)
        lo = system.losses(out.out, b.y)
        lo.weighted.sum().backward()
        losses.append((lo.weighted.detach(), next(iter(system.model.shared_experts.parameters())).grad))
    assert torch.allclose(losses[0][0], losses[1][0], rtol=1e-3, atol=1e-5)
    assert torch.allclose(losses[0][1], losses[1][1], rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("strategy", ["adatt", "adatt+measure_stream", "equal", "pcgrad", "mocograd", "gradnorm",
                                      "mgda"])
def test_training_steps_never_wait_for_the_device(strategy):
    """The hot loop's promise: no device-to-host synchronisation per step (MGDA with its device
    solver, the default on CUDA, too). Warm-up steps first (Triton's autotuning times its configs;
    MGDA's solver is checked against the host solver once)."""
    strategy, _, stream = strategy.partition("+")
    trainer = _cuda_trainer(["training.use_amp=true", f"transfer.strategy={strategy}", "transfer.grad_interval=1",
                             "transfer.adatt.warmup_epochs=0", "transfer.adatt.freeze_epoch=5",
                             f"transfer.measure_stream={'true' if stream else 'false'}"], 512, 64)
    system, cfg = trainer.system, trainer.cfg
    from ple_adatt.training import make_optimizer

    opt, scaler = make_optimizer(system, cfg, fused=True), trainer.make_scaler()

    def step(i: int) -> None:
        idx = torch.arange(i * 128, (i + 1) * 128, device="cuda") % 512
        trainer.backward(trainer.forward_losses(trainer.train_data.subset(idx), epoch=1, use_cluster_heads=False),
                         scaler)
        trainer.optimizer_step(opt, scaler)
        trainer.global_step += 1

    for i in range(3):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(3, 6):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in system.parameters())


@pytest.mark.parametrize("strategy", ["adatt", "pcgrad", "mgda"])
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_graph_steps_train_like_eager_steps(amp, strategy):
    """Real CUDA graphs (training.cuda_graph) against eager steps; test_step_graphs.py runs the
    same comparison on the CPU with emulated replays."""
    overrides = [f"transfer.strategy={strategy}", f"training.use_amp={'true' if amp else 'false'}",
                 "training.batch_size=128", "training.shared_expert_epochs=3", "transfer.adatt.warmup_epochs=1",
                 "transfer.adatt.freeze_epoch=2", "training.early_stopping_patience=10"]
    finals, trainers = [], []
    for graphed in (False, True):
        trainer = _cuda_trainer(overrides, 1056, 128, seed=1)
        system = trainer.system
        if graphed:
            from ple_adatt.step_graphs import CudaGraphBackend

            trainer.graph_backend = CudaGraphBackend()
        trainer.run_phase1()
        trainers.append(trainer)
        finals.append({k: v.detach().float().clone() for k, v in system.state_dict().items()})
    # measuring and plain steps (PCGrad and MGDA measure every step), 3 epochs
    assert trainers[1].step_graphs.captures == (6 if strategy == "adatt" else 3)
    tol = dict(rtol=2e-2, atol=2e-3) if amp else dict(rtol=1e-3, atol=1e-4)
    for k in finals[0]:
        assert torch.allclose(finals[0][k], finals[1][k], **tol), k
    for re, rg in zip(*(t.history for t in trainers)):
        assert rg.val["val_loss"] == pytest.approx(re.val["val_loss"], rel=tol["rtol"])


@pytest.mark.parametrize("with_compile", [False, True])
def test_production_step_settings_train_like_eager_steps(with_compile):
    """configs/train/production.yaml's step settings (whole-step CUDA graphs, bf16 autocast;
    also over torch.compile, its optional extra) against plain eager steps."""
    prod = load_train_config(ROOT / "configs/train/production.yaml").training
    assert prod.cuda_graph and not prod.compile and prod.compile_mode == "default" and prod.use_amp
    base = ["training.use_amp=true", "training.batch_size=128", "training.shared_expert_epochs=2",
            "transfer.adatt.warmup_epochs=1", "transfer.adatt.freeze_epoch=2"]
    finals, trainers = [], []
    for fast in (False, True):
        flags = ["training.cuda_graph=true", f"training.compile={'true' if with_compile else 'false'}"] if fast else []
        trainer = _cuda_trainer(base + flags, 1024, 128, seed=2)
        trainer.run_phase1()
        trainers.append(trainer)
        finals.append({k: v.detach().float().clone() for k, v in trainer.system.state_dict().items()})
    assert trainers[0].step_graphs is None and trainers[1].step_graphs.captures == 4  # 2 epochs x 2 kinds
    # compiled kernels round bf16 differently, and AdamW turns a gradient near zero into a full
    # step either way, so single weights drift apart: compare each tensor as a whole (measured
    # on an H100 with compile: 0.43 % at most)
    drift = {k: float((finals[1][k] - finals[0][k]).norm() / finals[0][k].norm().clamp_min(1e-12))
             for k in finals[0] if finals[0][k].is_floating_point() and finals[0][k].norm() > 0}
    assert max(drift.values()) < 2e-2, drift
    for re, rg in zip(*(t.history for t in trainers)):
        assert rg.val["val_loss"] == pytest.approx(re.val["val_loss"], rel=1e-2)


def test_gram_matrices_of_task_gradients_ignore_tf32():
    """The trainer turns TF32 on; the Gram matrix of the task gradients must stay float32-exact.
    1 + 2^-12 is below TF32's 10 mantissa bits: under TF32 its square would read as 1."""
    from ple_adatt.transfer.linalg import gram_matrix

    torch.backends.cuda.matmul.allow_tf32 = True
    g = torch.full((16, 100_000), 1.0 + 2.0 ** -12, device="cuda")
    got = gram_matrix(g)
    exact = 100_000 * (1.0 + 2.0 ** -12) ** 2
    assert torch.backends.cuda.matmul.allow_tf32  # restored
    assert float((got.double() / exact - 1).abs().max()) < 1e-5
    # the sliced product (GRAM_SLICE columns per batch, then a tail) against float64
    for p in (100_003, 3 * 16384, 16384 - 1):
        g = torch.randn(16, p, device="cuda")
        ref = g.double() @ g.double().t()
        assert float(((gram_matrix(g).double() - ref).abs() / ref.abs().max()).max()) < 1e-6, p


# a GPU sleep before the side stream's work: about 60 ms at an H100's clock, far longer than the
# rest of a step of this small model, so the work reads after the optimizer step has updated the
# weights in place and the main stream has freed and reused memory: a missing copy or a freed
# input then changes the numbers instead of racing unseen
SIDE_SLEEP_CYCLES = 100_000_000


def _slow_side(trainer: Trainer, pass_copy: bool = True) -> list[bool]:
    """Delay ``trainer``'s side-stream measurement; returns, per launch, whether it was captured.
    ``pass_copy=False`` drops the weights' copy (the negative control: the race it prevents)."""
    real, captured = trainer._observe, []

    def observe(d_cgc, out, w2=None):
        captured.append(torch.cuda.is_current_stream_capturing())
        torch.cuda._sleep(SIDE_SLEEP_CYCLES)
        real(d_cgc, out, w2 if pass_copy else None)

    trainer._observe = observe
    return captured


STREAM_RUN = ["training.use_amp=true", "training.batch_size=128", "training.shared_expert_epochs=3",
              "transfer.adatt.warmup_epochs=1", "transfer.adatt.freeze_epoch=2", "transfer.grad_interval=1",
              "training.early_stopping_patience=10"]


def _stream_run(graphed: bool, stream: bool, pass_copy: bool = True) -> tuple[Trainer, list[bool]]:
    trainer = _cuda_trainer([*STREAM_RUN, f"training.cuda_graph={'true' if graphed else 'false'}",
                             f"transfer.measure_stream={'true' if stream else 'false'}"], 1056, 128, seed=1)
    captured = _slow_side(trainer, pass_copy) if stream else []
    trainer.run_phase1()
    return trainer, captured


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "cuda_graph"])
def test_the_measurement_on_a_second_stream_trains_like_one_stream(graphed):
    """transfer.measure_stream on a real second stream, eagerly and inside whole-step CUDA graphs
    (a forked stream must join the capture), in bf16 with the fused kernel, its work delayed past
    the rest of the step: the affinity and the weights as on one stream."""
    (one, _), (two, captured) = _stream_run(graphed, False), _stream_run(graphed, True)
    assert one.measure_side is None and two.measure_side.stream is not None and not two.measure_side.pending
    # the longer branch first: the side stream above the training's (lower is higher)
    assert two.measure_side.stream.priority < torch.cuda.default_stream().priority
    if graphed:  # epoch 1: 3 warm-ups, the capture, the last batch (32 rows, eager); then 1 + 1 + 1
        assert two.step_graphs.captures == 3 and len(captured) == 11 and sum(captured) == 3
    else:  # every step: 8 full batches and a last one of 32 rows, 3 epochs
        assert len(captured) == 27 and not any(captured)
    a1, a2 = (t.system.transfer.affinity_computer.affinity_matrix for t in (one, two))
    assert not torch.allclose(a2, torch.eye(5, device="cuda"), atol=1e-3)
    torch.testing.assert_close(a2, a1, rtol=0, atol=1e-5)
    for (k, p), q in zip(one.system.state_dict().items(), two.system.state_dict().values()):
        torch.testing.assert_close(q.float(), p.float(), rtol=1e-5, atol=1e-6, msg=k)


def test_the_delayed_side_stream_exposes_the_race_that_the_weights_copy_prevents():
    """The negative control of the test above: without the hook's copy, the delayed measurement
    reads the weights after the optimizer has updated them, and the affinity moves."""
    (one, _), (raced, _) = _stream_run(False, False), _stream_run(False, True, pass_copy=False)
    a1, a2 = (t.system.transfer.affinity_computer.affinity_matrix for t in (one, raced))
    assert float((a2 - a1).abs().max()) > 1e-5


def test_an_error_in_the_side_streams_work_still_joins_it():
    from ple_adatt.training import make_optimizer

    trainer = _cuda_trainer([*STREAM_RUN, "transfer.measure_stream=true"], 256, 64)

    def broken(*args, **kwargs):
        raise RuntimeError("the measurement broke")

    trainer._observe = broken
    opt, scaler = make_optimizer(trainer.system, trainer.cfg, fused=True), trainer.make_scaler()
    with pytest.raises(RuntimeError, match="the measurement broke"):
        trainer.train_step(trainer.train_data.subset(torch.arange(128, device="cuda")), 1, False, opt, scaler)
    assert trainer.measure_side.launches == 1 and not trainer.measure_side.pending


@pytest.mark.parametrize("T", [5, 16, 40])
def test_mgda_device_solver_compiled_reaches_the_host_solvers_minimum(T):
    """The compiled min-norm solver (a 16-, 16- and 64-wide tile) against the float64 host
    solver, on gradients with a shared component (a large face) and a duplicated task."""
    from ple_adatt.transfer.mgda import min_norm_weights
    from ple_adatt.transfer.min_norm import min_norm_weights_device

    gen = torch.Generator().manual_seed(T)
    g = torch.randn(T, 64, generator=gen, dtype=torch.float64)
    g = g + 2 * g[:1]
    g[1] = g[2]
    M = g @ g.T
    present = torch.ones(T, dtype=torch.bool)
    present[-1] = False
    info = torch.zeros(2, dtype=torch.int32, device="cuda")
    a = min_norm_weights_device(M.float().cuda(), present.cuda(), info=info).cpu().double()
    ref = torch.zeros(T, dtype=torch.float64)
    ref[:-1] = min_norm_weights(M[:-1, :-1])
    assert info[1].item() == 1 and a[-1] == 0 and float(a.min()) >= 0
    assert float(a.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(a @ M @ a) <= float(ref @ M @ ref) + 1e-7 * float(M.diagonal().max())
