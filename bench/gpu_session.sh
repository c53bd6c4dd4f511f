#!/usr/bin/env bash
# Every GPU measurement of the Phase 1 performance work (issue 8), for a lent GPU box that has
# torch and triton but not this project's other dependencies. Run from the repository root:
#
#   bash bench/gpu_session.sh [OUTDIR] [PARTS]   # OUTDIR defaults to $OUT, else runs/gpu-session
#
# PARTS (default "tests eager graphs", about 10-15 minutes on an H100 in all) picks what runs;
# where one device call is limited to 10 minutes, run the three parts as three calls.
#   tests   session.txt: device, versions, the GPU tests' summaries: the CUDA-graph tests first,
#           then the rest of test_gpu.py, then test_compile.py; gpu_tests*.log: whole outputs
#   eager   bench_eager.txt: runs a-e, j (the measurement on a second stream) and m (MGDA) with
#           the per-task gradient check, then b and d with the
#           CGC mixture in PyTorch (--no-fused-mixture); prof/profile_*.txt: kernel-time
#           tables of the eager runs
#   graphs  bench_graphs.txt: runs a-d, the A/Bs f-i, the second stream j-k and MGDA m with
#           whole-step CUDA graphs (production.yaml's steps),
#           then over torch.compile default, then b-d with torch.compile reduce-overhead; (a),
#           the naive reference, always runs eagerly, so each line's (c)/(a) is in-run
# Each command has its own time limit, so a hang in one still leaves the others' output.
set -u
out=${1:-${OUT:-runs/gpu-session}}
parts=${2:-tests eager graphs}
if ! command -v nvidia-smi >/dev/null 2>&1 || ! python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "gpu_session.sh: needs an NVIDIA GPU (nvidia-smi) and python3 with a CUDA build of torch; not found here" >&2
  exit 2
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
bench=(timeout 300 python3 bench/train_throughput.py --shape seed --device cuda --steps 30)
if [[ " $parts " == *" tests "* ]]; then
  {
    date -u
    nvidia-smi -L
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    # whole logs (tracebacks included) in gpu_tests*.log, their ends here. The CUDA-graph tests
    # first and on their own (nothing else has checked real graph capture), then the rest of
    # test_gpu.py (autotuning: minutes with a cold Triton cache), then the compile tests; each
    # with its own limit, so that one slow group cannot leave the others unanswered
    pytest=(python3 -m pytest -q -p no:cacheprovider -m gpu)
    timeout 200 "${pytest[@]}" tests/core/test_gpu.py -k cuda_graph > "$out/gpu_tests_graphs.log" 2>&1
    echo "rc $? (cuda graph tests)"; tail -12 "$out/gpu_tests_graphs.log"
    timeout 240 "${pytest[@]}" tests/core/test_gpu.py -k "not cuda_graph" > "$out/gpu_tests.log" 2>&1
    echo "rc $? (other GPU tests)"; tail -15 "$out/gpu_tests.log"
    timeout 150 "${pytest[@]}" tests/core/test_compile.py > "$out/gpu_tests_compile.log" 2>&1
    echo "rc $? (compile tests)"; tail -8 "$out/gpu_tests_compile.log"
  } 2>&1 | tee "$out/session.txt"
fi
if [[ " $parts " == *" eager "* ]]; then
  "${bench[@]}" --only abcdejm --grads --profile "$out/prof" 2>&1 | grep -v -i warn | tee "$out/bench_eager.txt"
  # the plain and measuring steps with the CGC mixture in PyTorch, against the fused kernels above
  "${bench[@]}" --only bd --no-fused-mixture 2>&1 | grep -v -i warn | tail -4 | tee -a "$out/bench_eager.txt"
fi
if [[ " $parts " == *" graphs "* ]]; then
  # (f), (g), (h), (i): (b) with the experts' biases in their layers, with the towers' bias+ReLU in
  # PyTorch, with the experts' ReLU masks by a threshold pass, with the heads as a GEMM: the A/Bs
  for extra in "--only abcdfghijkm --cuda-graph" "--only abcd --cuda-graph --compile default" "--only bcd --compile reduce-overhead"; do
    # shellcheck disable=SC2086  # $extra holds several arguments
    "${bench[@]}" $extra 2>&1 | grep -v -i warn | grep -E "^\(|^ratios|^CGC|: off, "
  done | tee "$out/bench_graphs.txt"
fi
