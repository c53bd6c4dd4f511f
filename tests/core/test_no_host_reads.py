"""The sync-free hot loop on the CPU: after warm-up, a training step must not read a tensor
back to the host. On CUDA each such read waits for the device; here it is made to raise, so
a read that creeps into the step fails this test without a GPU. (tests/core/test_gpu.py
checks the same with CUDA's own sync detector.)

Two nets catch the reads (:func:`no_host_reads`):

* a ``TorchDispatchMode`` sees every ATen op, also those called from C++, and raises on the
  ops that synchronise on CUDA: ``_local_scalar_dense`` (``.item()``, ``float(t)``,
  ``bool(t)``, ``if t.any():``, f-strings), the data-dependent shapes (``nonzero``,
  ``torch.where(m)``, ``masked_select``, ``unique``, ``repeat_interleave`` without
  ``output_size``, ``bincount``), ``equal`` / ``allclose`` / ``is_nonzero``, and boolean-mask
  indexing ``x[mask]`` / ``x[mask] = v`` (``index`` / ``index_put`` with a bool index);
* ``Tensor.tolist``, ``.cpu()``, ``.numpy()`` and ``__array__`` read a CPU tensor without
  dispatching an op, so they are patched to raise as well.

The guard runs over :meth:`Trainer.train_step` (what the bench times and a CUDA graph
captures) for every strategy and adaTT phase, and over the body of :meth:`Trainer._fit`'s
loop for a whole short run; the reads that the loop makes on purpose (every ``log_every``
steps, at the end of an epoch) stay outside it. MGDA's host solver is the documented
exception: the guard must catch it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from corehelpers import BATCH_SPECS, make_batch
from torch.utils._python_dispatch import TorchDispatchMode

from ple_adatt.config import load_train_config
from ple_adatt.training import Trainer, build_system, make_optimizer

ROOT = Path(__file__).resolve().parents[2]
SPECS = BATCH_SPECS

# ATen ops that wait for the device on CUDA (their result, or its shape, lives on the host)
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
            "unique_consecutive", "equal", "allclose", "is_nonzero", "bincount"}
INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"}
PYTHON_READS = ("tolist", "cpu", "numpy", "__array__")  # no ATen op on a CPU tensor


class HostRead(AssertionError):
    pass


def _bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class ForbidHostSync(TorchDispatchMode):
    """Raises :class:`HostRead` naming the op that would synchronise on CUDA."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        why = None
        if name in SYNC_OPS:
            why = f"aten::{name}"
        elif name == "repeat_interleave" and func._overloadname != "self_int" and kwargs.get("output_size") is None:
            why = f"aten::repeat_interleave.{func._overloadname} without output_size"
        elif name in INDEX_OPS and len(args) > 1 and _bool_index(args[1]):
            why = f"aten::{name} with a boolean index (x[mask])"
        if why is not None:
            raise HostRead(f"{why} reads the device back to the host (a sync on CUDA) during a step")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    originals = {name: getattr(torch.Tensor, name) for name in PYTHON_READS}

    def forbid(name):
        def read(self, *args, **kwargs):
            if self.numel() > 0:
                raise HostRead(f"Tensor.{name} read a {tuple(self.shape)} tensor back to the host during a step")
            return originals[name](self, *args, **kwargs)
        return read

    try:
        for name in PYTHON_READS:
            setattr(torch.Tensor, name, forbid(name))
        with ForbidHostSync():
            yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _guard_active() -> bool:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any(isinstance(m, ForbidHostSync) for m in _get_current_dispatch_mode_stack())


# ------------------------------------------------------------------------ the detector itself

