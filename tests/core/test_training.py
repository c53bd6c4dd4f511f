"""Training on the CPU through both phases, on generated data with planted structure."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ple_adatt.checkpoint import load_checkpoint
from ple_adatt.config import load_data_config, load_train_config
from ple_adatt.data.dataset import load_split
from ple_adatt.data.synthetic import CONFLICT_PAIR, GROUPS, write_parquet
from ple_adatt.stages.common import StageError
from ple_adatt.stages.train_common import run_phase1, run_phase2

ROOT = Path(__file__).resolve().parents[2]
DATA_CFG = ROOT / "configs/data/synthetic.yaml"
TRAIN_CFG = ROOT / "configs/train/cpu_small.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    data = write_parquet(d / "syn.parquet", rows=16_000, seed=0)
    logs: list[str] = []
    m1 = run_phase1(data=data, data_config=DATA_CFG, config=TRAIN_CFG, out=d / "p1", log=logs.append)
    m2 = run_phase2(checkpoint=d / "p1", data=data, out=d / "p2", log=logs.append)
    return {"dir": d, "data": data, "m1": m1, "m2": m2, "logs": logs}


def test_losses_fall_in_both_phases(run):
    p1 = [h for h in run["m1"]["history"] if h["phase"] == "phase1"]
    assert len(p1) == 6
    first, last = sum(p1[0]["raw_losses"].values()), sum(p1[-1]["raw_losses"].values())
    assert last < 0.8 * first
    assert p1[-1]["val"]["val_loss"] < p1[0]["val"]["val_loss"]
    p2 = [h for h in run["m2"]["history"] if h["phase"] == "phase2"]
    assert p2 and p2[-1]["val"]["val_loss"] <= p1[-1]["val"]["val_loss"] + 1e-6
    assert run["m1"]["metrics"]["tasks"]["ctr"]["auc"] > 0.6


def test_phase_schedule_and_events(run):
    p1 = [h for h in run["m1"]["history"] if h["phase"] == "phase1"]
    assert [h["transfer_phase"] for h in p1] == ["warmup", "dynamic", "dynamic", "dynamic", "dynamic", "frozen"]
    assert [h["cgc_frozen"] for h in p1] == [False] * 4 + [True, True]
    events = {(e["event"], e["phase"], e["epoch"]) for e in run["m2"]["events"]}
    assert ("adatt_freeze_epoch", "phase1", 4) in events and ("cgc_frozen_epoch", "phase1", 4) in events
    assert ("phase2_start", "phase2", 0) in events
    assert any("=== Phase 2" in line for line in run["logs"])


def test_affinity_finds_the_planted_groups_and_conflict(run):
    names = run["m1"]["tasks"]
    A = np.array(run["m1"]["affinity_history"][-1]["matrix"])
    group = {t: g for g, members in GROUPS.items() for t in members}
    within = [A[i, j] for i in range(len(names)) for j in range(len(names)) if i != j and group[names[i]] == group[names[j]]]
    across = [A[i, j] for i in range(len(names)) for j in range(len(names)) if group[names[i]] != group[names[j]]]
    assert np.mean(within) > np.mean(across) + 0.01
    a, b = (names.index(t) for t in CONFLICT_PAIR)
    assert A[a, b] < 0 and A[a, b] < np.mean(across)
    np.testing.assert_allclose(A, A.T, atol=1e-6)
    np.testing.assert_allclose(np.diag(A), 1.0, atol=1e-4)  # every task is present in every batch


def test_phase1_trains_the_tasks_validation_enabled(run, tmp_path):
    from ple_adatt.cli import main

    assert main(["validate", "--data", str(run["data"]), "--config", str(DATA_CFG), "--out", str(tmp_path / "v")]) == 0
    m = run_phase1(data=run["data"], data_config=DATA_CFG, config=TRAIN_CFG, out=tmp_path / "p1",
                   validation=tmp_path / "v", overrides=["training.shared_expert_epochs=1", "max_rows=600"],
                   log=lambda _m: None)
    import json

    enabled = json.loads((tmp_path / "v/availability.json").read_text())["enabled_tasks"]
    assert m["tasks"] == enabled
    other = write_parquet(tmp_path / "other.parquet", rows=2000, seed=5)
    with pytest.raises(StageError, match="computed for a different dataset"):
        run_phase1(data=other, data_config=DATA_CFG, config=TRAIN_CFG, out=tmp_path / "p1b",
                   validation=tmp_path / "v", log=lambda _m: None)
    assert not (tmp_path / "p1b").exists()


def test_phase2_leaves_shared_experts_and_adatt_buffers_bit_identical(run):
    s1 = torch.load(run["dir"] / "p1/checkpoint.pt", weights_only=True)
    s2 = torch.load(run["dir"] / "p2/checkpoint.pt", weights_only=True)
    shared = [k for k in s1 if k.startswith(("model.shared_experts.", "model.embedding."))]
    adatt = [k for k in s1 if k.startswith("transfer.")]
    assert len(shared) == 17 and len(adatt) == 6
    for k in shared + adatt:
        assert torch.equal(s1[k], s2[k]), k
    assert not torch.equal(s1["model.cluster_head_weight"], s2["model.cluster_head_weight"])
    assert bool(s2["model._cgc_frozen"]) and bool(s2["transfer.is_frozen"])


def test_state_dict_round_trips_and_predictions_match(run):
    buf = io.BytesIO(Path(run["dir"] / "p2/checkpoint.pt").read_bytes())
    state = torch.load(buf, weights_only=True)
    for key in ("transfer.affinity_computer.affinity_matrix", "transfer.affinity_computer.update_count",
                "transfer.current_epoch", "transfer.is_frozen", "transfer.group_prior", "model._cgc_frozen"):
        assert key in state
    ck = load_checkpoint(run["dir"] / "p2")
    again = load_checkpoint(run["dir"] / "p2")
    val = load_split(run["data"], ck.data_cfg, ck.preprocessor, "val", ck.manifest["tasks"], max_rows=200)
    p1 = ck.system.model.predict(val.x_num, val.x_cat, val.cluster)
    p2 = again.system.model.predict(val.x_num, val.x_cat, val.cluster)
    for k in p1:
        assert torch.equal(p1[k], p2[k])
    assert ck.system.transfer.phase(10) == "frozen"


def test_phase2_refuses_a_phase2_checkpoint_and_a_different_model(run, tmp_path):
    with pytest.raises(StageError, match="Phase 2 starts from a phase1 checkpoint"):
        run_phase2(checkpoint=run["dir"] / "p2", data=run["data"], out=tmp_path / "x", log=lambda m: None)
    with pytest.raises(StageError, match=r"production.yaml: `model\.[a-z_.]+`, .* differ from the config the "
                                         r"checkpoint .* was trained with"):
        run_phase2(checkpoint=run["dir"] / "p1", data=run["data"], out=tmp_path / "x",
                   config=ROOT / "configs/train/production.yaml", log=lambda m: None)
    # the same through --set: the checkpoint's weights would not fit the manifest's model
    for override, key in (("model.expert_dim=7", "model.expert_dim"),
                          ("model.num_shared_experts=2", "model.num_shared_experts"),
                          ("transfer.strategy=pcgrad", "transfer.strategy")):
        with pytest.raises(StageError, match=rf"manifest.json \+ --set: `{key}` differs from the config"):
            run_phase2(checkpoint=run["dir"] / "p1", data=run["data"], out=tmp_path / "x", overrides=[override],
                       log=lambda m: None)
    assert not (tmp_path / "x").exists()


def test_phase2_restores_transfer_and_trainability_when_it_fails(run):
    from ple_adatt.training import Trainer

    ck = load_checkpoint(run["dir"] / "p1")
    data_cfg = load_data_config(DATA_CFG)
    tasks = ck.manifest["tasks"]
    train = load_split(run["data"], data_cfg, ck.preprocessor, "train", tasks, max_rows=600)
    val = load_split(run["data"], data_cfg, ck.preprocessor, "val", tasks, max_rows=200)
    transfer = ck.system.transfer
    flags = [p.requires_grad for p in ck.system.parameters()]

    def boom(record):
        assert ck.system.transfer is None  # set aside during Phase 2
        raise RuntimeError("disk full")

    trainer = Trainer(ck.system, train, val, ck.train_cfg, torch.device("cpu"), log=lambda m: None, on_epoch=boom)
    with pytest.raises(RuntimeError, match="disk full"):
        trainer.run_phase2()
    assert ck.system.transfer is transfer
    assert [p.requires_grad for p in ck.system.parameters()] == flags


@pytest.mark.parametrize("sync_free", [False, True], ids=["per-step-check", "sync-free"])
def test_nonfinite_loss_skips_the_batch_and_is_logged(tmp_path, sync_free):
    """The CPU loop checks each step; the CUDA loop (forced here on the CPU) never reads the
    device in the hot loop: the scaler skips the poisoned update and the count is read per epoch."""
    from corehelpers import make_batch

    from ple_adatt.config import TaskSpec
    from ple_adatt.training import Trainer, build_system

    cfg = load_train_config(TRAIN_CFG, ["training.shared_expert_epochs=1", "training.batch_size=32",
                                        "transfer.adatt.warmup_epochs=0", "transfer.adatt.freeze_epoch=1"])
    specs = [TaskSpec("ctr", "a", "binary"), TaskSpec("cvr", "b", "binary"), TaskSpec("ltv", "c", "regression")]
    b = make_batch(64)
    b.y = b.y[:, [0, 1, 3]]
    b.x_num[40] = float("inf")  # one poisoned row: its batch's loss is not finite
    torch.manual_seed(0)
    system = build_system(cfg, specs, 5, [4, 4], 3)
    trainer = Trainer(system, b, make_batch(32, seed=1).subset(torch.arange(32)), cfg, torch.device("cpu"),
                      log=lambda m: None)
    trainer.val_data.y = trainer.val_data.y[:, [0, 1, 3]]
    trainer.sync_free = sync_free
    before = [p.detach().clone() for p in system.model.parameters()]
    trainer.run_phase1()
    skipped = [e for e in trainer.events if e["event"] == "nonfinite_loss_skipped"]
    assert len(skipped) == 1 and trainer.history[0].skipped_batches == 1
    assert all(torch.isfinite(p).all() for p in system.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, system.model.parameters()))  # the good batch trained
    assert all(np.isfinite(v) for v in trainer.history[0].raw_losses.values())


def test_golden_losses_tiny_model_fixed_seed():
    """Regression guard: a fixed seed and tiny model give the recorded loss sequence."""
    from corehelpers import make_batch

    from ple_adatt.config import TaskSpec
    from ple_adatt.training import build_system, make_optimizer, set_regression_targets

    cfg = load_train_config(TRAIN_CFG, ["transfer.adatt.warmup_epochs=0", "transfer.adatt.freeze_epoch=5",
                                        "transfer.grad_interval=1"])
    specs = [TaskSpec("ctr", "a", "binary"), TaskSpec("cvr", "b", "binary"), TaskSpec("kind", "c", "multiclass", 3),
             TaskSpec("ltv", "d", "regression"), TaskSpec("brand", "e", "retrieval", vocab_size=20)]
    torch.manual_seed(0)
    system = build_system(cfg, specs, 5, [4, 4], 3)
    opt = make_optimizer(system, cfg)
    b = make_batch(64)
    set_regression_targets(system.model, b.y)
    losses = []
    for _ in range(5):
        out = system.model(b.x_num, b.x_cat, b.cluster)
        lo = system.losses(out.out, b.y)
        g = system.model.shared_task_gradients(lo.weighted, lo.present, out)
        enhanced, _ = system.transfer.transfer_losses(lo.weighted, lo.present, g, epoch=1)
        total = enhanced.sum()
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(total.detach()))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(GOLDEN), rtol=1e-4, atol=1e-5)


# recorded with torch 2.13.0 (CPU); a change here means the maths of a training step changed
GOLDEN = [8.246634483337402, 7.535614013671875, 6.9982099533081055, 6.642430305480957, 6.385960578918457]


def test_sync_free_loop_trains_like_the_checked_loop_on_clean_data():
    from corehelpers import make_batch

    from ple_adatt.config import TaskSpec
    from ple_adatt.training import Trainer, build_system

    cfg = load_train_config(TRAIN_CFG, ["training.shared_expert_epochs=2", "training.batch_size=32",
                                        "transfer.adatt.warmup_epochs=0", "transfer.adatt.freeze_epoch=1",
                                        "training.gradient_accumulation_steps=2"])
    specs = [TaskSpec("ctr", "a", "binary"), TaskSpec("cvr", "b", "binary"), TaskSpec("ltv", "c", "regression")]
    finals = []
    for sync_free in (False, True):
        data, val = make_batch(128), make_batch(32, seed=1)
        data.y, val.y = data.y[:, [0, 1, 3]], val.y[:, [0, 1, 3]]
        torch.manual_seed(0)
        system = build_system(cfg, specs, 5, [4, 4], 3)
        trainer = Trainer(system, data, val, cfg, torch.device("cpu"), log=lambda m: None)
        trainer.sync_free = sync_free
        torch.manual_seed(1)
        trainer.run_phase1()
        finals.append([p.detach().clone() for p in system.parameters()])
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _tiny_trainer(overrides, train):
    from corehelpers import BATCH_SPECS, make_batch

    from ple_adatt.training import Trainer, build_system

    cfg = load_train_config(TRAIN_CFG, ["training.batch_size=32", "training.shared_expert_epochs=3",
                                        "transfer.adatt.warmup_epochs=0", "transfer.adatt.freeze_epoch=2",
                                        *overrides])
    torch.manual_seed(0)
    system = build_system(cfg, BATCH_SPECS, 5, [4, 4], 3)
    return Trainer(system, train, make_batch(64, seed=1), cfg, torch.device("cpu"), log=lambda m: None)


def test_a_run_that_diverges_stops_with_an_error_naming_the_cause():
    """A learning rate that blows the weights up must not end as a finished run with NaN
    weights and a validation loss that reads 0."""
    from corehelpers import make_batch

    from ple_adatt.errors import TrainingError

    trainer = _tiny_trainer(["training.learning_rate=1e30"], make_batch(128))
    with pytest.raises(TrainingError, match=r"training diverged in phase1 epoch 1: (.*not finite|the validation loss is nan)"
                                            r".*learning_rate` \(now 1e\+30\)"):
        trainer.run_phase1()
    assert trainer.events[-1]["event"] == "diverged"


def test_an_epoch_whose_every_batch_is_skipped_stops_the_run():
    from corehelpers import make_batch

    from ple_adatt.errors import TrainingError

    train = make_batch(128)
    train.x_num[:] = float("nan")  # every batch's loss is NaN: every update is skipped
    trainer = _tiny_trainer([], train)
    with pytest.raises(TrainingError, match="all 4 batches were skipped for a non-finite loss"):
        trainer.run_phase1()
    assert len(trainer.history) == 1


def test_no_training_rows_is_an_error_before_anything_runs():
    from corehelpers import make_batch

    from ple_adatt.errors import TrainingError

    with pytest.raises(TrainingError, match="the training split has no rows"):
        _tiny_trainer([], make_batch(128).subset(torch.arange(0)))


def test_phase2_trains_the_cluster_heads_and_nothing_else():
    """Seed 8.2: Phase 2 trains the per-cluster heads only (the default phase2_trainable):
    towers, task experts, CGC gates, shared experts and the uncertainty weights keep their
    Phase 1 values bit for bit."""
    from corehelpers import make_batch

    trainer = _tiny_trainer(["training.loss_weighting=uncertainty", "training.cluster_finetune_epochs=2",
                             "training.shared_expert_epochs=1"], make_batch(128))
    trainer.run_phase1()
    before = {n: p.detach().clone() for n, p in trainer.system.named_parameters()}
    assert any(n.startswith("criterion.") for n in before)  # uncertainty log-variances
    trainer.run_phase2()
    after = dict(trainer.system.named_parameters())
    changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
    assert changed == ["model.cluster_head_bias", "model.cluster_head_weight"]


def test_each_epoch_records_the_learning_rate_it_trained_at():
    """The epoch line and MLflow's `lr` show the rate the epoch ran with, so the warmup shows: with a
    one-epoch LinearLR warmup (start factor 0.1), epoch 1 trains at lr / 10, and Phase 2 warms up again."""
    from corehelpers import make_batch

    trainer = _tiny_trainer(["training.learning_rate=0.003", "training.warmup_steps=1",
                             "training.phase2_warmup_steps=1", "training.cluster_finetune_epochs=2"], make_batch(128))
    trainer.run_phase1()
    trainer.run_phase2()
    lrs = {(r.phase, r.epoch): r.lr for r in trainer.history}
    assert lrs[("phase1", 0)] == pytest.approx(3e-4) and lrs[("phase1", 1)] == pytest.approx(3e-3)
    assert lrs[("phase2", 0)] == pytest.approx(3e-4) and lrs[("phase2", 1)] == pytest.approx(3e-3)


def test_the_phase2_manifest_names_the_phase1_checkpoint_it_continues(run):
    """Lineage: the registry reads Phase 1's producer (component version) from the Phase 2 manifest."""
    prev = run["m2"]["previous"]
    assert prev["checkpoint_sha256"] == run["m1"]["files"]["checkpoint.pt"] == run["m2"]["inputs"]["checkpoint"]
    assert prev["producer"] == run["m1"]["producer"] and prev["producer"]["stage"] == "train-phase1"
    assert "previous" not in run["m1"]
