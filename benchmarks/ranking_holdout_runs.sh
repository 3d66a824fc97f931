python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# Issue 22 part 2: the ml-1m ranking table with ten held-out candidates per user and split, on one GPU.
# HSTU and SASRec (configs/ml-1m/{hstu,sasrec}-ranking-holdout10.gin) x seeds 42, 1, 2, one run at a time (each
# run also times its test evaluation: M-FALCON against one pass per candidate); the item-mean and user+item-bias
# baselines are fit and scored inside every run, on the same candidates. Writes under $OUT/results/ranking/:
# <run>.json (results.json), <run>.log, table.md (generative_recommenders.report) and curves.png.
#   OUT=/some/dir bash benchmarks/ranking_holdout_runs.sh
# RANKING_SMOKE=1: a CPU check of this script (users 1-200, 1 epoch, one seed, 50 timed users).
# Expected on one H200: ~40 s per run (the one-candidate runs took 35-44 s each on an H100), ~5 min in all.
set -euo pipefail
: "${OUT:?set OUT to the output directory}"
results="$OUT/results/ranking"
mkdir -p "$results"
start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start )) s"; }

seeds="42 1 2"
extra=()
if [ "${RANKING_SMOKE:-0}" = 1 ]; then
  seeds="42"
  extra=(--gin_bindings="train_fn.num_epochs=1" --gin_bindings="train_fn.ranking_user_range=(1, 200)"
         --gin_bindings="train_fn.ranking_timing_users=50")
fi

if [ ! -f tmp/ml-1m/sequences.npz ]; then
  echo "[$(elapsed)] preprocessing ml-1m"
  python3 preprocess_public_data.py --dataset=ml-1m --archive=.carry/ml-1m.zip
fi
python3 -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

for seed in $seeds; do
  for model in hstu sasrec; do
    run="ml-1m-$model-ranking-holdout10-seed$seed"
    echo "[$(elapsed)] $run"
    python3 main.py --fresh --gin_config_file="configs/ml-1m/$model-ranking-holdout10.gin" \
      --gin_bindings="train_fn.random_seed=$seed" --gin_bindings="train_fn.run_name='$run'" ${extra[@]+"${extra[@]}"} \
      2>&1 | grep -v "^[IW][0-9]" | tee "$results/$run.log"
    cp "exps/ml-1m-l200/$run/results.json" "$results/$run.json"
  done
done

echo "[$(elapsed)] report"
python3 -m generative_recommenders.report "$results"/ml-1m-*-ranking-holdout10-seed*.json > "$results/table.md"
cat "$results/table.md"
python3 -m generative_recommenders.report "$results"/ml-1m-*-ranking-holdout10-seed*.json \
  --plot "$results/curves.png" > /dev/null || echo "curves.png not written (see the error above); table.md is"
echo "[$(elapsed)] done"