_x = torch.arange(-3.0, 5.0)
_m = _x > 0
CAUGHT = {
    "x[mask]": (lambda: _x[_m], "index with a boolean index"),
    "x[mask] = v": (lambda: _x.clone().__setitem__(_m, 0.0), "index_put_ with a boolean index"),
    "torch.nonzero": (lambda: torch.nonzero(_m), "aten::nonzero"),
    "Tensor.nonzero": (lambda: _m.nonzero(), "aten::nonzero"),
    "torch.where(m)": (lambda: torch.where(_m), "aten::nonzero"),
    "masked_select": (lambda: torch.masked_select(_x, _m), "aten::masked_select"),
    "unique": (lambda: torch.unique(_x), "aten::_unique2"),
    "repeat_interleave": (lambda: _x[:2].repeat_interleave(torch.tensor([1, 2])), "aten::repeat_interleave"),
    "is_nonzero": (lambda: torch.is_nonzero(_m.any()), "aten::_local_scalar_dense"),
    "equal": (lambda: torch.equal(_x, _x), "aten::equal"),
    "allclose": (lambda: torch.allclose(_x, _x), "aten::allclose"),
    ".item()": (lambda: _x.sum().item(), "aten::_local_scalar_dense"),
    "float(t)": (lambda: float(_x.sum()), "aten::_local_scalar_dense"),
    "if t.any():": (lambda: 1 if _m.any() else 0, "aten::_local_scalar_dense"),
    "f-string": (lambda: f"{_x.sum():.3f}", "aten::_local_scalar_dense"),
    ".tolist()": (lambda: _x.tolist(), "Tensor.tolist"),
    ".cpu()": (lambda: _x.cpu(), "Tensor.cpu"),
    ".numpy()": (lambda: _x.numpy(), "Tensor.numpy"),
}
ALLOWED = {  # the sync-free forms the step uses instead
    "x[long index]": lambda: _x[torch.tensor([1, 2])],
    "torch.where(m, x, 0)": lambda: torch.where(_m, _x, 0.0),
    "masked_fill": lambda: _x.masked_fill(_m, 0.0),
    "repeat_interleave(int)": lambda: _x.repeat_interleave(2),
    "repeat_interleave(output_size)": lambda: _x[:2].repeat_interleave(torch.tensor([1, 2]), output_size=3),
    "isclose": lambda: torch.isclose(_x, _x),
    "reductions": lambda: (_x.sum(), _m.any(), _x.abs().max()),
}


@pytest.mark.parametrize("what", list(CAUGHT))
def test_the_guard_catches_a_host_read(what):
    fn, named = CAUGHT[what]
    fn()  # fine outside the guard
    with pytest.raises(HostRead, match=re.escape(named)), no_host_reads():
        fn()
    _x.tolist()  # the guard is gone again
    assert not _guard_active()


def test_the_guard_lets_sync_free_ops_through():
    with no_host_reads():
        for fn in ALLOWED.values():
            fn()


# ------------------------------------------------------------------------- Trainer.train_step


def _trainer(strategy: str, overrides: tuple[str, ...] = (), n: int = 192) -> Trainer:
    cfg = load_train_config(ROOT / "configs/train/cpu_small.yaml", [
        f"transfer.strategy={strategy}", "transfer.grad_interval=1", "transfer.adatt.warmup_epochs=1",
        "transfer.adatt.freeze_epoch=2", "training.batch_size=64", *overrides])
    torch.manual_seed(0)
    system = build_system(cfg, SPECS, 5, [4, 4], 3)
    trainer = Trainer(system, make_batch(n), make_batch(64, seed=1), cfg, torch.device("cpu"), log=lambda m: None)
    trainer.sync_free = True  # the CUDA path
    return trainer


ADATT = [(f"adatt-{'hook' if hook else 'separate'}-{method}-{phase}",
          "adatt", (f"transfer.measure_in_backward={str(hook).lower()}", f"transfer.grad_method={method}"), phase)
         for hook in (True, False) for method, phases in (("batched", ("warmup", "dynamic", "frozen")),
                                                          ("einsum", ("dynamic",))) for phase in phases]
