"""The fused cross-entropy's forward kernel compiled for sm_90 on this machine (no GPU needed): registers,
spills, the main loop's SASS instruction count and whether its item load is software-pipelined.

    python3 benchmarks/linear_cross_entropy_sass.py                      # the Books tiles, dQ on and off
    python3 benchmarks/linear_cross_entropy_sass.py 64x32x4x3 128x64x8x3  # BLOCK_L x BLOCK_C x warps x stages

fp32 inputs with TF32 dots, D = 64 (the Books step); pointer and stride arguments are marked divisible by 16,
as the JIT marks them at the trainer's shapes. Uses the ptxas and nvdisasm that ship in the triton wheel, so
the code is that of the installed Triton, which may differ from the GPU machine's. Numbers in
benchmarks/linear_cross_entropy.md ("an offline look at the compiled loop") came from it.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.sass import compile_sm90
from ops.triton.linear_cross_entropy import CATALOG_FP32_BLOCKS, _forward_kernel

SIGNATURE = {"Query": "*fp32", "Items": "*fp32", "Targets": "*i64", "PartMax": "*fp32", "PartOther": "*fp32",
             "PartTarget": "*fp32", "PartAcc": "*fp32", "L": "i32", "C": "i32", "tiles_per_split": "i32",
             "scale_log2": "fp32", "stride_q": "i32", "stride_i": "i32"}
ALIGNED = ("Query", "Items", "Targets", "PartMax", "PartOther", "PartTarget", "PartAcc", "stride_q", "stride_i")


def compile_forward(block_l: int, block_c: int, warps: int, stages: int, grad_query: bool = True) -> dict:
    """Registers, stack bytes, SASS instructions in the longest loop, and asynchronous copies in the TTGIR."""
    consts = dict(D=64, BLOCK_L=block_l, BLOCK_C=block_c, BLOCK_D=64, DOT_PREC="tf32", GRAD_QUERY=grad_query)
    kernel = compile_sm90(_forward_kernel, SIGNATURE, consts, ALIGNED, warps, stages)
    return dict(tiles=(block_l, block_c, warps, stages), grad_query=grad_query, registers=kernel.registers,
                stack_bytes=kernel.stack_bytes, loop_instructions=_longest_loop(kernel.sass),
                async_copies=len(re.findall(r"async_copy_global_to_local|async_tma_copy", kernel.ttgir)))


def _longest_loop(sass: str) -> int:
    """Instructions between a label and the backward branch to it, for the longest such loop."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    longest = 0
    for i, line in enumerate(lines):
        m = re.search(r"BRA `?\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            body = lines[labels[m.group(1)]:i + 1]
            longest = max(longest, sum(1 for b in body if re.match(r"^\s*/\*[0-9a-f]+\*/", b)))
    return longest


def main(args: list) -> None:
    configs = [tuple(int(x) for x in a.split("x")) for a in args] or [dataclasses.astuple(CATALOG_FP32_BLOCKS.forward)]
    for cfg in configs:
        for grad_query in (True, False):
            print(compile_forward(*cfg, grad_query=grad_query), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
