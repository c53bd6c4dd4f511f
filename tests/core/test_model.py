"""The task-batched PLE-Cluster model: shapes, cluster heads, logit transfer, per-task gradients."""

from __future__ import annotations

import pytest
import torch
from corehelpers import make_batch, reset_guard

from ple_adatt.losses import MultiTaskLoss
from ple_adatt.model import (
    augment_input,
    build_model,
    grouped_linear,
    shared_input_linear,
    shared_input_relu_linear,
)


def build(specs, model_cfg, clusters=3):
    torch.manual_seed(0)
    return build_model(model_cfg, specs, num_numeric=5, cardinalities=[4, 4], num_clusters=clusters)


def test_forward_lays_tasks_along_one_batched_dimension(specs, model_cfg):
    model = build(specs, model_cfg)
    b = make_batch(32)
    out = model(b.x_num, b.x_cat, b.cluster)
    assert out.out.shape == (5, 32, 4)  # (T, B, widest output: retrieval dim 4 > 3 classes)
    assert out.gates.shape == (5, 32, 3 + 1)  # each task gates 3 shared experts + its own expert
    torch.testing.assert_close(out.gates.sum(-1), torch.ones(5, 32))
    assert out.cgc_out.shape == (5, 32, 8)
    # one parameter tensor per role, not one module per task
    assert model.tower.weight.shape == (5, 8, 8) and model.head.weight.shape == (5, 8, 4)


def test_cluster_heads_start_from_global_head_and_unknown_cluster_uses_global(specs, model_cfg):
    model = build(specs, model_cfg)
    torch.nn.init.normal_(model.head.weight)  # heads start near zero; make them distinguishable
    b = make_batch(40)
    glob = model(b.x_num, b.x_cat, b.cluster, use_cluster_heads=False).out
    model.init_cluster_heads()
    same = model(b.x_num, b.x_cat, b.cluster, use_cluster_heads=True).out
    torch.testing.assert_close(same, glob)  # copies of the global head give the same outputs
    with torch.no_grad():
        model.cluster_head_bias[1] += 5.0
    moved = model(b.x_num, b.x_cat, b.cluster, use_cluster_heads=True).out
    in_1 = b.cluster == 1
    unknown = b.cluster == 3
    assert in_1.any() and unknown.any()
    assert not torch.allclose(moved[:, in_1], glob[:, in_1])
    torch.testing.assert_close(moved[:, unknown], glob[:, unknown])


def test_logit_transfer_adds_source_output_to_destination(specs, model_cfg):
    model = build(specs, model_cfg)
    assert [(model.task_names[s], model.task_names[t]) for s, t in model.transfer_edges] == [("ctr", "cvr"), ("cvr", "ltv")]
    torch.nn.init.normal_(model.head.weight)
    b = make_batch(8)
    with_edges = model(b.x_num, b.x_cat).out
    model.transfer_edges = []
    without = model(b.x_num, b.x_cat).out
    torch.testing.assert_close(with_edges[0], without[0])  # ctr has no incoming edge
    expected_cvr = without[1, :, 0] + 0.5 * with_edges[0, :, 0]  # weight init 1/o_src = 1, bias 0
    torch.testing.assert_close(with_edges[1, :, 0], expected_cvr)


def test_logit_transfer_cycle_is_rejected(specs, model_cfg):
    import dataclasses

    cfg = dataclasses.replace(model_cfg, logit_transfer_edges=(("ctr", "cvr"), ("cvr", "ctr")))
    with pytest.raises(ValueError, match=r"has a cycle \(ctr -> cvr -> ctr\); logit transfer must be a DAG"):
        build(specs, cfg)


def test_logit_transfer_edges_apply_in_topological_order_whatever_order_they_are_given(specs, model_cfg):
    """ltv's input is cvr's logit after ctr's transfer into it: ctr -> cvr must run first."""
    import dataclasses

    model = build(specs, dataclasses.replace(model_cfg, logit_transfer_edges=(("cvr", "ltv"), ("ctr", "cvr"))))
    assert [(model.task_names[s], model.task_names[t]) for s, t in model.transfer_edges] == [("ctr", "cvr"), ("cvr", "ltv")]
    three = dataclasses.replace(model_cfg, logit_transfer_edges=(("cvr", "ltv"), ("ltv", "ctr"), ("ctr", "cvr")))
    with pytest.raises(ValueError, match=r"has a cycle \((\w+) -> (\w+) -> (\w+) -> \1\)"):
        build(specs, three)


@pytest.mark.parametrize("seed,absent", [(0, ()), (1, ()), (0, (4,)), (1, (1, 2))],
                         ids=["seed0", "seed1", "no-retrieval-label", "two-tasks-unlabelled"])
