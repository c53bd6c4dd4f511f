"""Where a training step's time must go: a per-op roofline estimate, computed on any machine.

    .venv/bin/python bench/roofline.py --shape seed           # the seed's shape, bf16 as on a GPU
    .venv/bin/python bench/roofline.py --shape seed --top 30 --gpu h100

Runs one plain step and one measuring step (adaTT per-task gradients) of the project's
trainer on the CPU -- under bf16 autocast unless ``--fp32``, the precision of the GPU runs --
and records every aten op the step dispatches, backward and optimizer included. For each op
it counts FLOPs (torch's flop formulas for matrix products) and bytes read and written
(every tensor argument and result; views move nothing), and estimates its time on a GPU as
``max(FLOPs / peak, bytes / bandwidth)`` plus a launch cost when run eagerly. These are
estimates, not measurements (bench/train_throughput.py measures); they say which ops move
the most memory, how far a step is from its floor, and what a CUDA graph can save. The same
op count is what ``training.cuda_graph`` replays with one launch.

On the CPU the per-task gradients run as einsums; on CUDA under autocast the fused Triton
kernel (``ple_adatt.kernels``) does that work without writing ``dh``. Unless
``--einsum-grads``, the measuring step's einsums are left out and the kernel is costed
instead, from its FLOPs and the bytes it must read and write once (its ideal).

The CGC mixture likewise: on CUDA it runs as fused Triton kernels (``ple_adatt.mixture``),
costed here from the bytes they read and write once. ``--no-fused-mixture`` records the
PyTorch form instead, with the gates in float32 as CUDA's autocast leaves them (its softmax
runs in float32; the CPU's autocast keeps it in bf16).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import train_throughput as tt  # noqa: E402

from ple_adatt import mixture, relu_dgrad, towers  # noqa: E402
from ple_adatt.config import TaskSpec  # noqa: E402
from ple_adatt.training import Trainer, build_system, make_optimizer  # noqa: E402

# dense bf16 tensor-core FLOP/s (as sustained by large GEMMs) and HBM bytes/s, per GPU
GPUS = {"h100": (600e12, 3.0e12), "h200": (600e12, 4.2e12)}
LAUNCH_S = 4e-6  # eager launch cost per kernel (CPU-side dispatch + launch)
VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "select", "slice", "unsqueeze", "squeeze",
         "detach", "alias", "as_strided", "split", "split_with_sizes", "unbind", "chunk", "narrow", "diagonal",
         "lift_fresh", "unflatten", "_reshape_alias", "reshape", "view_as",
         "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}  # (allocations move nothing)


# the first layers' GEMM with its ReLU in the epilogue counts as the addmm it is
ADDMM, ADDMM_ACTIVATION = torch.ops.aten.addmm, torch.ops.aten._addmm_activation


class OpRecorder(TorchDispatchMode):
    """Per aten op: calls, FLOPs, bytes read + written, and the estimated time on ``gpu``
    (the roofline of each call, summed)."""

    def __init__(self, gpu: str) -> None:
        super().__init__()
        self.peak, self.bw = GPUS[gpu]
        self.est: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.flops: dict[str, float] = defaultdict(float)
        self.bytes: dict[str, float] = defaultdict(float)
        self.kernels = 0
        self.paused = False
        self.measuring = False  # inside the per-task measurement (what transfer.measure_stream forks)
        self.measure_est = 0.0
        self.after_est = 0.0  # the ops after it: the rest of the backward and the optimizer step

    @contextlib.contextmanager
    def unrecorded(self):
        """Ops run inside are not recorded: the reference computation of a modelled kernel."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    @contextlib.contextmanager
    def measurement(self):
        """Ops run inside are the per-task measurement, which a second stream can overlap."""
        self.measuring = True
        try:
            yield
        finally:
            self.measuring = False
            self.after_est = 0.0  # counts from here

    def add(self, name: str, flops: float, moved: float) -> None:
        self.calls[name] += 1
        self.kernels += 1
        self.flops[name] += flops
        self.bytes[name] += moved
        est = max(flops / self.peak, moved / self.bw)
        self.est[name] += est
        if self.measuring:
            self.measure_est += est
        else:
            self.after_est += est

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in VIEWS or self.paused:
            return out
        tensors = {id(t): t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)}
        moved = sum(t.numel() * t.element_size() for t in tensors.values())
        packet = ADDMM if func.overloadpacket is ADDMM_ACTIVATION else func.overloadpacket
        flops = flop_registry[packet](*args[:3], out_val=out) if packet is ADDMM else \
            flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        self.add(name, flops, moved)
        return out


