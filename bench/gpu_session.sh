#!/usr/bin/env bash
# Every GPU measurement of the Phase 1 performance work (issue 8) in one go, for one call on
# a lent GPU box that has torch and triton but not this project's other dependencies.
# About 6-8 minutes on an H100. Run from the repository root:
#
#   bash bench/gpu_session.sh [OUTDIR]        # OUTDIR defaults to $OUT, else runs/gpu-session
#
# Writes session.txt (device, versions, GPU tests), bench_eager.txt (runs a-e with the
# per-task gradient check), bench_graphs.txt (whole-step CUDA graphs, eager and with
# torch.compile default; torch.compile reduce-overhead) and prof/profile_*.txt (kernel-time
# tables of the eager runs).
set -u
out=${1:-${OUT:-runs/gpu-session}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
bench=(python3 bench/train_throughput.py --shape seed --device cuda --steps 30)
{
  date -u
  nvidia-smi -L
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/core/test_gpu.py tests/core/test_compile.py 2>&1 | tail -15
} 2>&1 | tee "$out/session.txt"
"${bench[@]}" --only abcde --grads --profile "$out/prof" 2>&1 | grep -v -i warn | tee "$out/bench_eager.txt"
for extra in "--cuda-graph" "--cuda-graph --compile default" "--compile reduce-overhead"; do
  # shellcheck disable=SC2086  # $extra holds several arguments
  "${bench[@]}" --only bcd $extra 2>&1 | grep -v -i warn | tail -5
done | tee "$out/bench_graphs.txt"
