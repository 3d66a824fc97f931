#!/usr/bin/env bash
# Runs training jobs over the GPUs of this machine, one queue per GPU, and collects their results.
#
#   printf '%s\n' "configs/ml-1m/gru4rec-full-softmax-final.gin paper" ... | \
#     GPUS="0 1" RESULTS=results/ml-1m bash scripts/run_queue.sh
#
# Each stdin line is "<config.gin> <protocol>". A job's results.json and log land in
# $RESULTS/<protocol>/<config stem>.{json,log}. A job that fails under CUDA graphs is re-run once
# with train_fn.cuda_graphs=False, and the log says so. Re-running resumes unfinished runs.
set -uo pipefail
cd "$(dirname "$0")/.."
read -r -a gpus <<< "${GPUS:-0}"
results=${RESULTS:?set RESULTS to the folder that receives results}
mapfile -t jobs

run_job() {  # gpu config protocol
  local gpu=$1 config=$2 protocol=$3
  local stem run out
  stem=$(basename "$config" .gin)
  run="$stem-${protocol//_/-}"
  out="$results/$protocol"
  mkdir -p "$out"
  local args=(--gin_config_file="$config" --gin_bindings="train_fn.protocol='$protocol'"
              --gin_bindings="train_fn.run_name='$run'")
  echo "[gpu $gpu] $config ($protocol)"
  if ! CUDA_VISIBLE_DEVICES=$gpu python3 main.py "${args[@]}" > "$out/$stem.log" 2>&1; then
    echo "[gpu $gpu] $stem failed under CUDA graphs, retrying eagerly: $(tail -n 1 "$out/$stem.log")"
    { echo "== the run above failed; re-run with train_fn.cuda_graphs=False =="; } >> "$out/$stem.log"
    CUDA_VISIBLE_DEVICES=$gpu python3 main.py "${args[@]}" --gin_bindings="train_fn.cuda_graphs=False" \
      --gin_bindings="train_fn.resume=False" >> "$out/$stem.log" 2>&1 || echo "[gpu $gpu] $stem FAILED"
  fi
  grep -v "^[IW][0-9]" "$out/$stem.log" > "$out/$stem.log.tmp" && mv "$out/$stem.log.tmp" "$out/$stem.log"
  local found
  found=$(ls exps/*/"$run"/results.json 2>/dev/null | head -n 1)
  [ -n "$found" ] && cp "$found" "$out/$stem.json"
}

for i in "${!gpus[@]}"; do
  (
    for ((j = i; j < ${#jobs[@]}; j += ${#gpus[@]})); do
      read -r config protocol <<< "${jobs[$j]}"
      run_job "${gpus[$i]}" "$config" "$protocol"
    done
  ) &
done
wait
