"""Phase 1 training throughput: this project's task-batched model against a naive reference.

    .venv/bin/python bench/train_throughput.py                  # CPU, small shape
    python bench/train_throughput.py --shape seed --device cuda  # GPU, the seed's shape

Prints samples/s, step time and peak memory of
  (a) a naive reference kept here: one module per task, a Python loop over tasks, and the
      seed's per-task ``torch.autograd.grad(..., retain_graph=True)`` loop for adaTT
      (grad_interval 10);
  (b) this project's model with adaTT off;
  (c) adaTT on, grad_interval 10 (batched per-task gradients);
  (d) adaTT on, grad_interval 1 (exact per-task gradients every step);
  (e) with ``--only ...e``: (d) with the seed's separate backward (measure_in_backward=false);
  (f) with ``--only ...f``: (b) with the experts' second-layer biases in their own layers
      (``PLEClusterModel.mixture_biases = False``), where the GPU's layers otherwise leave them
      to the fused CGC mixture: an A/B of that change in one run;
  (g) with ``--only ...g``: (b) with the towers' first layer in PyTorch (``fused_tower = False``),
      where the GPU's layers otherwise run its bias and ReLU as one Triton pass;
  (h) with ``--only ...h``: (b) with the experts' hidden-layer gradients masked by a
      threshold pass (``fused_relu_dgrad = False``), where the GPU's layers otherwise mask them in
      a Triton GEMM's epilogue;
  (i) with ``--only ...i``: (b) with the heads as a GEMM after the towers (``fused_head = False``),
      where the GPU's layers otherwise sum them in the towers' kernel;
  (j) with ``--only ...j``: (d) with the measurement on a second CUDA stream
      (``transfer.measure_stream``), beside the rest of the backward and the optimizer step;
  (k) with ``--only ...k``: (j) with the side stream at the training stream's priority (0),
      where it otherwise runs at a higher one (``side_stream.PRIORITY``);
  (m) with ``--only ...m``: MGDA instead of adaTT, per-task gradients and min-norm weights every
      step (on CUDA solved on the device, ``transfer.mgda.solver: auto``, so graphs capture it);
``--cuda-graph`` replays each whole project step as a CUDA graph (training.cuda_graph),
``--compile [MODE]`` compiles the trunk, heads and losses (training.compile),
``--no-fused-mixture`` mixes the CGC experts in PyTorch, not in the Triton kernels
(training.fused_mixture: false);
and the ratios between them. Needs torch and numpy only (no polars / MLflow / KFP), so it
runs on a bare GPU box. The training data lives on the device, shuffled and sliced there;
the timed loop never reads a value back to the host.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ple_adatt.config import (  # noqa: E402
    AdaTTConfig,
    ModelConfig,
    TaskGroup,
    TaskSpec,
    TrainConfig,
    TrainingConfig,
    TransferConfig,
)
from ple_adatt.data.dataset import TensorData  # noqa: E402
from ple_adatt.side_stream import SideStream  # noqa: E402
from ple_adatt.step_graphs import StepGraphs  # noqa: E402
from ple_adatt.training import Trainer, build_system, make_optimizer  # noqa: E402

SHAPES = {
    # the seed's shape: 16 tasks, 4 shared experts, batch 16384, ~8M parameters (issue 8). The
    # layers hold 3.36M; the rest is what a recommender's parameters mostly are, embedding tables:
    # 4 categorical features of 72,000 ids x 16 (4.6M). Until the seventh session the tables had
    # 50 ids (3.4M in all); the layers' FLOPs, and so the GPU figures measured then, are the same.
    "seed": dict(tasks=16, batch=16384, numeric=36, cats=4, card=72_000, emb=16, experts=4, shared_hidden=1024,
                 expert_dim=128, task_experts=2, task_hidden=256, tower_hidden=256),
    # a CPU-sized shape for the 2-core CI machine
    "small": dict(tasks=16, batch=256, numeric=36, cats=4, card=50, emb=4, experts=4, shared_hidden=64,
                  expert_dim=32, task_experts=1, task_hidden=32, tower_hidden=32),
}


# ------------------------------------------------------------------------ naive reference


class NaiveMLP(nn.Sequential):
    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


class NaivePLE(nn.Module):
    """The straightforward design: one small module per task, a Python loop over tasks."""

    def __init__(self, s: dict, d_in: int):
        super().__init__()
        T, E = s["tasks"], s["experts"]
        self.embedding = nn.Embedding(s["cats"] * s["card"], s["emb"])
        self.register_buffer("offsets", torch.arange(s["cats"]) * s["card"])  # on the device once, no copy per step
        self.shared = nn.ModuleList(NaiveMLP(d_in, s["shared_hidden"], s["expert_dim"]) for _ in range(E))
        self.task_experts = nn.ModuleList(
            nn.ModuleList(NaiveMLP(d_in, s["task_hidden"], s["expert_dim"]) for _ in range(s["task_experts"]))
            for _ in range(T))
        self.gates = nn.ModuleList(nn.Linear(d_in, E + s["task_experts"]) for _ in range(T))
        self.towers = nn.ModuleList(NaiveMLP(s["expert_dim"], s["tower_hidden"], 1) for _ in range(T))

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> list[torch.Tensor]:
        x = torch.cat([x_num, self.embedding(x_cat + self.offsets).flatten(1)], 1)
        shared = [e(x) for e in self.shared]
        outs = []
        for t in range(len(self.towers)):
            experts = torch.stack(shared + [e(x) for e in self.task_experts[t]], 1)  # (B, K, d)
            g = torch.softmax(self.gates[t](x), -1).unsqueeze(-1)
            outs.append(self.towers[t]((g * experts).sum(1)).squeeze(-1))
        return outs


def naive_task_gradients(model: NaivePLE, losses: list[torch.Tensor]) -> torch.Tensor:
    params = list(model.shared.parameters())
    rows = []
    for loss in losses:  # the seed's loop: one autograd.grad per task, graph retained
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)]))
    return torch.stack(rows)


# ----------------------------------------------------------------------------- the runs


def make_data(s: dict, n: int, device: torch.device) -> TensorData:
    g = torch.Generator().manual_seed(0)
    x_num = torch.randn(n, s["numeric"], generator=g)
    x_cat = torch.randint(0, s["card"], (n, s["cats"]), generator=g)
    w = torch.randn(s["numeric"], s["tasks"], generator=g)
    y = ((x_num @ w + torch.randn(n, s["tasks"], generator=g)) > 0).float()
    y[torch.rand(n, s["tasks"], generator=g) < 0.1] = float("nan")
    cluster = torch.randint(0, 9, (n,), generator=g)
    return TensorData(x_num, x_cat, y, cluster).to(device)


def project_config(s: dict, interval: int, amp: bool, in_backward: bool = True, stream: bool = False,
                   strategy: str = "adatt") -> TrainConfig:
    names = [f"t{i}" for i in range(s["tasks"])]
    groups = {f"g{k}": TaskGroup(tuple(names[k::4]), 0.7) for k in range(4)}
    return TrainConfig(
        device="auto",
        model=ModelConfig(embedding_dim=s["emb"], num_shared_experts=s["experts"], shared_hidden=s["shared_hidden"],
                          expert_dim=s["expert_dim"], task_experts_per_task=s["task_experts"],
                          task_hidden=s["task_hidden"], tower_hidden=s["tower_hidden"], logit_transfer_edges=()),
        transfer=TransferConfig(strategy=strategy, grad_interval=interval, measure_in_backward=in_backward,
                                measure_stream=stream,
                                adatt=AdaTTConfig(warmup_epochs=0, freeze_epoch=100), task_groups=groups),
        training=TrainingConfig(batch_size=s["batch"], use_amp=amp, compile=COMPILE is not None,
                                compile_mode=COMPILE or "default", cuda_graph=CUDA_GRAPH,
                                fused_mixture=FUSED_MIXTURE),
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, steps: int, warmup: int, device: torch.device,
               peak_from_start: bool = False) -> tuple[float, float, float]:
    """Mean seconds per step after ``warmup`` steps, the peak memory allocated (GiB) and the
    warm-up's seconds. The peak counts from after the warm-up (autotuning's trial buffers are
    not the step's), or with ``peak_from_start`` from before it: CUDA graphs allocate their
    pools while being captured in the warm-up, and replays never go through the allocator."""
    if device.type == "cuda" and peak_from_start:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm = time.perf_counter() - t0
    if device.type == "cuda" and not peak_from_start:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return dt, peak, warm


@dataclass
class Prepared:
    """One benchmark run, built and ready: its step, parameter count, and how to warm it up."""

    step: Callable[[], None]
    params: int
    warmup: int  # steps before the first timing (CUDA graphs: their warm-up and capture too)
    peak_from_start: bool = False


def prepare_project(s: dict, data: TensorData, device: torch.device, adatt: bool, interval: int, amp: bool,
                    warmup: int, in_backward: bool = True, mixture_biases: bool = True,
                    fused_tower: bool = True, fused_relu_dgrad: bool = True, fused_head: bool = True,
                    stream: bool = False, side_priority: int | None = None, strategy: str = "adatt") -> Prepared:
    cfg = project_config(s, interval, amp, in_backward, stream, strategy)
    specs = [TaskSpec(f"t{i}", f"y{i}", "binary") for i in range(s["tasks"])]
    torch.manual_seed(0)
    system = build_system(cfg, specs, s["numeric"], [s["card"]] * s["cats"], 8)
    model = system.model
    model.mixture_biases, model.fused_tower, model.fused_relu_dgrad = mixture_biases, fused_tower, fused_relu_dgrad
    model.fused_head = fused_head
    if not adatt:
        system.transfer = None
    trainer = Trainer(system, data, data.subset(torch.arange(8, device=device)), cfg, device, log=lambda m: None)
    if stream and side_priority is not None:  # the side stream at another CUDA priority (run (k))
        trainer.measure_side = SideStream(device, priority=side_priority)
    graphed = trainer.graph_backend is not None
    # what Trainer._fit uses
    opt = make_optimizer(system, cfg, fused=trainer.sync_free, capturable=graphed)
    scaler = trainer.make_scaler()
    graphs = StepGraphs(trainer, opt, scaler, s["batch"], trainer.graph_backend) if graphed else None
    perm = torch.randperm(len(data), device=device)
    n_batches = len(data) // s["batch"]

    def step() -> None:  # the trainer's own step, as in Trainer._fit
        i = trainer.global_step % n_batches
        idx = perm[i * s["batch"]:(i + 1) * s["batch"]]
        if graphs is not None:
            graphs.step(idx, 1, False, trainer.measure_now())
        else:
            trainer.train_step(data.subset(idx), 1, False, opt, scaler)
        trainer.global_step += 1

    if graphs is not None:  # each kind of step: warm-up runs, then its capture, before timing
        warmup = max(warmup, (graphs.warmup_steps + 1) * (interval if adatt else 1) + 1)
    return Prepared(step, sum(p.numel() for p in system.parameters()), warmup, peak_from_start=graphs is not None)


PROFILE_DIR: Path | None = None
COMPILE: str | None = None  # a torch.compile mode, or None for eager
CUDA_GRAPH = False  # --cuda-graph
FUSED_MIXTURE = True  # --no-fused-mixture turns it off


def profile_steps(step, device: torch.device, label: str, n: int = 5) -> None:
    """Write the kernel-time table of ``n`` steps to PROFILE_DIR (``--profile DIR``)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(n):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40)
    # the same time by operator and input shapes: which layer each kernel's time belongs to
    shapes = prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=40, max_name_column_width=40,
                                                                max_shapes_column_width=90)
    name = "".join(c if c.isalnum() else "_" for c in label)[:40]
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    (PROFILE_DIR / f"profile_{name}.txt").write_text(f"{label}, {n} steps\n{table}\n\nby input shape\n{shapes}\n")


