#!/usr/bin/env bash
# Stochastic Length sweep (issue 26, README "Stochastic Length") on one GPU, within a wall-time budget:
#   ml-1m, paper protocol, HSTU-large (the frozen config, max length 200), and the long synthetic histories
#   (configs/synthetic/hstu-long-histories.gin, max length 1,024), each with SL off and alpha 1.6 ... 2.0.
# Writes $OUT/results/stochastic_length/<data set>/<run>.json and .log, the report's table
# ($OUT/results/stochastic_length/table.md) and plot (quality_vs_cost.png).
#   OUT=/tmp/out bash benchmarks/stochastic_length_runs.sh
# Settings (environment): SL_BUDGET_S (default 390: seconds from the start after which no run starts, and
# each run is cut at), SL_ML1M_EPOCHS (40), SL_SYNTH_EPOCHS (12), SL_ALPHAS ("off 1.6 1.7 1.8 1.9 2.0"),
# SL_DATASETS ("ml-1m synthetic-long": which sweeps run), SL_TINY=1 (a CPU check of the script: tiny models
# and data, 2 epochs), SL_ARCHIVE (.carry/ml-1m.zip).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD

: "${OUT:?set OUT to the directory the results go to}"
START=$(date +%s)
BUDGET=${SL_BUDGET_S:-390}
ALPHAS=${SL_ALPHAS:-"off 1.6 1.7 1.8 1.9 2.0"}
DATASETS=${SL_DATASETS:-"ml-1m synthetic-long"}
ML1M_EPOCHS=${SL_ML1M_EPOCHS:-40}
SYNTH_EPOCHS=${SL_SYNTH_EPOCHS:-12}
RESULTS="$OUT/results/stochastic_length"
WORK=$(mktemp -d /tmp/sl-sweep.XXXXXX)  # checkpoints and TensorBoard logs stay here
mkdir -p "$RESULTS/ml-1m" "$RESULTS/synthetic-long"

ML1M_EXTRA=() SYNTH_EXTRA=()
if [[ -n "${SL_TINY:-}" ]]; then
  ML1M_EPOCHS=2 SYNTH_EPOCHS=2
  ML1M_EXTRA=("train_fn.max_sequence_length = 20" "hstu_encoder.num_blocks = 1" "train_fn.local_batch_size = 1024"
              "train_fn.eval_batch_size = 1024")
  SYNTH_EXTRA=("train_fn.max_sequence_length = 64" "hstu_encoder.num_blocks = 1" "synthetic_data.num_users = 300"
               "synthetic_data.num_items = 2000" "synthetic_data.median_length = 80.0" "synthetic_data.min_length = 20"
               "synthetic_data.max_length = 200" "train_fn.local_batch_size = 32")
fi

elapsed() { echo $(( $(date +%s) - START )); }

if [[ " $DATASETS " == *" ml-1m "* ]]; then
  python3 preprocess_public_data.py --dataset=ml-1m --archive="${SL_ARCHIVE:-.carry/ml-1m.zip}"
  echo "[$(elapsed)s] ml-1m ready"
fi

# run <data set dir> <config> <epochs> <alpha|off> [extra bindings...]
run() {
  local dataset=$1 config=$2 epochs=$3 alpha=$4
  shift 4
  local name="sl-${alpha}" left=$(( BUDGET - $(elapsed) ))
  if (( left < 15 )); then
    echo "[$(elapsed)s] SKIPPED $dataset/$name: the ${BUDGET}s budget is spent" | tee -a "$RESULTS/skipped.txt"
    return
  fi
  local value=None
  [[ $alpha != off ]] && value=$alpha
  local bindings=("train_fn.num_epochs = $epochs" "train_fn.stochastic_length_alpha = $value"
                  "train_fn.run_name = '$name'" "train_fn.exp_root = '$WORK/$dataset/exps'"
                  "train_fn.ckpt_root = '$WORK/$dataset/ckpts'" "$@")
  local args=()
  for b in "${bindings[@]}"; do args+=("--gin_bindings=$b"); done
  echo "[$(elapsed)s] start $dataset/$name ($epochs epochs, cut after ${left}s)"
  local status=0
  timeout "$left" python3 main.py --fresh --gin_config_file="$config" "${args[@]}" \
    > "$RESULTS/$dataset/$name.log" 2>&1 || status=$?
  tail -n 3 "$RESULTS/$dataset/$name.log"
  # results.json is rewritten after every epoch: a run cut by the budget keeps the epochs it finished.
  local results
  results=$(find "$WORK/$dataset/exps" -path "*/$name/results.json" | head -n 1)
  if [[ -n $results ]]; then cp "$results" "$RESULTS/$dataset/$name.json"; fi
  echo "[$(elapsed)s] end $dataset/$name: status $status"
}

for alpha in $ALPHAS; do
  [[ " $DATASETS " == *" ml-1m "* ]] || break
  run ml-1m configs/ml-1m/hstu-sampled-softmax-n128-large-final.gin "$ML1M_EPOCHS" "$alpha" ${ML1M_EXTRA[@]+"${ML1M_EXTRA[@]}"}
done
for alpha in $ALPHAS; do
  [[ " $DATASETS " == *" synthetic-long "* ]] || break
  run synthetic-long configs/synthetic/hstu-long-histories.gin "$SYNTH_EPOCHS" "$alpha" ${SYNTH_EXTRA[@]+"${SYNTH_EXTRA[@]}"}
done

python3 benchmarks/stochastic_length_report.py "$RESULTS" --plot "$RESULTS/quality_vs_cost.png" \
  | tee "$RESULTS/table.md" || echo "report: see the message above"
echo "[$(elapsed)s] done; results in $RESULTS"