def cost_fused_kernel(model, rec: OpRecorder) -> None:
    """Cost the per-task gradients as the fused kernel instead of the CPU's einsums."""
    einsums = model.task_gradients_from_cgc

    def modelled(d_cgc, output, method="batched", w2=None):
        with rec.unrecorded():
            grads = einsums(d_cgc, output, "einsum", w2)
        x, pre, _ = output.shared_cache
        (E, B, H), (T, _, D), IN = pre.shape, d_cgc.shape, x.shape[1]
        half = 2  # bf16 operands
        ds = E * B * T * D * half  # every task's gradient at every expert's output, written once
        # kernels.expert_output_grads: dL/dcgc read once per expert, the float32 gates, ds written
        rec.add("expert_output_grads (Triton, modelled)", 0, E * T * B * D * half + T * B * E * 4 + ds)
        flops = 2 * B * T * E * (IN * H + 2 * H * D)  # dh, gW1, gW2 per task and expert
        # the kernel reads x, the hidden layer, ds and w2 once and writes the (T, P) float32
        # gradients; the split variant's gW2 GEMM reads the hidden layer and ds again
        moved = (B * IN + E * B * H + E * H * D) * half + ds + grads.numel() * 4 + E * B * H * half + ds
        rec.add("fused_task_grads (Triton + gW2 GEMM, modelled)", flops, moved)
        return grads

    model.task_gradients_from_cgc = modelled


def cost_fused_mixture(rec: OpRecorder, fused: bool) -> None:
    """Cost the CGC mixture as the fused kernels (their ideal traffic), or record the PyTorch
    form with CUDA autocast's float32 gates. Undone by :func:`restore_mixture`."""

    class Modelled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, gates, shared, task, shared_bias, task_bias):
            with rec.unrecorded():
                out = mixture.reference_mixture(gates, shared, task, shared_bias, task_bias)
            ctx.save_for_backward(gates, shared, task, shared_bias, task_bias)
            T, B, K = gates.shape
            experts = shared.numel() + (0 if task is None else task.numel())
            rec.add("fused_cgc_mixture (Triton, modelled)", 2 * T * B * K * shared.shape[-1],
                    T * B * K * 4 + (experts + out.numel()) * shared.element_size())
            return out

        @staticmethod
        def backward(ctx, d_out):
            saved = ctx.saved_tensors
            given = [t is not None for t in saved]
            ins = [t.detach().requires_grad_() for t in saved if t is not None]
            with rec.unrecorded(), torch.enable_grad():
                it = iter(ins)
                out = mixture.reference_mixture(*(next(it) if g else None for g in given))
                grads = iter(torch.autograd.grad(out, ins, d_out))
            gates, shared, task = saved[:3]
            T, B, K = gates.shape
            experts = shared.numel() + (0 if task is None else task.numel())
            # both kernels read dL/dcgc; each reads its experts and gates and writes their
            # gradients (the bias gradients' per-block sums are small: left out)
            moved = (2 * d_out.numel() + 2 * experts) * shared.element_size() + 2 * T * B * K * 4
            rec.add("fused_cgc_mixture backward (Triton, modelled)", 4 * T * B * K * shared.shape[-1], moved)
            return tuple(next(grads) if g else None for g in given)

    if fused:
        mixture.gated_mixture = lambda gates, shared, task, fused=True, shared_bias=None, task_bias=None: \
            Modelled.apply(gates, shared, task, shared_bias, task_bias)
    else:
        mixture.gated_mixture = lambda gates, shared, task, fused=True, *biases: mixture.reference_mixture(
            gates.float(), shared, task, *biases)