def test_batched_per_task_gradients_equal_the_autograd_loop(specs, model_cfg, loss_cfgs, seed, absent):
    """Also with tasks that have no label in the whole batch (the retrieval task among them):
    their rows are exactly zero, as in the loop, and the affinity stays finite."""
    from ple_adatt.transfer.adatt import TaskAffinityComputer

    model = build(specs, model_cfg)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # non-zero readouts, as after training
    crit = MultiTaskLoss(model.heads, loss_cfgs)
    b = make_batch(48, seed=seed)
    for t in absent:
        b.y[:, t] = float("nan")
    out = model(b.x_num, b.x_cat, b.cluster)
    lo = crit(out.out, b.y, model.target_loc, model.target_scale, model.item_embeddings)
    assert [i for i in range(5) if not bool(lo.present[i])] == list(absent)
    fast = model.shared_task_gradients(lo.weighted, lo.present, out, "batched")
    ref = model.shared_task_gradients(lo.weighted, lo.present, out, "loop")
    assert fast.shape == (5, sum(p.numel() for p in model.shared_parameters()))
    assert torch.isfinite(fast).all()
    for t in range(5):  # every labelled task has a gradient; only the unlabelled ones are zero
        assert (float(ref[t].abs().max()) == 0) == (t in absent), t
        assert (float(fast[t].abs().max()) == 0) == (t in absent), t
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-6)
    # the cosine (what adaTT consumes) agrees within 1e-3 as the GPU benchmark requires
    n1 = torch.nn.functional.normalize(fast, dim=1)
    n2 = torch.nn.functional.normalize(ref, dim=1)
    assert float((n1 @ n1.T - n2 @ n2.T).abs().max()) < 1e-3
    a_fast, a_ref = TaskAffinityComputer(model.task_names), TaskAffinityComputer(model.task_names)
    a_fast.update(fast)
    a_ref.update(ref)
    assert int(a_fast.update_count) == 1 and torch.isfinite(a_fast.affinity_matrix).all()
    torch.testing.assert_close(a_fast.affinity_matrix, a_ref.affinity_matrix, rtol=0, atol=1e-5)
    for t in absent:  # an absent task is unrelated to every task (itself included) this step
        assert float(a_fast.affinity_matrix[t].abs().max()) == 0 == float(a_fast.affinity_matrix[:, t].abs().max())
    # the graph is retained for the training backward
    lo.weighted.sum().backward()


def test_predict_returns_user_units(specs, model_cfg):
    model = build(specs, model_cfg)
    model.target_loc[3] = 10.0
    model.target_scale[3] = 3.0
    b = make_batch(16)
    p = model.predict(b.x_num, b.x_cat, b.cluster)
    assert ((p["ctr"] >= 0) & (p["ctr"] <= 1)).all()
    torch.testing.assert_close(p["kind"].sum(-1), torch.ones(16))
    raw = model(b.x_num, b.x_cat).out[3, :, 0]
    torch.testing.assert_close(p["ltv"], raw.detach() * 3.0 + 10.0)
    assert p["brand"].shape == (16, 4)


@pytest.mark.parametrize("width", [5, 7, 8, 100])
def test_augmented_input_puts_the_bias_inside_the_gemm_and_aligns_rows(width):
    """``augment_input`` appends a ones column and zeros up to a multiple of 8 columns; the
    layer on it equals addmm with the bias, and its bias gradient equals the batch sum."""
    torch.manual_seed(0)
    x = torch.randn(33, width)
    w = torch.randn(3, width, 4, requires_grad=True)
    b = torch.randn(3, 1, 4, requires_grad=True)
    xa = augment_input(x)
    assert xa.shape[1] % 8 == 0 and xa.shape[1] > width
    assert torch.equal(xa[:, :width], x) and torch.equal(xa[:, width], torch.ones(33))
    assert not xa[:, width + 1:].any()
    got = shared_input_linear(xa, w, b)
    ref = shared_input_linear(x, w, b)
    assert torch.allclose(got, ref, atol=1e-5)
    g = torch.randn_like(ref)
    gw, gb = torch.autograd.grad(got, (w, b), g)
    rw, rb = torch.autograd.grad(ref, (w, b), g)
    assert torch.allclose(gw, rw, atol=1e-4) and torch.allclose(gb, rb, atol=1e-4)
    # with the ReLU in the GEMM's epilogue: the same values and gradients as a ReLU after it
    x.requires_grad_(True)
    xa = augment_input(x)
    fused = shared_input_relu_linear(xa, w, b)
    plain = torch.relu(shared_input_linear(x, w, b))
    assert torch.allclose(fused, plain, atol=1e-5) and (plain == 0).any()
    for a, r in zip(torch.autograd.grad(fused, (x, w, b), g), torch.autograd.grad(plain, (x, w, b), g)):
        assert torch.allclose(a, r, atol=1e-4)


