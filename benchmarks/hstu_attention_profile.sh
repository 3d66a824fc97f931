#!/usr/bin/env bash
# Nsight Compute profile of the HSTU kernels (forward, backward) at B=8, N=4096, h=2, d=128, bf16, with the
# relative bias and without: occupancy, warp stall reasons, per-SASS-instruction stall samples.
#   bash benchmarks/hstu_attention_profile.sh OUT_DIR [N]
# Writes OUT_DIR/{bias,nobias}.details.txt (ncu --page details) and .sass.csv (per instruction, large),
# then prints each kernel's stall reasons by share. Needs ncu (CUDA toolkit) on PATH or in /usr/local/cuda/bin.
set -euo pipefail
out=${1:?output folder}; n=${2:-4096}
mkdir -p "$out"
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
[ -n "$ncu" ] || { echo "ncu not found" >&2; exit 1; }
for mode in bias nobias; do
  # 2 warm-up calls (4 launches: compile, first touch), then the profiled forward and backward
  "$ncu" --kernel-name regex:"_hstu_(fwd|bwd)_kernel" --launch-skip 4 --launch-count 2 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section InstructionStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section SourceCounters -f -o "$out/$mode" \
    python3 - "$n" "$mode" <<'PY'
import sys
import torch
sys.path.insert(0, ".")
from benchmarks.hstu_attention import make_batch
from ops.triton import hstu_attention as kernel
n, bias = int(sys.argv[1]), sys.argv[2] == "bias"
b = make_batch(8, n, 2, 128, 128, False)
extra = (b["ts"], b["ts_w"], b["pos_w"]) if bias else ()
params = [b["q"], b["k"], b["v"]] + ([b["ts_w"], b["pos_w"]] if bias else [])
for _ in range(3):
    torch.autograd.grad(kernel._hstu_attention(b["q"], b["k"], b["v"], b["offsets"], n, *extra), params, b["grad"])
torch.cuda.synchronize()
PY
  "$ncu" -i "$out/$mode.ncu-rep" --page details > "$out/$mode.details.txt"
  "$ncu" -i "$out/$mode.ncu-rep" --page source --csv --print-source sass > "$out/$mode.sass.csv"
  rm -f "$out/$mode.ncu-rep"
done
python3 benchmarks/hstu_attention_stalls.py "$out"/bias.sass.csv "$out"/nobias.sass.csv
