"""The fused HSTU attention kernels compiled for sm_90 on this machine (no GPU needed): registers, spills
(stack bytes), SASS size and the count of a few instruction kinds, with parts of the bias path switched off.

    python3 benchmarks/hstu_attention_sass.py [KERNEL_FILE]

bf16 inputs, head dim 128, the kernel file's own d = 128 tiles (`_FWD_TABLE` / `_BWD_TABLE`); pointer and
stride arguments marked divisible by 16, as the JIT marks them at the benchmark's shapes. The forward with and
without the bias; the backward with everything, without d ts_w, without d pos_w, without both, and without the
bias, to show what its code and spills come from; the rab-gradient pass, where the file has one. Compiled with the installed Triton (`benchmarks/sass.py`),
which may differ from the GPU machine's. Numbers in benchmarks/hstu_attention.md came from it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.hstu_attention import load_kernel_file
from benchmarks.sass import compile_sm90

# The fused backward's other candidate tiles (BLOCK, BLOCK_M1, BLOCK_N2, warps, stages).
FUSED_TILES = [(64, 16, 16, 4, 2), (64, 32, 16, 4, 2), (64, 16, 16, 8, 2), (128, 16, 16, 8, 2), (128, 32, 16, 8, 2),
               (32, 16, 16, 4, 2)]
KINDS = ("I2F", "MUFU", "REDG", "SHFL", "BAR", "LDL|STL")  # conversions, MUFU, atomics, shuffles, barriers, spills


def _signature(kernel, consts: dict) -> dict:
    """Types of the runtime arguments: bf16 tensors, int64 offsets and timestamps, fp32 bias weights (and the
    fused backward's fp32 dQ accumulator)."""
    sig = {}
    fp32 = ("TsW", "PosW", "TsGradPart", "PosGradPart") + (("GradQ",) if consts.get("FUSED_DQ") else ())
    for name in kernel.arg_names:
        if name in consts:
            continue
        if name in ("SeqOffsets", "NumTargets", "TS"):
            sig[name] = "*i64"
        elif name in fp32:
            sig[name] = "*fp32"
        elif name[0].isupper():
            sig[name] = "*bf16"
        else:
            sig[name] = "fp32" if name == "inv_n" else "i32"
    return sig


def compile_kernel(kernel, consts: dict, warps: int, stages: int) -> dict:
    """Registers, stack bytes, SASS instructions and the count of each of KINDS."""
    aligned = [n for n in kernel.arg_names if n not in consts and (n[0].isupper() or n.startswith("stride"))]
    compiled = compile_sm90(kernel, _signature(kernel, consts), consts, aligned, warps, stages)
    code = compiled.instructions()
    row = dict(registers=compiled.registers, stack_bytes=compiled.stack_bytes, sass=len(code))
    row.update({kind: sum(1 for line in code if re.search(rf"\b({kind})\b", line)) for kind in KINDS})
    return row


def main(path: str) -> None:
    module = load_kernel_file(path, Path(path).stem)
    fwd_m, fwd_n, fwd_w, fwd_s = module._FWD_TABLE[128]
    blk, m1, n2, bwd_w, bwd_s = module._BWD_TABLE[128]
    common = dict(DQK=128, DV=128, BLOCK_DQK=128, BLOCK_DV=128, NUM_BUCKETS=128, DOT_PREC="ieee", HW_MATH=True,
                  FAST_SILU=True)
    for bias in (True, False):
        consts = dict(common, BLOCK_M=fwd_m, BLOCK_N=fwd_n, HAS_BIAS=bias, HAS_TARGETS=False)
        row = compile_kernel(module._hstu_fwd_kernel, consts, fwd_w, fwd_s)
        print(dict(kernel="forward", tiles=(fwd_m, fwd_n, fwd_w, fwd_s), bias=bias, **row), flush=True)
    for bias, pos_grad, ts_grad in [(True, True, True), (True, True, False), (True, False, True),
                                    (True, False, False), (False, False, False)]:
        consts = dict(common, BLOCK=blk, BLOCK_M1=m1, BLOCK_N2=n2, HAS_BIAS=bias, POS_GRAD=pos_grad,
                      TS_GRAD=ts_grad, TS_PART_STRIDE=160)
        if "FUSED_DQ" in module._hstu_bwd_kernel.arg_names:
            consts["FUSED_DQ"] = False
        row = compile_kernel(module._hstu_bwd_kernel, consts, bwd_w, bwd_s)
        print(dict(kernel="backward", tiles=(blk, m1, n2, bwd_w, bwd_s), bias=bias, pos_grad=pos_grad,
                   ts_grad=ts_grad, **row), flush=True)
    if "FUSED_DQ" in module._hstu_bwd_kernel.arg_names:  # one walk, dQ by atomics, no weight gradients
        for tiles in [(blk, m1, n2, bwd_w, bwd_s)] + FUSED_TILES:
            for bias in (True, False):
                consts = dict(common, BLOCK=tiles[0], BLOCK_M1=tiles[1], BLOCK_N2=tiles[2], HAS_BIAS=bias,
                              POS_GRAD=False, TS_GRAD=False, TS_PART_STRIDE=160, FUSED_DQ=True)
                row = compile_kernel(module._hstu_bwd_kernel, consts, tiles[3], tiles[4])
                print(dict(kernel="backward, fused dQ", tiles=tiles, bias=bias, **row), flush=True)
    if hasattr(module, "_rab_grad_kernel"):  # the rab-gradient pass
        rab_m, rab_n, rab_w, rab_s = module._RAB_TILES
        consts = dict(common, BLOCK_M=rab_m, BLOCK_N=rab_n, POS_GRAD=True, TS_GRAD=True,
                      TS_PART_STRIDE=160)
        row = compile_kernel(module._rab_grad_kernel, consts, rab_w, rab_s)  # heads: a runtime argument
        print(dict(kernel="rab pass", tiles=(rab_m, rab_n, rab_w, rab_s), **row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[1] / "ops/triton/hstu_attention.py"))