OTHERS = [(s, s, (), "dynamic") for s in ("equal", "uncertainty", "pcgrad", "mocograd", "gradnorm")] + [
    # MGDA's device solver (the interpreter here; the default on CUDA), on both gradient sources
    (f"mgda-device-{on}", "mgda", ("transfer.mgda.solver=device", f"transfer.mgda.on={on}"), "dynamic")
    for on in ("params", "representation")]
EPOCH = {"warmup": 0, "dynamic": 1, "frozen": 3}


def _guarded_train_steps(trainer: Trainer, phase: str) -> list:
    if phase == "frozen":
        assert trainer.system.transfer.on_epoch_end(2) == ["adatt_freeze_epoch"]
    epoch = EPOCH[phase]
    if trainer.cfg.transfer.strategy == "adatt":
        assert trainer.system.transfer.phase(epoch) == phase
    opt, scaler = make_optimizer(trainer.system, trainer.cfg, fused=True), trainer.make_scaler()
    # warm-up step: the optimizer state and lazily sized buffers are made once
    trainer.train_step(trainer.train_data.subset(torch.arange(64)), epoch, False, opt, scaler)
    trainer.global_step += 1
    outs = []
    for i in range(1, 3):
        b = trainer.train_data.subset(torch.arange(i * 64, (i + 1) * 64))
        if i == 1:
            b.y[:, 2] = float("nan")  # a task with no label in the whole batch
        with no_host_reads():
            outs.append(trainer.train_step(b, epoch, False, opt, scaler))
        trainer.global_step += 1
    return outs


STEP_CASES = ADATT + OTHERS


@pytest.mark.parametrize("strategy,overrides,phase", [c[1:] for c in STEP_CASES], ids=[c[0] for c in STEP_CASES])
def test_a_training_step_reads_nothing_back(strategy, overrides, phase):
    trainer = _trainer(strategy, overrides)
    tr = trainer.system.transfer
    measured = int(tr.affinity_computer.update_count)
    outs = _guarded_train_steps(trainer, phase)
    assert all(torch.isfinite(p).all() for p in trainer.system.parameters())
    assert all(bool(o.finite) for o in outs)
    assert [bool(o.present[2]) for o in outs] == [False, True]
    updates = int(tr.affinity_computer.update_count) - measured
    assert updates == (0 if phase == "frozen" else 3)  # the guarded steps did measure
    if strategy == "adatt":
        assert (outs[-1].weights is None) == (phase == "warmup")


def test_mgda_host_solver_is_caught():
    """The host solver reads the Gram matrix back (and so cannot be graphed): proof that the
    guard watches the whole step."""
    trainer = _trainer("mgda", ("transfer.mgda.solver=host",))
    opt, scaler = make_optimizer(trainer.system, trainer.cfg, fused=True), trainer.make_scaler()
    trainer.train_step(trainer.train_data.subset(torch.arange(64)), 1, False, opt, scaler)
    with pytest.raises(HostRead), no_host_reads():
        trainer.train_step(trainer.train_data.subset(torch.arange(64, 128)), 1, False, opt, scaler)


# ------------------------------------------------------------------------------ Trainer._fit


class _GuardedBatches(list):
    """The epoch's batch list: iterating it runs each loop iteration after the first of the
    run inside :func:`no_host_reads`, from handing out a batch to asking for the next one;
    ``_fit``'s code after the loop (the once-per-epoch reads) runs outside it."""

    def __init__(self, batches, seen: list[int], guarded: list[int]):
        super().__init__(batches)
        self.seen, self.guarded, self.live = seen, guarded, []

    def __iter__(self):
        gen = self._iterate()
        self.live.append(gen)
        return gen

    def _iterate(self):
        for idx in list.__iter__(self):
            self.seen[0] += 1
            if self.seen[0] == 1:  # the run's warm-up step: optimizer state, lazy buffers
                yield idx
                continue
            with no_host_reads():
                yield idx
            self.guarded[0] += 1