def prepare_naive(s: dict, data: TensorData, device: torch.device, interval: int, amp: bool,
                  warmup: int) -> Prepared:
    torch.manual_seed(0)
    d_in = s["numeric"] + s["cats"] * s["emb"]
    model = NaivePLE(s, d_in).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    from ple_adatt.transfer.adatt import TaskAffinityComputer

    affinity = TaskAffinityComputer([f"t{i}" for i in range(s["tasks"])]).to(device)
    perm = torch.randperm(len(data), device=device)
    n_batches = len(data) // s["batch"]
    counter = [0]
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp and device.type == "cuda" else None

    def step() -> None:
        i = counter[0] % n_batches
        b = data.subset(perm[i * s["batch"]:(i + 1) * s["batch"]])
        with ctx() if ctx else torch.enable_grad():
            outs = model(b.x_num, b.x_cat)
        losses = []
        for t, o in enumerate(outs):  # per-task masked loss, one at a time
            y = b.y[:, t]
            m = (~torch.isnan(y)).float()  # a mask product, not boolean indexing: no host read per task
            bce = F.binary_cross_entropy_with_logits(o.float(), torch.nan_to_num(y), reduction="none")
            losses.append((bce * m).sum() / m.sum().clamp_min(1.0))
        if counter[0] % interval == 0:
            affinity.update(naive_task_gradients(model, losses))
        sum(losses).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        counter[0] += 1

    return Prepared(step, sum(p.numel() for p in model.parameters()), warmup)