@pytest.mark.parametrize("amp", [False, True])
def test_grouped_linear_matches_baddbmm_and_keeps_the_input_gradient_layout(amp):
    """The input gradient comes back in the input's own layout (a transposed view of a wide
    hidden layer), so the ReLU backward below runs on one layout; values equal baddbmm's."""
    torch.manual_seed(1)
    wide = torch.randn(50, 3 * 6, requires_grad=True)
    w = torch.randn(3, 6, 4, requires_grad=True)
    b = torch.randn(3, 1, 4, requires_grad=True)
    seen = {}

    def keep(grad):
        seen["stride"] = grad.stride()

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        x = wide.view(50, 3, 6).transpose(0, 1)  # (G, B, i), strides (6, 18, 1)
        x.register_hook(keep)
        got = grouped_linear(x, w, b)
        ref = torch.baddbmm(b, x, w)
    assert got.dtype == ref.dtype
    tol = dict(atol=5e-2, rtol=2e-2) if amp else dict(atol=1e-5)
    assert torch.allclose(got.float(), ref.float(), **tol)
    g = torch.randn(got.shape)
    grads = torch.autograd.grad(got, (wide, w, b), g.to(got.dtype))
    assert seen["stride"] == x.stride()
    refs = torch.autograd.grad(ref, (wide, w, b), g.to(ref.dtype))
    for a, r in zip(grads, refs):
        assert a.dtype == r.dtype and torch.allclose(a.float(), r.float(), **tol)
    # an expanded input (stride 0: its gradient buffer cannot take that layout) still sums right
    one = torch.randn(1, 50, 6, requires_grad=True)
    got, = torch.autograd.grad(grouped_linear(one.expand(3, 50, 6), w, b), one, g)
    ref, = torch.autograd.grad(torch.baddbmm(b, one.expand(3, 50, 6), w), one, g)
    assert torch.allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize("amp,fold", [(False, True), (True, False), (True, True)])
def test_the_gpus_layers_compute_the_cpus_model(specs, model_cfg, loss_cfgs, amp, fold):
    """``gpu_layers`` (the augmented input, the ReLU in the GEMM's epilogue, the layout-keeping
    grouped layers, and with ``fold`` the experts' biases left to the mixture, which adds them
    in PyTorch here) run on the CPU: the same outputs, parameter gradients and per-task
    gradients (einsum path and the seed's loop) as the plain layers, on the same weights.

    In bf16 the folded biases round the experts' outputs twice (the GEMM's bf16 output, then
    the sum with the bias) where baddbmm rounds once: each tensor is then compared by its
    relative norm, 5e-2 (measured up to 2.5e-2, on the InfoNCE task at temperature 0.1; 2e-3
    without folding)."""
    _compare_gpu_layers_with_plain(specs, model_cfg, loss_cfgs, amp, fold)


@pytest.mark.parametrize("head", [True, False], ids=["tower+head", "tower"])
def test_the_gpus_layers_through_the_fused_kernels_compute_the_cpus_model(interpreter, monkeypatch, specs,
                                                                           model_cfg, loss_cfgs, head):
    """As above, through the Triton kernels (interpreted; float32: the interpreter's bf16 rounds
    by truncation): the mixture's, adding the experts' second-layer biases and returning their
    gradients, the towers' bias+ReLU with the heads (or without, ``fused_head`` off), and the
    experts' masked hidden-layer gradient."""
    from ple_adatt import mixture, relu_dgrad, towers

    seen = []
    reset_guard(monkeypatch, towers.HEAD_GUARD, checked=True)
    for module, name in ((mixture, "fused_mixture"), (towers, "fused_tower_layer"), (towers, "fused_tower_head"),
                         (relu_dgrad, "fused_masked_input_grad")):
        reset_guard(monkeypatch, module.GUARD, checked=True)  # no first-use check: compare directly
        monkeypatch.setattr(module, "fused_available", lambda device: True)
        fused = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, fused=fused, name=name: seen.append(
            (name, len(a) > 3 and a[3] is not None)) or fused(*a))
    _compare_gpu_layers_with_plain(specs, model_cfg, loss_cfgs, False, head=head)
    # the plain layers: the mixture kernels alone, the layers adding their biases; the GPU's: the
    # biases left to the mixture's kernels, the towers' kernel (with the heads), and in the
    # backwards (the loop's and the training's) the masked gradients of both experts' hidden layers
    towers_call = ("fused_tower_head", True) if head else ("fused_tower_layer", False)
    assert seen[:3] == [("fused_mixture", False), ("fused_mixture", True), towers_call]
    assert seen[3:] and {name for name, _ in seen[3:]} == {"fused_masked_input_grad"}


