"""The fused kernel's resource report for Hopper, compiled here without a GPU.

    .venv/bin/python bench/kernel_report.py              # the autotuner's configs (kernels.TILES)
    .venv/bin/python bench/kernel_report.py --tiles 64x64x4x3,128x64x8x2   # others, for every variant/layout
    .venv/bin/python bench/kernel_report.py --check      # exit 1 if a listed config spills or has no HGMMA

Triton compiles the kernel ahead of time for a GPU target (``sm_90`` = H100/H200 by default)
with the ptxas it ships; no device is needed. For each variant (``fused``, ``split``), tile
layout (``hrows``, ``brows``) and tile configuration (BB x BH x warps x stages) it prints the
registers per thread, the stack frame, the spill instructions in the SASS (``STL``/``LDL``:
registers that went to local memory, much slower), the shared memory, and the matrix
instructions (``HGMMA`` is Hopper's warpgroup MMA; ``HMMA`` alone is the older, slower path).
These are the compiler's facts, not timings: a config that spills is slow on any H100, and
the autotuner's list should not need to find that out on the device.

The CGC mixture's three kernels (``ple_adatt.mixture``: forward, backward over the shared
experts, backward over the task experts) and the per-task gradients' ds kernel
(``kernels.expert_output_grads``) are elementwise, with no matrix instructions; they are listed
with their registers and spills, and ``--check`` fails on a spill there too; so is the
``split_bits`` variant's mask-packing kernel (``kernels.relu_mask_bits``). So is MGDA's
device min-norm solver (``ple_adatt.transfer.min_norm``, one program holding a float64 tile of
2 to 64 tasks), at the warps it launches with.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ple_adatt import kernels, mixture, relu_dgrad, towers  # noqa: E402
from ple_adatt.transfer import min_norm  # noqa: E402

# the seed's shape: shared experts 100 -> 1024 -> 128
IN, D = 100, 128
INT_ARGS = ["B", "IN", "H", "D", "P", "PE", "s_xb", "s_pe", "s_pb", "s_de", "s_db", "s_dt"]
# The integer arguments' values at the seed's shape (batch 16384, 16 tasks, 4 shared experts of
# width 1024, 2 task experts each: 6 gate columns; pre is a (B, E*H) GEMM output seen as
# (E, B, H); x padded to 128 columns; ds, each task's gradient at each expert's output, is
# (E, B, T, D) for 16 tasks). The JIT specialises on them as the compile below does:
# a value divisible by 16 (and every pointer: PyTorch allocations are 16-byte aligned) is
# marked so, which is what lets loads vectorise, and a value of 1 becomes a constant.
_B, _H, _E, _K, _PE, _TASKS = 16384, 1024, 4, 6, IN * 1024 + 1024 + 1024 * D + D, 16
SEED_INTS = dict(B=_B, IN=IN, H=_H, D=D, P=_E * _PE, PE=_PE, s_xb=kernels._pow2(IN), s_pe=_H, s_pb=_E * _H,
                 s_de=_B * _TASKS * D, s_db=_TASKS * D, s_dt=D)
# under bf16 autocast: x, pre, w2, dL/dcgc in bf16; the gates come out of a float32 softmax
POINTERS = {"x_ptr": "*bf16", "pre_ptr": "*bf16", "w2_ptr": "*bf16", "ds_ptr": "*bf16", "out_ptr": "*fp32"}


def tools() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_one(variant: str, layout: str, bb: int, bh: int, warps: int, stages: int, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bits = variant == "split_bits"
    fn = kernels._kernel((layout,), variant == "fused", bits).fn
    consts = dict(BI=kernels._pow2(IN), BD=kernels._pow2(D), PREC="tf32", WITH_W2=variant == "fused",
                  ONES_COL=kernels._pow2(IN) > IN,
                  BB=bb, BH=bh, HROWS=layout == "hrows", MASK_BITS=bits)
    # the packed mask (E, B / 32, H) int32: its strides in place of the hidden layer's
    seed = {**SEED_INTS, **({"s_pe": _B // 32 * _H, "s_pb": _H} if bits else {})}
    consts.update({k: 1 for k in INT_ARGS if seed[k] == 1})
    ints = [k for k in INT_ARGS if k not in consts]
    sig = {**POINTERS, **({"pre_ptr": "*i32"} if bits else {}), **{k: "i32" for k in ints},
           **{k: "constexpr" for k in consts}}
    aligned = [*POINTERS, *(k for k in ints if seed[k] % 16 == 0)]
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs={(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    return _resources(ck)


def _resources(ck) -> dict:
    """Registers, stack, spill and MMA instruction counts, shared memory of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        usage = subprocess.run([tools() / "cuobjdump", "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([tools() / "cuobjdump", "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    ops = Counter(re.findall(r"\b(HGMMA|HMMA|STL|LDL)\b", sass))
    return dict(regs=regs, stack=stack, spill_st=ops["STL"], spill_ld=ops["LDL"], hgmma=ops["HGMMA"],
                hmma=ops["HMMA"], shared=ck.metadata.shared)


# the elementwise kernels' pointers under bf16 autocast: float32 gates (the softmax), their
# gradient, and the ds kernel's per-block sums
# gates, sums, biases (parameters stay float32 under autocast)
FP32_POINTERS = ("g_ptr", "dg_ptr", "sum_ptr", "sb_ptr", "tb_ptr", "sbp_ptr", "tbp_ptr", "b_ptr", "part_ptr",
                 "hw_ptr", "hb_ptr", "pb_ptr", "pw_ptr")
INT32_POINTERS = ("words_ptr",)  # the packed ReLU mask's words
# their integer arguments at the seed's shape (16 tasks; gates and their gradient (T, B, 6);
# experts, task experts, outputs and their gradients contiguous; ds (E, B, T, D)), for the
# JIT's specialisation
_T, _ET = _TASKS, 2
ELEMENTWISE_INTS = dict(T=_T, B=_B, D=D, E=_E, ET=_ET, s_gt=_B * _K, s_gb=_K, s_gk=1, s_dgt=_B * _K, s_dgb=_K,
                        s_dgk=1, s_se=_B * D, s_sb=D, s_tt=_ET * _B * D, s_tk=_B * D, s_tb=D, s_dtt=_ET * _B * D,
                        s_dtk=_B * D, s_dtb=D, s_ot=_B * D, s_ob=D, s_dot=_B * D, s_dob=D,
                        s_dt=_B * D, s_db=D, s_oe=_B * _T * D)
DS_INTS = {**ELEMENTWISE_INTS, "s_ob": _T * D, "s_ot": D}  # the ds kernel's (E, B, T, D) output strides
TOWER_H = 256  # the seed's tower width
TOWER_INTS = dict(B=_B, H=TOWER_H)


def compile_elementwise(arch: int) -> dict[str, dict]:
    """The CGC mixture's kernels and the per-task gradients' ds kernel, each at the block size
    and warps it launches with, for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    wide = dict(BD=kernels._pow2(D))
    launches = [(jit, mixture.BLOCK_ROWS, mixture.NUM_WARPS, ELEMENTWISE_INTS, wide) for jit in mixture._kernels()]
    launches.append((kernels._ds_kernel(), kernels.DS_ROWS, 4, DS_INTS, wide))  # triton's default warps
    launches += [(jit, towers.BLOCK_ROWS, towers.NUM_WARPS, TOWER_INTS, dict(BH=kernels._pow2(TOWER_H)))
                 for jit in towers._kernels()]
    # the towers' kernels with the heads summed in them, one output per task as at the seed's shape
    launches += [(jit, towers.BLOCK_ROWS, towers.NUM_WARPS, TOWER_INTS, dict(BH=kernels._pow2(TOWER_H), NO=1))
                 for jit in towers._head_kernels()]
    # the ReLU mask's packing kernel (the split_bits variant): 32 rows of the hidden layer a word
    launches.append((kernels._bits_kernel(), None, 4, dict(B=_B, H=_H, s_pe=_H, s_pb=_E * _H, s_oe=_B // 32 * _H,
                                                            s_ow=_H), dict(BH=kernels.BITS_COLS)))
    found = {}
    for jit, rows, warps, ints, width in launches:
        consts = dict(BB=rows, **width) if rows else dict(width)
        if "HAS_BIAS" in jit.arg_names:  # the GPU's layers leave the experts' biases to the mixture
            consts["HAS_BIAS"] = True
        consts.update({a: 1 for a in jit.arg_names if ints.get(a) == 1})
        sig = {a: ("constexpr" if a in consts else "*fp32" if a in FP32_POINTERS else "*i32" if a in INT32_POINTERS
                   else "*bf16" if a.endswith("_ptr") else "i32") for a in jit.arg_names}
        aligned = [a for a in jit.arg_names
                   if a not in consts and (a.endswith("_ptr") or ints[a] % 16 == 0)]
        src = ASTSource(fn=jit, signature=sig, constexprs={(jit.arg_names.index(k),): v for k, v in consts.items()},
                        attrs={(jit.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned})
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": 1})
        found[jit.__name__] = _resources(ck)
    return found


def compile_min_norm(arch: int) -> dict[int, dict]:
    """MGDA's device min-norm solver for each tile side it launches with, for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = min_norm._kernel()
    kinds = {"m_ptr": "*fp32", "present_ptr": "*i8", "out_ptr": "*fp32", "info_ptr": "*i32", "tol": "fp32",
             "ridge": "fp32"}
    found = {}
    for bt in (2, 4, 8, 16, 32, 64):  # every tile width it launches with
        sig = {a: "constexpr" if a == "BT" else kinds.get(a, "i32") for a in jit.arg_names}
        src = ASTSource(fn=jit, signature=sig, constexprs={(jit.arg_names.index("BT"),): bt})
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": min_norm.num_warps(bt), "num_stages": 1})
        found[bt] = _resources(ck)
    return found


# the experts' masked input gradient at the seed's task experts (32 groups of 100 -> 256 -> 128):
# grad (G, B, 128) contiguous, the weight (G, 256, 128), the hidden layer (B, G*256) seen as (G, B, 256)
_G, _HT = _TASKS * _ET, 256
DGRAD_INTS = dict(B=_B, N_IN=_HT, N_OUT=D, s_gg=_B * D, s_gb=D, s_wg=_HT * D, s_wi=D, s_xg=_HT, s_xb=_G * _HT,
                  s_og=_HT, s_ob=_G * _HT)


def compile_masked_dgrad(arch: int, bm: int, bn: int, bk: int, warps: int, stages: int) -> dict:
    """One tile config of :mod:`ple_adatt.relu_dgrad`'s kernel, bf16 operands, for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = relu_dgrad._kernel().fn
    consts = dict(PREC="tf32", BM=bm, BN=bn, BK=bk)
    sig = {a: ("constexpr" if a in consts else "*bf16" if a.endswith("_ptr") else "i32") for a in fn.arg_names}
    aligned = [a for a in fn.arg_names if a not in consts and (a.endswith("_ptr") or DGRAD_INTS[a] % 16 == 0)]
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs={(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    return _resources(ck)


def report_mma_config(name: str, bad: list[str], result, kernel: str = "") -> None:
    """Print one tile config's row after ``name`` (``result()``: its compile, run in a worker),
    and add it (``kernel`` and ``name``) to ``bad`` if it does not compile, spills, or has no
    warpgroup MMA."""
    try:
        r = result()
    except Exception as exc:  # noqa: BLE001 - report the config, go on with the others
        print(f"{name}  does not compile: {str(exc).splitlines()[0][:80]}", flush=True)
        bad.append(f"{kernel} {name}")
        return
    print(f"{name} {r['regs']:>5} {r['stack']:>6} {r['spill_st']:>4} {r['spill_ld']:>4} {r['hgmma']:>6} "
          f"{r['hmma']:>5} {r['shared'] / 1024:>8.0f}", flush=True)
    if r["spill_st"] or r["spill_ld"] or not r["hgmma"]:
        bad.append(f"{kernel} {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--tiles", default=None,
                    help="BBxBHxWARPSxSTAGES,... (default: the autotuner's lists for each layout)")
    ap.add_argument("--variants", default=",".join(kernels.VARIANTS),
                    help=f"comma-separated, of {', '.join(kernels.VARIANTS)} (default: all)")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 unless every config compiles without spills and with warpgroup MMAs")
    args = ap.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in kernels.VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; valid: {', '.join(kernels.VARIANTS)}")
    if args.tiles:
        try:
            given = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")]
        except ValueError:
            given = []
        if not given or any(len(t) != 4 or min(t) < 1 for t in given):
            ap.error(f"--tiles {args.tiles!r}: expected BBxBHxWARPSxSTAGES,... of positive integers, e.g. 64x64x8x3")
        tiles = {(v, lay): given for v in kernels.VARIANTS for lay in kernels.LAYOUTS}
    else:
        tiles = kernels.TILES
    bad = []
    # every MMA config compiled in parallel (ptxas and Triton's passes take a second or more each)
    pool = ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=multiprocessing.get_context("fork"))
    mma = {(variant, layout, t): pool.submit(compile_one, variant, layout, *t, args.arch)
           for variant in args.variants.split(",") for layout in kernels.LAYOUTS for t in tiles[variant, layout]}
    dgrad = {t: pool.submit(compile_masked_dgrad, args.arch, *t) for t in relu_dgrad.TILES}
    print(f"sm_{args.arch}, shared experts {IN} -> H -> {D}, bf16 products; registers per thread (255 = the cap), "
          "stack bytes, spill stores/loads in the SASS, warpgroup MMAs (HGMMA) and older MMAs (HMMA)", flush=True)
    print(f"{'variant':<10} {'layout':<6} {'BB':>4} {'BH':>4} {'warps':>5} {'stages':>6} {'regs':>5} {'stack':>6} "
          f"{'STL':>4} {'LDL':>4} {'HGMMA':>6} {'HMMA':>5} {'smem KB':>8}")
    for variant in args.variants.split(","):
        for layout in kernels.LAYOUTS:
            for bb, bh, warps, stages in tiles[variant, layout]:
                report_mma_config(f"{variant:<10} {layout:<6} {bb:>4} {bh:>4} {warps:>5} {stages:>6}", bad,
                                  mma[variant, layout, (bb, bh, warps, stages)].result)
    print(f"\nElementwise kernels: the CGC mixture's (block {mixture.BLOCK_ROWS} x {kernels._pow2(D)}, "
          f"{mixture.NUM_WARPS} warps), the per-task gradients' ds kernel ({kernels.DS_ROWS} x "
          f"{kernels._pow2(D)}, 4 warps) and the towers' bias+ReLU, alone and with the heads "
          f"({towers.BLOCK_ROWS} x {TOWER_H}, {towers.NUM_WARPS} warps); no MMAs")
    print(f"{'kernel':<22} {'regs':>5} {'stack':>6} {'STL':>4} {'LDL':>4}")
    try:
        for name, r in compile_elementwise(args.arch).items():
            print(f"{name:<22} {r['regs']:>5} {r['stack']:>6} {r['spill_st']:>4} {r['spill_ld']:>4}", flush=True)
            if r["spill_st"] or r["spill_ld"]:
                bad.append(f"elementwise {name}")
    except Exception as exc:  # noqa: BLE001 - report it, and fail --check
        print(f"elementwise kernels do not compile: {str(exc).splitlines()[0][:100]}")
        bad.append("elementwise kernels")
    print("\nMGDA's device min-norm solver (ple_adatt.transfer.min_norm): one program, a float64 tile of "
          "tasks x tasks")
    print(f"{'tile':>4} {'warps':>5} {'regs':>5} {'stack':>6} {'STL':>4} {'LDL':>4}")
    try:
        for bt, r in compile_min_norm(args.arch).items():
            print(f"{bt:>4} {min_norm.num_warps(bt):>5} {r['regs']:>5} {r['stack']:>6} {r['spill_st']:>4} "
                  f"{r['spill_ld']:>4}", flush=True)
            if r["spill_st"] or r["spill_ld"]:
                bad.append(f"min_norm tile {bt}")
    except Exception as exc:  # noqa: BLE001 - report it, and fail --check
        print(f"the min-norm solver does not compile: {str(exc).splitlines()[0][:100]}")
        bad.append("min_norm solver")
    print(f"\nThe experts' masked input gradient (ple_adatt.relu_dgrad), the seed's task experts "
          f"({_G} x {_B} x {D} -> {_HT}), bf16")
    print(f"{'BM':>4} {'BN':>4} {'BK':>4} {'warps':>5} {'stages':>6} {'regs':>5} {'stack':>6} {'STL':>4} {'LDL':>4} "
          f"{'HGMMA':>6} {'HMMA':>5} {'smem KB':>8}")
    for bm, bn, bk, warps, stages in relu_dgrad.TILES:
        report_mma_config(f"{bm:>4} {bn:>4} {bk:>4} {warps:>5} {stages:>6}", bad, dgrad[bm, bn, bk, warps, stages].result,
                          kernel="masked_dgrad")
    pool.shutdown()
    if args.check and bad:
        print(f"{len(bad)} config(s) spill, lack warpgroup MMAs or do not compile:")
        for name in bad:
            print("  " + " ".join(name.split()))
        sys.exit(1)


if __name__ == "__main__":
    main()
