"""The benchmarks run (their numbers are not checked here: speed targets live in bench/).

A bench that no longer matches the trainer's API fails here rather than on the next GPU."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_train_throughput_prints_every_run_and_the_ratios():
    out = _run("bench/train_throughput.py", "--steps", "2", "--warmup", "1", "--rounds", "2", "--threads", "1",
               "--only", "abcdefghijk", "--grads")
    assert "threads 1," in out and "2 steps x 2 rounds" in out
    order = re.findall(r"^  round [12]/2 \(([a-k])\) [\d.]+ ms/step$", out, re.M)
    assert order == list("abcdefghijk") * 2  # interleaved: every run once per round, under the same load
    for label in ("(a) naive reference", "(b) project model, adaTT off", "(c) project model, adaTT interval 10",
                  "(d) project model, adaTT interval 1", "(e) interval 1, separate backward",
                  "(f) adaTT off, expert biases in their layers", "(g) adaTT off, towers' bias and ReLU in PyTorch",
                  "(h) adaTT off, experts' ReLU masks by a pass", "(i) adaTT off, heads as a GEMM after the towers",
                  "(j) interval 1, measurement on a second stream", "(k) as (j), side stream at normal priority"):
        line = next(ln for ln in out.splitlines() if ln.startswith(label))
        assert float(re.search(r"([\d.]+) ms/step", line).group(1)) > 0
    # a ratio per round (the same machine load), their median and range
    assert re.search(r"ratios \(median of 2 rounds' paired ratios \[min-max\]\): \(c\) vs \(a\) [\d.]+x faster "
                     r"\[[\d.]+-[\d.]+\]", out)
    # the A/Bs of the experts' biases, the towers' kernel, the masked input gradient, the heads
    assert re.search(r"\(f\) step / \(b\) step [\d.]+x.*\(g\) step / \(b\) step [\d.]+x.*"
                     r"\(h\) step / \(b\) step [\d.]+x.*\(i\) step / \(b\) step [\d.]+x.*"
                     r"\(j\) step / \(b\) step [\d.]+x.*\(j\) step / \(d\) step [\d.]+x.*\(k\) step / \(j\) step [\d.]+x", out)
    # the Gram matrix by slice width: each width's time and its error against float64
    gram = re.search(r"Gram matrix of 16 x (\d+) float32 task gradients, by slice width \(ours \d+\): (.*)", out)
    assert gram and int(gram.group(1)) > 1000
    errors = [float(e) for e in re.findall(r"\d+ us \(([\d.e+-]+)\)", gram.group(2))]
    assert len(errors) == 5 and max(errors) < 1e-5
    diff = float(re.search(r"max \|affinity - loop\|: einsum ([\d.e+-]+)", out).group(1))
    assert diff < 1e-3
    assert "CGC mixture: fused kernels need CUDA and triton (here: cpu); not timed" in out
    assert "CGC mixture: PyTorch (no fused kernels on cpu)" in out


def test_train_throughput_refuses_cuda_graphs_without_cuda():
    res = subprocess.run([sys.executable, "bench/train_throughput.py", "--cuda-graph", "--device", "cpu"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--cuda-graph needs a CUDA device" in res.stderr


def test_roofline_counts_the_steps_kernels_flops_and_bytes():
    out = _run("bench/roofline.py", "--shape", "small", "--top", "100")
    steps = re.findall(r"\]: (\d+) kernels, (\d+) GFLOP, ([\d.]+) GB moved", out)
    assert len(steps) == 2
    (kb, _, gb_b), (kd, _, gb_d) = steps
    assert int(kd) > int(kb) > 50  # the measuring step adds the per-task gradient kernels
    assert float(gb_d) > float(gb_b) > 0
    assert "estimate on h100" in out
    assert out.count("fused_task_grads (Triton + gW2 GEMM, modelled)") == 1  # (d) costs the GPU kernels, (b) none
    assert out.count("expert_output_grads (Triton, modelled)") == 1
    # transfer.measure_stream's bound: the measurement forked after the ops before it, beside the rest
    split = re.search(r"per-task measurement ([\d.]+) ms, forked after ([\d.]+) ms beside ([\d.]+) ms of the rest "
                      r"\(transfer.measure_stream\): at best ([\d.]+) ms", out)
    assert split, out
    measure, before, after, best = map(float, split.groups())
    serial = float(re.findall(r"estimate on h100: ([\d.]+) ms of device work", out)[1])
    assert measure > 0 and before > 0 and after > 0
    assert before + measure + after == pytest.approx(serial, abs=0.005)  # the (d) step, split in three
    assert before + max(measure, after) <= best + 0.002 and best <= serial + 0.005
    einsum = _run("bench/roofline.py", "--shape", "small", "--only", "d", "--einsum-grads", "--top", "100")
    assert "fused_task_grads" not in einsum


def test_every_autotune_config_of_the_kernel_compiles_for_hopper_without_spills():
    """kernels.TILES lists only configs that ptxas compiles for sm_90 with warpgroup MMAs and
    no register spills (compiled here, ahead of time, with the ptxas triton ships)."""
    pytest.importorskip("triton", reason="triton is not installed (make setup installs it)")
    out = _run("bench/kernel_report.py", "--check")
    rows = [ln for ln in out.splitlines() if ln.startswith(("fused ", "split ", "split_bits "))]
    from ple_adatt import kernels

    assert len(rows) == sum(len(v) for v in kernels.TILES.values())
    elementwise = [ln.split()[0] for ln in out.splitlines() if ln.startswith(("mix_", "ds_kernel", "bits_kernel"))]
    assert elementwise == ["mix_forward", "mix_backward_shared", "mix_backward_task", "ds_kernel", "bits_kernel"]


@pytest.mark.parametrize("script,args,message", [
    ("bench/roofline.py", ["--only", "x"], "--only 'x': valid steps are b and d"),
    ("bench/kernel_report.py", ["--variants", "fusd"], "--variants: unknown ['fusd']; valid: fused, split"),
    ("bench/kernel_report.py", ["--tiles", "64x64"], "--tiles '64x64': expected BBxBHxWARPSxSTAGES"),
    ("bench/train_throughput.py", ["--rounds", "0"], "--rounds and --steps must be at least 1"),
])
def test_bench_scripts_refuse_a_mistyped_option_value_in_one_line(script, args, message):
    """A typo in a value once did nothing and exited 0 (roofline --only) or ended in a traceback."""
    res = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