def _compare_gpu_layers_with_plain(specs, model_cfg, loss_cfgs, amp, fold=True, head=True):
    model = build(specs, model_cfg)
    model.mixture_biases = fold
    model.fused_head = head
    torch.nn.init.normal_(model.head.weight, std=0.5)
    crit = MultiTaskLoss(model.heads, loss_cfgs)
    b = make_batch(40, seed=3)
    found = {}
    for gpu in (False, True):
        model.gpu_layers = gpu
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(b.x_num, b.x_cat, b.cluster)
            lo = crit(out.out, b.y, model.target_loc, model.target_scale, model.item_embeddings)
        # the cache is read without autograd: detached, since the GPU's first layer leaves its
        # ReLU's mask to the grouped layer, and a gradient taken through the cache would miss it
        assert not any(t.requires_grad for t in out.shared_cache)
        per_task = {m: model.shared_task_gradients(lo.weighted, lo.present, out, m) for m in ("einsum", "loop")}
        lo.weighted.sum().backward()
        found[gpu] = (out.out.float(), per_task, {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None})
    model.gpu_layers = None
    (o0, t0, g0), (o1, t1, g1) = found[False], found[True]
    tol = dict(rtol=3e-2, atol=3e-3) if amp else dict(rtol=1e-4, atol=1e-5)

    def close(a, b, what):
        if amp and fold:
            rel = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
            assert rel < 5e-2, f"{what}: relative difference {rel:.3g}"
        else:
            torch.testing.assert_close(a, b, **tol, msg=what)

    close(o1, o0, "outputs")
    for m in t0:
        close(t1[m], t0[m], f"per-task gradients ({m})")
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        close(g1[n], g0[n], n)


def test_phase2_with_frozen_shared_experts_runs_the_gpus_layers_through_the_kernels(interpreter, monkeypatch, specs,
                                                                                      model_cfg, loss_cfgs):
    """Phase 2 freezes the shared experts: their biases, left to the mixture's kernels, then need
    no gradient. The per-task gradients (einsum, and the fused per-task kernel) still agree, and
    the task-side parameters train."""
    from ple_adatt import mixture, relu_dgrad, towers

    for guard in (mixture.GUARD, towers.GUARD, towers.HEAD_GUARD, relu_dgrad.GUARD):
        reset_guard(monkeypatch, guard)  # the real first-use checks run
    for module in (mixture, towers, relu_dgrad):
        monkeypatch.setattr(module, "fused_available", lambda device: True)
    model = build(specs, model_cfg)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    model.gpu_layers = True
    model.freeze_shared_experts(True)
    crit = MultiTaskLoss(model.heads, loss_cfgs)
    b = make_batch(37, seed=5)  # not a multiple of the kernels' 16-row blocks
    out = model(b.x_num, b.x_cat, b.cluster)
    lo = crit(out.out, b.y, model.target_loc, model.target_scale, model.item_embeddings)
    assert "FusedMixture" in type(out.cgc_out.grad_fn).__name__ and not mixture.failed() and not towers.failed()
    assert towers.HEAD_GUARD.checked and not towers.HEAD_GUARD.failed()  # the towers+heads kernel, checked
    einsum = model.shared_task_gradients(lo.weighted, lo.present, out, "einsum")
    fused = model.shared_task_gradients(lo.weighted, lo.present, out, "fused")
    assert float((fused - einsum).norm() / einsum.norm()) < 1e-4
    lo.weighted.sum().backward()
    assert relu_dgrad.GUARD.checked and not relu_dgrad.failed()  # the task experts' backward took the kernel
    assert all(p.grad is None for p in model.shared_experts.parameters())
    assert float(model.task_expert_out.bias.grad.abs().sum()) > 0 and float(model.tower.bias.grad.abs().sum()) > 0


@pytest.mark.parametrize("training,dropout,cluster_heads,fused", [
    (True, 0.0, False, True),    # Phase 1, no dropout: the towers' kernel with the heads
    (True, 0.2, False, False),   # dropout between the towers and the heads while training
    (False, 0.2, False, True),   # evaluation: dropout is the identity
    (True, 0.0, True, False),    # Phase 2's per-cluster heads read the hidden layer
])
def test_the_heads_join_the_towers_kernel_only_where_nothing_reads_the_hidden_layer(
        monkeypatch, specs, model_cfg, training, dropout, cluster_heads, fused):
    from ple_adatt import towers

    calls = []
    real = towers.tower_head
    monkeypatch.setattr(towers, "tower_head", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = build(specs, model_cfg)
    model.gpu_layers = True
    model.tower_dropout.p = dropout
    model.train(training)
    assert model.out_dim <= towers.MAX_FUSED_OUT
    b = make_batch(20, seed=6)
    model(b.x_num, b.x_cat, b.cluster, use_cluster_heads=cluster_heads)
    assert bool(calls) == fused
    model.fused_head = False  # the switch (bench run (i))
    model(b.x_num, b.x_cat, b.cluster, use_cluster_heads=cluster_heads)
    assert len(calls) == int(fused)
