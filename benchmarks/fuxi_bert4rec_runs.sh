#!/usr/bin/env bash
# Issue 26 GPU runs on ml-1m (one H200), in steps that each resume from the checkpoints they find:
#   fuxi      FuXi-alpha, sampled softmax n128 and full softmax, paper and leave-one-out protocols (101 epochs each)
#   bert4rec  BERT4Rec sampled and full softmax, leave-one-out, up to 2000 epochs, early stopping at patience 20
#   ablation  (not in the default) BERT4Rec full softmax to convergence with one setting changed per run:
#             mask probability 0.4, lr 3e-3, D 128 -- only needed if the converged HR@10 stays below 0.2693
#   bash benchmarks/fuxi_bert4rec_runs.sh [step ...]          (default: fuxi bert4rec)
# The runs of a step share the GPU at once (accuracy runs: their seconds are not solo timings), each
# capped by the step's wall time: FUXI_SECONDS (default 260), BERT_SECONDS (170), ABLATION_SECONDS (400).
# A capped run keeps every finished epoch (results.json and last.pt are written each epoch). To go on in a
# later call, bring back $OUT/ckpts as ./ckpts (carry it) and run the same step again.
# Writes $OUT/results/ml-1m/<protocol>/<config>.{json,log} and $OUT/ckpts/ (last.pt and best.pt of every run,
# about 5 MB each: what a later call resumes from).
# SMOKE=1 (CPU check of this script): no wheel install, synthetic data, SMOKE_EPOCHS (2) epochs.
if [ -z "${SMOKE:-}" ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; fi
export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
OUT=${OUT:?set OUT to the output folder}
steps=${*:-fuxi bert4rec}
smoke=()
if [ -n "${SMOKE:-}" ]; then
  smoke=("--gin_bindings=train_fn.dataset_name='synthetic'" "--gin_bindings=synthetic_data.num_users=300"
         "--gin_bindings=train_fn.num_epochs=${SMOKE_EPOCHS:-2}")
elif [ ! -f tmp/ml-1m/sequences.npz ]; then
  python3 preprocess_public_data.py --dataset=ml-1m --archive="${ML1M_ARCHIVE:-.carry/ml-1m.zip}"
fi
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true

start() {  # seconds protocol config label [bindings...]: one capped run in the background
  local seconds=$1 protocol=$2 config=$3 label=$4; shift 4
  local run=$label
  [ "$protocol" = paper ] || run="$label-${protocol//_/-}"
  mkdir -p "$OUT/results/ml-1m/$protocol"
  echo "$(date +%T) start $run (cap ${seconds}s)"
  ( status=0
    timeout "$seconds" python3 main.py --gin_config_file="configs/ml-1m/$config.gin" \
      --gin_bindings="train_fn.protocol='$protocol'" --gin_bindings="train_fn.run_name='$run'" "$@" "${smoke[@]}" \
      > "$OUT/results/ml-1m/$protocol/$label.log" 2>&1 || status=$?
    [ "$status" = 0 ] || echo "$(date +%T) $run: exit status $status (124: stopped at the step's time cap)"
    results=$(ls exps/*/"$run"/results.json 2>/dev/null | head -1 || true)
    if [ -n "$results" ]; then cp "$results" "$OUT/results/ml-1m/$protocol/$label.json"; fi
    echo "$(date +%T) done $run: $(tail -n 2 "$OUT/results/ml-1m/$protocol/$label.log" | head -c 400)" ) &
}

save_ckpts() {  # the checkpoints of runs named like $1, for a later call to resume from
  for dir in ckpts/*/$1; do
    [ -d "$dir" ] && mkdir -p "$OUT/$(dirname "$dir")" && cp -r "$dir" "$OUT/$(dirname "$dir")/"
  done
  return 0
}

for step in $steps; do
  case $step in
    fuxi)
      for protocol in paper leave_one_out; do
        for config in fuxi-sampled-softmax-n128-final fuxi-full-softmax-final; do
          start "${FUXI_SECONDS:-260}" "$protocol" "$config" "$config"
        done
      done
      wait
      save_ckpts "fuxi-*" ;;
    bert4rec)
      for config in bert4rec-sampled-softmax-n128-converged bert4rec-full-softmax-converged; do
        start "${BERT_SECONDS:-170}" leave_one_out "$config" "$config"
      done
      wait
      save_ckpts "bert4rec-*-converged-leave-one-out" ;;
    ablation)
      start "${ABLATION_SECONDS:-400}" leave_one_out bert4rec-full-softmax-converged \
        bert4rec-full-softmax-converged-mask04 "--gin_bindings=train_fn.mask_prob=0.4"
      start "${ABLATION_SECONDS:-400}" leave_one_out bert4rec-full-softmax-converged \
        bert4rec-full-softmax-converged-lr3e-3 "--gin_bindings=train_fn.learning_rate=3e-3"
      start "${ABLATION_SECONDS:-400}" leave_one_out bert4rec-full-softmax-converged \
        bert4rec-full-softmax-converged-d128 "--gin_bindings=train_fn.item_embedding_dim=128"
      wait
      save_ckpts "bert4rec-full-softmax-converged-*-leave-one-out" ;;
    *) echo "unknown step $step: use fuxi, bert4rec or ablation" >&2; exit 2 ;;
  esac
done
python3 scripts/method_loss_table.py --results results/ml-1m --results "$OUT/results/ml-1m" || true
echo "$(date +%T) all steps done"