def cost_fused_tower(rec: OpRecorder) -> None:
    """Cost the towers' bias+ReLU as the fused kernel's traffic (forward: read the GEMM's output
    and write the layer's; backward: read the gradient and the output, write the input's
    gradient; the bias gradients' per-block sums are small: left out). Undone by
    :func:`restore_mixture`."""

    class Modelled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, bias):
            with rec.unrecorded():
                out = torch.relu(x + bias.to(x.dtype))
            ctx.save_for_backward(out)
            rec.add("fused_tower_bias_relu (Triton, modelled)", 2 * x.numel(), 2 * x.numel() * x.element_size())
            return out

        @staticmethod
        def backward(ctx, grad):
            (out,) = ctx.saved_tensors
            with rec.unrecorded():
                d_x = grad * (out > 0)
                d_b = d_x.float().sum(1, keepdim=True)
            rec.add("fused_tower_bias_relu backward (Triton, modelled)", 2 * out.numel(),
                    3 * out.numel() * out.element_size())
            return d_x, d_b

    class ModelledHead(torch.autograd.Function):
        """The towers' kernel with the heads summed in it (towers.tower_head): the forward reads
        the GEMM's output and writes the hidden layer (the heads' outputs are small); the backward
        reads the hidden layer and writes the input's gradient, the hidden layer's own gradient
        never leaving the kernel."""

        @staticmethod
        def forward(ctx, x, bias, head_weight, head_bias):
            with rec.unrecorded():
                hid = torch.relu(x + bias.to(x.dtype))
                out = torch.baddbmm(head_bias.to(x.dtype), hid, head_weight.to(x.dtype))
            ctx.save_for_backward(hid, head_weight)
            rec.add("fused_tower_head (Triton, modelled)", 2 * x.numel() * (1 + out.shape[-1]),
                    2 * x.numel() * x.element_size())
            return out

        @staticmethod
        def backward(ctx, grad):
            hid, head_weight = ctx.saved_tensors
            with rec.unrecorded():
                d_x = (grad @ head_weight.to(grad.dtype).transpose(1, 2)) * (hid > 0)
                grads = (d_x, d_x.float().sum(1, keepdim=True), (hid.transpose(1, 2) @ grad).float(),
                         grad.float().sum(1, keepdim=True))
            rec.add("fused_tower_head backward (Triton, modelled)", 4 * hid.numel() * grad.shape[-1],
                    2 * hid.numel() * hid.element_size())
            return grads

    towers.tower_layer = lambda cgc, weight, bias, fused=True: (
        Modelled.apply(torch.bmm(cgc, weight), bias) if fused else towers.reference_tower_layer(cgc, weight, bias))
    towers.tower_head = lambda cgc, weight, bias, head_weight, head_bias, fused=True: (
        ModelledHead.apply(torch.bmm(cgc, weight), bias, head_weight, head_bias) if fused
        else towers.reference_tower_head(cgc, weight, bias, head_weight, head_bias))


def cost_fused_dgrad(rec: OpRecorder) -> None:
    """Cost the experts' masked input gradient as the fused kernel's traffic (read the output
    gradient, the weight and the hidden layer's sign; write the masked gradient once), where
    PyTorch writes the product and a threshold pass reads it back. Undone by
    :func:`restore_mixture`."""

    def modelled(grad, weight, x, fused=True):
        with rec.unrecorded():
            out = relu_dgrad.reference_masked_input_grad(grad, weight, x)
        G, B, o = grad.shape
        i = weight.shape[1]
        size = x.element_size()
        rec.add("fused_masked_input_grad (Triton, modelled)", 2 * G * B * i * o,
                (grad.numel() + weight.numel() + 2 * x.numel()) * size)
        return out

    relu_dgrad.masked_input_grad = modelled


_GATED_MIXTURE = mixture.gated_mixture
_TOWER_LAYER = towers.tower_layer
_TOWER_HEAD = towers.tower_head
_MASKED_INPUT_GRAD = relu_dgrad.masked_input_grad


def restore_mixture() -> None:
    mixture.gated_mixture = _GATED_MIXTURE
    towers.tower_layer = _TOWER_LAYER
    towers.tower_head = _TOWER_HEAD
    relu_dgrad.masked_input_grad = _MASKED_INPUT_GRAD


def record_step(s: dict, adatt: bool, measure: bool, bf16: bool, gpu: str, kernel: bool = True,
                fused_mixture: bool = True) -> OpRecorder:
    # the measurement launched from the backward's hook, as transfer.measure_stream runs it (on
    # the CPU in place, in order): what comes after it in the record is what a second stream overlaps
    cfg = tt.project_config(s, 1, False, stream=True)
    specs = [TaskSpec(f"t{i}", f"y{i}", "binary") for i in range(s["tasks"])]
    torch.manual_seed(0)
    data = tt.make_data(s, s["batch"], torch.device("cpu"))
    system = build_system(cfg, specs, s["numeric"], [s["card"]] * s["cats"], 8)
    if not adatt:
        system.transfer = None
    trainer = Trainer(system, data, data.subset(torch.arange(8)), cfg, torch.device("cpu"), log=lambda m: None)
    trainer.sync_free = True  # the GPU step
    system.model.gpu_layers = True  # and its layers (the CPU's are chosen by device)
    system.model.fused_mixture = fused_mixture  # training.fused_mixture (the experts' biases follow it)
    if bf16:  # the autocast of the GPU runs
        trainer._autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    opt, scaler = make_optimizer(system, cfg, fused=True), trainer.make_scaler()
    trainer.train_step(data, 1, False, opt, scaler, measure=measure)  # optimizer state
    rec = OpRecorder(gpu)
    observe = trainer._observe

    def observe_recorded(*args, **kwargs):
        with rec.measurement():
            observe(*args, **kwargs)

    trainer._observe = observe_recorded
    if kernel:
        cost_fused_kernel(system.model, rec)
    cost_fused_mixture(rec, fused_mixture)
    if fused_mixture:  # the Triton kernels around the GEMMs: the mixture's, the towers', the experts' dgrad
        cost_fused_tower(rec)
        cost_fused_dgrad(rec)
    try:
        with rec:
            trainer.train_step(data, 1, False, opt, scaler, measure=measure)
    finally:
        restore_mixture()
    return rec


