#!/usr/bin/env python3
"""What the Triton expert kernel's inner loop costs, read from its sm_90 machine code, no GPU needed.

    python benchmarks/triton_moe_sass.py            # about a minute on a laptop-class CPU

Triton's own LLVM and ptxas build the kernel for an H100/H200 (sm_90) on any x86 Linux machine; this
script compiles the decode (one row) and batch (16 rows) variants at each width, takes the K loop
(the longest backward branch in the SASS) and counts its instructions per code a thread dequantizes
(at one row its FFMA count: one fused multiply-add per code; at 16 rows four per HMMA.16816, which
multiplies 128 codes per warp). A GPU issues at most 4 warp instructions per clock per SM (128 thread instructions), so
an inner loop of n instructions per code bounds a kernel that is issue-bound at 128 / n codes per
clock per SM; the script turns that into bytes/s at the codes' width for ``--sms`` SMs at ``--ghz``
(H200 SXM: 132 SMs, 1.98 GHz) and into a fraction of ``--peak-tbps``. It is a bound from the
instruction count alone (it ignores latency, occupancy and dual issue): the benchmark
(benchmarks/triton_moe.py) measures the real figure. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.pop("TRITON_INTERPRET", None)  # compile for real

TYPES = dict(x_stride="i32", out_ptr="*fp32", out_stride="i32", split_stride="i32", ids_ptr="*i64",
             gates_ptr="*bf16", P="i32", TOP_K="i32", meta_ptr="*i64", codes_ptr="*u8", scales_ptr="*fp16",
             zeros_ptr="*u8", perm_ptr="*i32", N="i32", K="i32")
INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)")
BRANCH_TARGET = re.compile(r"BRA\b.*?0x([0-9a-f]+)")


def compile_sass(widths, block_m, block_n, unit, num_warps):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moepress.runtime import triton_moe

    kernel = triton_moe._moe_matmul_kernel
    names = list(kernel.arg_names)
    signature = {n: TYPES.get(n, "constexpr") for n in names}
    signature["x_ptr"] = "*bf16"
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in list(TYPES) + ["x_ptr"] if n not in ("P", "TOP_K")}
    # the gate_up launch (two thirds of a layer's bytes): its longest loop is one matrix's K loop
    constants = dict(S=unit, BLOCK_M=block_m, BLOCK_N=block_n, P_BLOCK=32, SPLIT_K=1, GATED=True, X_BY_TOKEN=True,
                     HAS2=2 in widths, HAS3=3 in widths, HAS4=4 in widths, HAS8=8 in widths, HAS_PERM=False,
                     ACT=tl.bfloat16, IEEE=False)
    compiled = triton.compile(ASTSource(kernel, signature, constants, aligned), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=2))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def inner_loop(sass: str) -> collections.Counter:
    """Opcode counts of the longest loop (backward branch) in ``sass``."""
    lines = [(int(m.group(1), 16), m.group(2), line) for line in sass.splitlines() if (m := INSTRUCTION.match(line))]
    best: list = []
    for address, _, line in lines:
        target = BRANCH_TARGET.search(line)
        if target and int(target.group(1), 16) < address:
            body = [op for a, op, _ in lines if int(target.group(1), 16) <= a <= address]
            best = body if len(body) > len(best) else best
    return collections.Counter(op.split(".")[0] for op in best)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-n", type=int, default=64)
    parser.add_argument("--unit", type=int, default=64, help="the layout's unit S (64 for groups of 128)")
    parser.add_argument("--num-warps", type=int, default=4)
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--ghz", type=float, default=1.98)
    parser.add_argument("--peak-tbps", type=float, default=4.8)
    args = parser.parse_args(argv)
    print(f"| width | rows | loop instructions | codes per thread | instructions per code | issue bound | of "
          f"{args.peak_tbps} TB/s | top opcodes |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for bits in (4, 3, 2, 8):
        for block_m in (1, 16):
            ops = inner_loop(compile_sass((bits,), block_m, args.block_n, args.unit, args.num_warps))
            total = sum(ops.values())
            # codes per thread per loop pass (the compiler may unroll a pass over several chunks): one
            # FFMA each at one row; at 16 rows each HMMA.16816 (per warp) multiplies an 8 x 16 tile of
            # weights, 128 codes, i.e. 4 per thread
            codes = ops["FFMA"] if block_m == 1 else 4 * ops["HMMA"]
            per_code = total / max(codes, 1)
            bytes_per_s = 128 / per_code * bits / 8 * args.sms * args.ghz * 1e9
            top = ", ".join(f"{op} {n}" for op, n in ops.most_common(6))
            print(f"| {bits} | {block_m} | {total} | {codes} | {per_code:.1f} | {bytes_per_s / 1e12:.2f} TB/s | "
                  f"{bytes_per_s / (args.peak_tbps * 1e12):.0%} | {top} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
