#!/usr/bin/env bash
# Reproduces the ml-1m rows of the paper's table: the three frozen configs in the
# given protocols, then results/ml-1m/<protocol>/<config>.json, a markdown table and
# the curves PNG per protocol (made by generative_recommenders.report).
#   PROTOCOLS="paper leave_one_out" CONFIGS="sasrec-sampled-softmax-n128-final ..." bash scripts/reproduce_ml1m.sh
# PARALLEL=1 starts all runs at once (they share the GPU: accuracy runs only, not timings).
# Re-running resumes unfinished runs from their checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
protocols=${PROTOCOLS:-"paper leave_one_out"}
configs=${CONFIGS:-"sasrec-sampled-softmax-n128-final hstu-sampled-softmax-n128-final hstu-sampled-softmax-n128-large-final"}
if [ ! -f tmp/ml-1m/sequences.npz ]; then
  python3 preprocess_public_data.py --dataset=ml-1m --archive="${ML1M_ARCHIVE:-../shared/data/ml-1m.zip}"
fi
train() {  # protocol config
  mkdir -p "results/ml-1m/$1"
  python3 main.py --gin_config_file="configs/ml-1m/$2.gin" --gin_bindings="train_fn.protocol='$1'" \
    2>&1 | grep -v "^[IW][0-9]" > "results/ml-1m/$1/$2.log"
}
for protocol in $protocols; do
  for config in $configs; do
    if [ "${PARALLEL:-0}" = 1 ]; then train "$protocol" "$config" & else train "$protocol" "$config"; fi
  done
done
wait
for protocol in $protocols; do
  for config in $configs; do
    run=$config
    [ "$protocol" = paper ] || run="$config-${protocol//_/-}"
    cp "exps/ml-1m-l200/$run/results.json" "results/ml-1m/$protocol/$config.json"
  done
  python3 -m generative_recommenders.report results/ml-1m/"$protocol"/*.json \
    --plot "results/ml-1m/$protocol.png" > "results/ml-1m/$protocol.md"
  cat "results/ml-1m/$protocol.md"
done
