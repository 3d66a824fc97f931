"""Where the rab-gradient pass pays: a captured forward+backward with the pass forced on and off, one process.

    python3 benchmarks/hstu_attention_rab_switch.py [OUT.jsonl]

`ops.triton.hstu_attention.RAB_PASS` is set to True (the pass: heads summed in-program) and then False (the dQ
walk: per-head reductions), at shapes between the long-sequence benchmark (N = 4096, 8192) and the trainers'
(N = 211, in bf16 here: the variants benchmark times them in fp32). The rule in `rab_pass_wins` was drawn from the
first four rows and those of `hstu_attention_variants.py --backward --default_tiles` (benchmarks/hstu_attention.md).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch
from triton.testing import do_bench_cudagraph

import benchmarks.hstu_attention as bench
from ops.triton import hstu_attention as kernel

# (N, B, heads, d, ragged up to, dtype): as many scores per head at (1024, 8) as at (512, 32), with half the pass
# programs; then the ml-1m / ml-20m trainers' shapes in bf16 (lengths in [1, 200]).
BF16, FP32 = torch.bfloat16, torch.float32
SHAPES = [(1024, 8, 2, 128, None, BF16), (2048, 8, 2, 128, None, BF16), (512, 32, 2, 128, None, BF16),
          (1024, 32, 2, 128, 1024, FP32), (211, 128, 2, 25, 200, BF16), (211, 128, 4, 64, 200, BF16),
          (211, 128, 8, 32, 200, BF16)]


def main(out_path: str = "") -> None:
    out = open(out_path, "w") if out_path else None
    for n, b, heads, d, ragged, dtype in SHAPES:
        bench.DTYPE = dtype
        x = bench.make_batch(b, n, heads, d, d, ragged is not None, max_ragged=ragged, device="cuda")
        args = (x["q"], x["k"], x["v"], x["offsets"], n, x["ts"], x["ts_w"], x["pos_w"])
        params = [x["q"], x["k"], x["v"], x["ts_w"], x["pos_w"]]
        row = dict(n=n, batch=b, heads=heads, d=d, ragged=ragged is not None, dtype=str(dtype)[6:],
                   device=torch.cuda.get_device_name(), torch=torch.__version__)
        for name, on in (("pass_ms", True), ("walk_ms", False)):
            kernel.RAB_PASS = on
            row[name] = do_bench_cudagraph(lambda: torch.autograd.grad(kernel._hstu_attention(*args), params,
                                                                       x["grad"]), rep=50)
        kernel.RAB_PASS = None
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()


if __name__ == "__main__":
    main(*sys.argv[1:2])