def task_gradient_check(s: dict, data: TensorData, device: torch.device, amp: bool, reps: int = 10) -> None:
    """Time one per-task gradient extraction per method and compare each method's affinity
    (cosine matrix) with the seed's loop, in float32 and under the run's autocast. The kernel
    runs under autocast only (in float32 ``batched`` takes the einsums: exact float32 products
    made the kernel 10x slower), there in each variant and layout."""
    from ple_adatt import kernels

    for use_amp in sorted({False, amp and device.type == "cuda"}):
        methods = ["einsum", "loop"] + (["fused"] if use_amp and kernels.available(device) else [])
        cfg = project_config(s, 1, use_amp)
        specs = [TaskSpec(f"t{i}", f"y{i}", "binary") for i in range(s["tasks"])]
        torch.manual_seed(0)
        system = build_system(cfg, specs, s["numeric"], [s["card"]] * s["cats"], 8).to(device)
        with torch.no_grad():  # trained-looking heads, so the tasks' gradients differ
            system.model.head.weight.normal_(0.0, 0.3)
        b = data.subset(torch.arange(s["batch"], device=device))
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp and device.type == "cuda" else torch.enable_grad()
        with ctx:
            out = system.model(b.x_num, b.x_cat, b.cluster)
            lo = system.losses(out.out, b.y)
        cos, line = {}, []
        # each kernel variant and tile layout on its own, then the default choice ("fused")
        runs = [(f"fused[{v},{lay}]", "fused", (lay,), v) for v in kernels.VARIANTS for lay in kernels.LAYOUTS
                if "fused" in methods]
        # and the hidden-rows layout with gb1 by the row reduction it had before the ones column
        runs += [(f"fused[{v},hrows,gb1-reduce]", "fused", ("hrows",), v) for v in kernels.VARIANTS
                 if "fused" in methods]
        runs += [(m, m, kernels.LAYOUTS, None) for m in methods]
        for label, m, layouts, variant in runs:
            kernels.DEFAULT_LAYOUTS, kernels.DEFAULT_VARIANT = layouts, variant
            kernels.GB1_FROM_ONES_COLUMN = "gb1-reduce" not in label
            g = system.model.shared_task_gradients(lo.weighted, lo.present, out, m)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                g = system.model.shared_task_gradients(lo.weighted, lo.present, out, m)
            sync(device)
            n = F.normalize(g.float(), dim=1)
            cos[label] = n @ n.T
            line.append(f"{label} {(time.perf_counter() - t0) / reps * 1e3:.2f} ms")
        kernels.DEFAULT_LAYOUTS, kernels.DEFAULT_VARIANT = kernels.LAYOUTS, None
        kernels.GB1_FROM_ONES_COLUMN = True
        if "fused" in methods:
            line.append(f"fused chose: {kernels.tuned_config()}")
        diffs = [f"{m} {float((cos[m] - cos['loop']).abs().max()):.1e}" for m in cos if m != "loop"]
        print(f"per-task gradients ({'bf16' if use_amp and device.type == 'cuda' else 'fp32'}): "
              f"{', '.join(line)}; max |affinity - loop|: {', '.join(diffs)}", flush=True)
        del system, out, lo