def _guard_fit_loops(trainer: Trainer, monkeypatch) -> tuple[list, list[int], list[int]]:
    made: list[_GuardedBatches] = []
    seen, guarded = [0], [0]
    batches = Trainer._batches

    def guarded_batches(self, n, batch_size):
        made.append(_GuardedBatches(batches(self, n, batch_size), seen, guarded))
        return made[-1]

    monkeypatch.setattr(trainer, "_batches", guarded_batches.__get__(trainer))
    return made, seen, guarded


def _close(made) -> None:
    """A HostRead leaves the loop's generator suspended inside the guard: close it (LIFO)."""
    for b in reversed(made):
        for gen in reversed(b.live):
            gen.close()


FIT = ["training.shared_expert_epochs=4", "training.cluster_finetune_epochs=1", "training.early_stopping_patience=9",
       "training.batch_size=32", "training.log_every=1000"]


@pytest.mark.parametrize("hook,stream", [(True, False), (False, False), (True, True)],
                         ids=["hook", "separate", "hook-stream"])
def test_the_training_loop_reads_nothing_back_between_its_log_lines(hook, stream, monkeypatch):
    """Phase 1 through adaTT's warmup, dynamic and frozen epochs, then Phase 2: no host
    read inside the loop, once the run's first step has made the optimizer state."""
    trainer = _trainer("adatt", (*FIT, f"transfer.measure_in_backward={str(hook).lower()}",
                                 f"transfer.measure_stream={str(stream).lower()}"), n=64)
    made, seen, guarded = _guard_fit_loops(trainer, monkeypatch)
    try:
        trainer.run_phase1()
        trainer.run_phase2()
    finally:
        _close(made)
    assert [r.transfer_phase for r in trainer.history] == ["warmup", "dynamic", "dynamic", "frozen", "off"]
    assert len(made) == 5 and seen[0] == 5 * 2 and guarded[0] == seen[0] - 1
    assert int(trainer.system.transfer.affinity_computer.update_count) == 3 * 2  # measured in the loop
    assert all(r.skipped_batches == 0 for r in trainer.history)


def test_the_loop_guard_sees_the_log_line_read(monkeypatch):
    """The guard covers the loop's body, not just the step: the loss read every
    ``log_every`` steps is caught there (and is the only read in it)."""
    trainer = _trainer("adatt", (*FIT[1:], "training.shared_expert_epochs=1", "training.log_every=3"), n=128)
    made, _, guarded = _guard_fit_loops(trainer, monkeypatch)
    try:
        with pytest.raises(HostRead, match="_local_scalar_dense"):
            trainer.run_phase1()
    finally:
        _close(made)
    assert guarded[0] == 1  # step 2 passed; step 3 logged
    assert not _guard_active() and torch.arange(2).tolist() == [0, 1]  # both nets are gone again


def test_evaluation_runs_the_model_once_per_batch_and_predicts_what_predict_does(monkeypatch):
    """Validation metrics come from the same forward as the validation loss (it ran twice)."""
    from ple_adatt.metrics import task_metrics
    from ple_adatt.training import evaluate

    cfg = load_train_config(ROOT / "configs/train/cpu_small.yaml")
    torch.manual_seed(0)
    system = build_system(cfg, SPECS, 5, [4, 4], 3)
    data = make_batch(300)
    model = system.model
    calls = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    got = evaluate(system, data, use_cluster_heads=False, batch_size=128)
    assert len(calls) == 3  # 300 rows in batches of 128
    monkeypatch.setattr(type(model), "forward", forward)
    system.eval()
    with torch.no_grad():
        preds = model.predict(data.x_num, data.x_cat, data.cluster, use_cluster_heads=False)
    compared = 0
    for i, h in enumerate(model.heads):
        if h.type in ("binary", "multiclass", "regression"):
            want = task_metrics(h.type, preds[h.name].float(), data.y[:, i])
            for key, value in want.items():
                if isinstance(value, float) and value == value:
                    assert got["tasks"][h.name][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (h.name, key)
                    compared += 1
    assert compared >= 3