def report(label: str, rec: OpRecorder, gpu: str, top: int) -> None:
    peak, bw = GPUS[gpu]
    est = rec.est
    flops, moved = sum(rec.flops.values()), sum(rec.bytes.values())
    busy = sum(est.values())
    print(f"\n{label}: {rec.kernels} kernels, {flops / 1e9:.0f} GFLOP, {moved / 1e9:.2f} GB moved")
    print(f"  estimate on {gpu}: {busy * 1e3:.2f} ms of device work; eager adds about "
          f"{rec.kernels * LAUNCH_S * 1e3:.1f} ms of launches where they do not overlap "
          f"(a CUDA graph: one); floors {flops / peak * 1e3:.2f} ms (FLOPs) / {moved / bw * 1e3:.2f} ms (bytes)")
    if rec.measure_est:  # transfer.measure_stream: the measurement beside the rest of the step
        after, before = rec.after_est, busy - rec.measure_est - rec.after_est
        bound = max(before + max(after, rec.measure_est), flops / peak, moved / bw)
        print(f"  of it the per-task measurement {rec.measure_est * 1e3:.3f} ms, forked after {before * 1e3:.3f} ms "
              f"beside {after * 1e3:.3f} ms of the rest (transfer.measure_stream): at best {bound * 1e3:.3f} ms "
              "if they overlapped perfectly (or a floor)")
    print(f"  {'op':<44}{'calls':>6}{'GFLOP':>9}{'GB':>8}{'est ms':>8}  bound")
    for n in sorted(est, key=est.get, reverse=True)[:top]:
        bound = "compute" if rec.flops[n] / peak > rec.bytes[n] / bw else "memory"  # of the op's total
        print(f"  {n:<44}{rec.calls[n]:>6}{rec.flops[n] / 1e9:>9.1f}{rec.bytes[n] / 1e9:>8.2f}"
              f"{est[n] * 1e3:>8.3f}  {bound}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(tt.SHAPES), default="seed")
    ap.add_argument("--batch", type=int, default=None, help="override the shape's batch size")
    ap.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    ap.add_argument("--top", type=int, default=15, help="ops to list per step")
    ap.add_argument("--only", default="bd", help="which steps: b (plain, adaTT off), d (measuring, adaTT on)")
    ap.add_argument("--einsum-grads", action="store_true",
                    help="cost the per-task gradients as the CPU's einsums, not as the fused GPU kernel")
    ap.add_argument("--no-fused-mixture", action="store_true",
                    help="record the CGC mixture in PyTorch (float32 gates, as under CUDA autocast), "
                         "not costed as the fused kernels")
    ap.add_argument("--fp32", action="store_true", help="record without bf16 autocast")
    args = ap.parse_args()
    unknown = sorted(set(args.only) - set("bd"))
    if unknown or not args.only:
        ap.error(f"--only {args.only!r}: valid steps are b and d (e.g. --only bd); unknown: {unknown}")
    if args.top < 1:
        ap.error(f"--top must be at least 1, got {args.top}")
    s = dict(tt.SHAPES[args.shape])
    if args.batch:
        s["batch"] = args.batch
    print(f"shape {args.shape}: {s['tasks']} tasks, batch {s['batch']}, {'fp32' if args.fp32 else 'bf16 autocast'}; "
          f"recorded on the CPU, estimated for {args.gpu} ({GPUS[args.gpu][0] / 1e12:.0f} TFLOP/s, "
          f"{GPUS[args.gpu][1] / 1e12:.1f} TB/s)", flush=True)
    for key, label, adatt, measure in [("b", "(b) plain step, adaTT off", False, False),
                                       ("d", "(d) measuring step, adaTT on", True, True)]:
        if key not in args.only:
            continue
        t0 = time.perf_counter()
        rec = record_step(s, adatt, measure, not args.fp32, args.gpu, kernel=not args.einsum_grads,
                          fused_mixture=not args.no_fused_mixture)
        report(f"{label} [recorded in {time.perf_counter() - t0:.0f} s]", rec, args.gpu, args.top)


if __name__ == "__main__":
    main()