def mixture_check(s: dict, device: torch.device, reps: int = 20) -> None:
    """Time the CGC mixture alone, forward and backward at the shape's batch, as the GPU runs it
    under autocast (float32 gates, bf16 experts): the fused kernels against PyTorch, with the
    bandwidth each reaches on the fused kernels' ideal traffic (ple_adatt.mixture)."""
    from ple_adatt import mixture

    if device.type != "cuda" or not mixture.fused_available(device):
        print(f"CGC mixture: fused kernels need CUDA and triton (here: {device.type}); not timed", flush=True)
        return
    T, B, d, E, ET = s["tasks"], s["batch"], s["expert_dim"], s["experts"], s["task_experts"]
    g = torch.Generator(device=device).manual_seed(0)
    gates = torch.softmax(torch.randn(T, B, E + ET, device=device, generator=g), -1).requires_grad_()
    shared = torch.randn(E, B, d, device=device, generator=g).bfloat16().requires_grad_()
    task = torch.randn(T, ET, B, d, device=device, generator=g).bfloat16().requires_grad_() if ET else None
    grad = torch.randn(T, B, d, device=device, generator=g).bfloat16()
    ins = [t for t in (gates, shared, task) if t is not None]
    experts = shared.numel() + (task.numel() if task is not None else 0)
    ideal = gates.numel() * 4 * 3 + experts * 2 * 3 + grad.numel() * 2 * 3  # bytes: forward + both backwards
    line = []
    for label, fn in (("fused", mixture.fused_mixture), ("pytorch", mixture.reference_mixture)):
        for i in range(reps + 2):
            if i == 2:  # two untimed calls: compilation, allocator
                sync(device)
                t0 = time.perf_counter()
            torch.autograd.grad(fn(gates, shared, task), ins, grad)
        sync(device)
        dt = (time.perf_counter() - t0) / reps
        line.append(f"{label} {dt * 1e3:.3f} ms ({ideal / dt / 1e9:.0f} GB/s of ideal traffic)")
    print(f"CGC mixture forward + backward, batch {B}: {', '.join(line)}", flush=True)


def gram_check(rows: int, cols: int, device: torch.device, reps: int = 20) -> None:
    """Time the float32 Gram matrix of (rows, cols) per-task gradients (ple_adatt.transfer.linalg)
    by column-slice width: the measuring step's one product of all task gradients."""
    from ple_adatt.transfer import linalg

    g = torch.randn(rows, cols, device=device, generator=torch.Generator(device=device).manual_seed(0))
    exact = (g.double() @ g.double().t())
    line, allowed = [], torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # as linalg.gram_matrix runs it
    for width in (1024, 2048, 4096, 16384, cols):
        for i in range(reps + 2):
            if i == 2:
                sync(device)
                t0 = time.perf_counter()
            out = linalg.sliced_gram(g, width)
        sync(device)
        err = float((out.double() - exact).abs().max() / exact.abs().max())
        line.append(f"{'whole' if width == cols else width} {(time.perf_counter() - t0) / reps * 1e6:.0f} us ({err:.0e})")
    torch.backends.cuda.matmul.allow_tf32 = allowed
    print(f"Gram matrix of {rows} x {cols} float32 task gradients, by slice width "
          f"(ours {linalg.GRAM_SLICE}): {', '.join(line)}", flush=True)


def time_interleaved(runs: dict[str, tuple[str, Callable[[], Prepared]]], steps: int, rounds: int,
                     device: torch.device, batch: int) -> dict[str, list[float]]:
    """Time every run ``rounds`` times, interleaved (a b c d, a b c d, ...), and print each
    run's median. Every run is built and warmed up once, in the first round, and stays alive,
    so that a later round times the same compiled and captured steps. Interleaving puts each
    round's runs under the same machine load; a ratio is taken within a round. Peak memory is
    the first round's, less what the runs built before it still hold. With one round each run
    is freed once timed, as before rounds existed."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    prepared: dict[str, Prepared] = {}
    peaks: dict[str, float] = {}
    warm: dict[str, float] = {}
    cuda = device.type == "cuda"
    start = torch.cuda.memory_allocated() if cuda else 0
    for r in range(rounds):
        for key, (label, prepare) in runs.items():
            if key not in prepared:
                others = (torch.cuda.memory_allocated() - start) / 2**30 if cuda else 0.0
                prep = prepared[key] = prepare()
                dt, peak, warm[key] = time_steps(prep.step, steps, prep.warmup, device, prep.peak_from_start)
                peaks[key] = peak - others
                if PROFILE_DIR is not None:
                    profile_steps(prep.step, device, label)
            else:
                dt, _, _ = time_steps(prepared[key].step, steps, 0, device)
            times[key].append(dt)
            if rounds == 1:  # nothing comes back to it: free its model, optimizer and graphs now
                prepared[key] = Prepared(lambda: None, prepared[key].params, 0)
                prep = None  # the last reference: the next run is built without this one
            if rounds > 1:
                print(f"  round {r + 1}/{rounds} {label[:3]} {dt * 1e3:.2f} ms/step", flush=True)
    for key, (label, _) in runs.items():
        med = statistics.median(times[key])
        mem = f"{peaks[key]:6.2f} GiB" if cuda else "   n/a   "
        spread = f"  rounds {min(times[key]) * 1e3:.2f}-{max(times[key]) * 1e3:.2f} ms" if rounds > 1 else ""
        print(f"{label:<48} {med * 1e3:9.2f} ms/step {batch / med / 1e6:8.4f} M samples/s "
              f"peak {mem}  params {prepared[key].params / 1e6:.2f}M  warm-up {warm[key]:.1f} s{spread}", flush=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 50)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3,
                    help="time every run this many times, interleaved (a b c d, a b c d, ...); prints the median "
                         "and each ratio's median over rounds (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs; default: torch's)")
    ap.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    ap.add_argument("--batch", type=int, default=None, help="override the shape's batch size")
    ap.add_argument("--only", default="abcd", help="which runs, e.g. 'bd' (default abcd; e: interval 1 with the "
                                                      "seed's separate backward, transfer.measure_in_backward=false; "
                                                      "f: (b) with the experts' biases in their layers; "
                                                      "g: (b) with the towers' bias and ReLU in PyTorch; "
                                                      "h: (b) with the experts' ReLU masks by a pass; "
                                                      "i: (b) with the heads as a GEMM after the towers; "
                                                      "j: (d) with the measurement on a second stream; "
                                                      "k: (j) with the side stream at normal priority; "
                                                      "m: MGDA every step)")
    ap.add_argument("--profile", type=Path, default=None, help="write per-kernel time tables of each run here")
    ap.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                    help="training.compile: torch.compile trunk, heads, losses (MODE: default, reduce-overhead "
                         "= CUDA graphs, max-autotune, max-autotune-no-cudagraphs)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="training.cuda_graph: capture each whole project step as a CUDA graph and replay it")
    ap.add_argument("--no-fused-mixture", action="store_true",
                    help="training.fused_mixture: false: the CGC mixture in PyTorch, not in the Triton kernels")
    ap.add_argument("--grads", action="store_true", help="also time the per-task gradient methods and compare "
                                                         "their affinity with the loop reference, and the CGC "
                                                         "mixture's fused kernels against PyTorch")
    args = ap.parse_args()
    global PROFILE_DIR, COMPILE, CUDA_GRAPH, FUSED_MIXTURE
    PROFILE_DIR = args.profile
    COMPILE = args.compile
    CUDA_GRAPH = args.cuda_graph
    FUSED_MIXTURE = not args.no_fused_mixture
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here (torch "
                 f"{torch.__version__}); use --device cpu or auto, or run on a GPU box")
    if CUDA_GRAPH and device.type != "cuda":
        ap.error("--cuda-graph needs a CUDA device (this run is on the CPU)")
    if device.type == "cuda":  # what the Trainer sets (seed 12.3), here before (a) runs too: the same matmuls for all
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    s = dict(SHAPES[args.shape])
    if args.batch:
        s["batch"] = args.batch
    if args.rounds < 1 or args.warmup < 0 or (args.steps is not None and args.steps < 1):
        ap.error("--rounds and --steps must be at least 1, --warmup at least 0")
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    steps = args.steps or 50
    amp = not args.no_amp
    data = make_data(s, s["batch"] * 8, device)
    print(f"shape {args.shape}: {s['tasks']} tasks, batch {s['batch']}, device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, amp {'bf16' if amp and device.type == 'cuda' else 'off'}"
          f"{', compile ' + COMPILE if COMPILE else ''}{', CUDA graphs' if CUDA_GRAPH else ''}"
          f", {steps} steps x {args.rounds} rounds{load_average()}", flush=True)
    if args.grads:
        task_gradient_check(s, data, device, amp)
        mixture_check(s, device)
        specs = [TaskSpec(f"t{i}", f"y{i}", "binary") for i in range(s["tasks"])]
        shared = build_system(project_config(s, 1, amp), specs, s["numeric"], [s["card"]] * s["cats"], 8).model
        gram_check(s["tasks"], sum(p.numel() for p in shared.shared_parameters()), device)
    runs = {
        "a": ("(a) naive reference, adaTT loop, interval 10",
              lambda: prepare_naive(s, data, device, 10, amp, args.warmup)),
        "b": ("(b) project model, adaTT off",
              lambda: prepare_project(s, data, device, False, 10, amp, args.warmup)),
        "c": ("(c) project model, adaTT interval 10",
              lambda: prepare_project(s, data, device, True, 10, amp, args.warmup)),
        "d": ("(d) project model, adaTT interval 1",
              lambda: prepare_project(s, data, device, True, 1, amp, args.warmup)),
        "e": ("(e) interval 1, separate backward (seed order)",
              lambda: prepare_project(s, data, device, True, 1, amp, args.warmup, in_backward=False)),
        "f": ("(f) adaTT off, expert biases in their layers",
              lambda: prepare_project(s, data, device, False, 10, amp, args.warmup, mixture_biases=False)),
        "g": ("(g) adaTT off, towers' bias and ReLU in PyTorch",
              lambda: prepare_project(s, data, device, False, 10, amp, args.warmup, fused_tower=False)),
        "h": ("(h) adaTT off, experts' ReLU masks by a pass",
              lambda: prepare_project(s, data, device, False, 10, amp, args.warmup, fused_relu_dgrad=False)),
        "i": ("(i) adaTT off, heads as a GEMM after the towers",
              lambda: prepare_project(s, data, device, False, 10, amp, args.warmup, fused_head=False)),
        "j": ("(j) interval 1, measurement on a second stream",
              lambda: prepare_project(s, data, device, True, 1, amp, args.warmup, stream=True)),
        "k": ("(k) as (j), side stream at normal priority",
              lambda: prepare_project(s, data, device, True, 1, amp, args.warmup, stream=True, side_priority=0)),
        "m": ("(m) MGDA every step",
              lambda: prepare_project(s, data, device, True, 1, amp, args.warmup, strategy="mgda")),
    }
    unknown = sorted(set(args.only) - set(runs))
    if unknown:
        ap.error(f"--only: unknown run(s) {unknown}; valid: {', '.join(runs)}")
    order = sorted(set(args.only))
    if COMPILE in ("reduce-overhead", "max-autotune") and args.rounds > 1:
        # torch.compile's CUDA graph trees share one memory pool across the compiled models, and
        # a model replayed after another's graphs ran re-records or finds its outputs overwritten
        print(f"note: --compile {COMPILE} times one round (not {args.rounds}): its CUDA graph trees "
              "cannot interleave models", flush=True)
        args.rounds = 1
    times = time_interleaved({k: runs[k] for k in order}, steps, args.rounds, device, s["batch"])
    ratios = []
    for num, den, text in [("a", "c", "(c) vs (a) {}x faster"), ("a", "b", "(b) vs (a) {}x"),
                           ("d", "b", "(d) step / (b) step {}x"), ("c", "b", "(c) step / (b) step {}x"),
                           ("e", "b", "(e) step / (b) step {}x"), ("f", "b", "(f) step / (b) step {}x"),
                           ("g", "b", "(g) step / (b) step {}x"), ("h", "b", "(h) step / (b) step {}x"),
                           ("i", "b", "(i) step / (b) step {}x"), ("j", "b", "(j) step / (b) step {}x"),
                           ("j", "d", "(j) step / (d) step {}x"), ("k", "j", "(k) step / (j) step {}x"),
                           ("m", "d", "(m) step / (d) step {}x")]:
        if num in times and den in times:
            paired = [n / d for n, d in zip(times[num], times[den], strict=True)]  # the same round: same load
            spread = f" [{min(paired):.2f}-{max(paired):.2f}]" if len(paired) > 1 else ""
            ratios.append(text.format(f"{statistics.median(paired):.2f}") + spread)
    if ratios:
        rounds = f" (median of {args.rounds} rounds' paired ratios [min-max])" if args.rounds > 1 else ""
        print(f"ratios{rounds}: " + "; ".join(ratios))
    print(f"CGC mixture: {mixture_path(device)}")
    from ple_adatt import relu_dgrad, towers

    for guard in (towers.GUARD, towers.HEAD_GUARD, relu_dgrad.GUARD):  # an A/B would time PyTorch against PyTorch
        if guard.failed():
            print(f"{guard.what}: off, {guard.fallback} instead ({guard.reason()})")


def load_average() -> str:
    """The 1-minute load average, where the OS has one: CPU timings move with other work."""
    try:
        return f", load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    except (AttributeError, OSError):
        return ""


def mixture_path(device: torch.device) -> str:
    """Which CGC mixture the project runs took (ple_adatt.mixture), and why."""
    from ple_adatt import mixture

    if not FUSED_MIXTURE:
        return "PyTorch (--no-fused-mixture)"
    if mixture.failed():
        return f"PyTorch: the fused kernels were switched off ({mixture.GUARD.reason()})"
    if COMPILE is not None:
        return "PyTorch, fused by torch.compile"
    return "fused Triton kernels" if mixture.fused_available(device) else f"PyTorch (no fused kernels on {device.type})"


if __name__ == "__main__":
    main()
