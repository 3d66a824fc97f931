"""Training throughput of each frozen config on random data of the real data sets' shapes.

    python3 benchmarks/train_throughput.py --out benchmarks/results/train_throughput_h100.jsonl

For every config under configs/{ml-1m,ml-20m,amzn-books} it builds the model
and loss exactly as main.py does, times `--steps` optimizer steps (after
`--warmup` steps) and `--eval_batches` evaluation batches on structureless
sequences with the data set's number of users, item ids, candidates and
sequence lengths, and projects the wall time of the full recipe (every epoch's
training plus the evaluations the config asks for). One JSON line per config.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import gin
import torch
from absl import app, flags

from generative_recommenders.config import TrainConfig
from generative_recommenders.cuda_graph import CudaGraphStep, token_bucket
from generative_recommenders.data.samples import history_total
from generative_recommenders.data.synthetic import random_sequences
from generative_recommenders.tasks.retrieval import RetrievalTask
from generative_recommenders.runs import versions
from generative_recommenders.trainer import TrainStep

flags.DEFINE_multi_string("config", None, "Config files (default: the nine frozen ones).")
flags.DEFINE_integer("steps", 50, "Timed training steps per config.")
flags.DEFINE_integer("warmup", 10, "Untimed steps first (compilation, autotuning).")
flags.DEFINE_integer("eval_batches", 20, "Timed evaluation batches per config.")
flags.DEFINE_string("out", None, "Append JSON lines here.")
flags.DEFINE_bool("profile", False, "Also print the torch profiler's top ops of 5 training steps (kernels are "
                  "visible only without CUDA graphs: add --binding=train_fn.cuda_graphs=False).")
flags.DEFINE_multi_string("binding", [], "Extra gin bindings for every config, e.g. train_fn.cuda_graphs=False.")
FLAGS = flags.FLAGS

# users, max item id, candidates, mean sequence length (before truncation), longest sequence.
# MovieLens figures are the real data sets'. For Books only the item count is known here
# (the raw file is not available): its user count and mean length are ASSUMPTIONS
# (600,000 users, mean 15 interactions), flagged in the output.
SHAPES = {
    "ml-1m": (6_040, 3_952, 3_883, 165.6, 2_314),
    "ml-20m": (138_493, 131_262, 26_744, 144.4, 9_254),
    "amzn-books": (600_000, 695_762, 695_762, 15.0, 400),
}
ASSUMED_SHAPES = {"amzn-books"}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench(config_file: str, device: torch.device) -> Dict:
    gin.clear_config()
    gin.parse_config_files_and_bindings([config_file], FLAGS.binding)
    config = TrainConfig()
    if config.task != "retrieval":  # ranking runs build another model and data (benchmarks/m_falcon.py times them)
        return {"config": config_file, "skipped": f"task {config.task!r}: this benchmark times retrieval configs"}
    dataset = config.dataset_name
    users, max_item_id, num_candidates, mean_len, longest = SHAPES[dataset]
    data = random_sequences(users, max_item_id, num_candidates, mean_len, longest)
    max_len, batch_size, epochs = config.max_sequence_length, config.local_batch_size, config.num_epochs
    torch.backends.cuda.matmul.allow_tf32 = True
    task = RetrievalTask(config, data, device)  # the model, loss and evaluator main.py builds
    use_graph = config.cuda_graphs and task.use_cuda_graphs(device)
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=1e-3, betas=(0.9, 0.98),
                                  fused=device.type == "cuda", capturable=use_graph)
    splits = task.splits
    train = splits["train"][torch.randperm(splits["train"].shape[0]).numpy()]
    train_on_device = torch.as_tensor(train, device=device)
    train_step = TrainStep(task, task.model, optimizer)

    def step(i: int) -> int:
        start = (i * batch_size) % (train.shape[0] - batch_size)
        total = history_total(train[start : start + batch_size], max_len)
        train_step(train_on_device[start : start + batch_size], total)
        return total

    for i in range(FLAGS.warmup):
        step(i)
    if use_graph:  # capture every token bucket the timed steps reach, so that they only replay
        first_of_bucket = {}
        for i in range(FLAGS.warmup, FLAGS.warmup + FLAGS.steps):
            start = (i * batch_size) % (train.shape[0] - batch_size)
            total = history_total(train[start : start + batch_size], max_len)
            first_of_bucket.setdefault(token_bucket(total, batch_size * config.padded_len), i)
        for i in first_of_bucket.values():
            for _ in range(CudaGraphStep.WARMUP_CALLS + 1):
                step(i)
    _sync()
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    start = time.perf_counter()
    tokens = sum(step(FLAGS.warmup + i) for i in range(FLAGS.steps))
    _sync()
    train_s = (time.perf_counter() - start) / FLAGS.steps
    if FLAGS.profile:
        with torch.profiler.profile() as prof:
            for i in range(5):
                step(i)
            _sync()
        sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70), flush=True)
    eval_batch = config.eval_batch_size
    evaluator = task.evaluator
    timed_split = splits[task.selection_split]  # "eval" (paper protocol) or "valid" (leave-one-out)
    for _ in range(CudaGraphStep.WARMUP_CALLS + 1):  # capture the token buckets of the timed batches
        evaluator(timed_split, max_batches=FLAGS.eval_batches)
    _sync()
    start = time.perf_counter()
    evaluator(timed_split, max_batches=FLAGS.eval_batches)
    _sync()
    eval_s = (time.perf_counter() - start) / FLAGS.eval_batches
    steps_per_epoch = -(-train.shape[0] // batch_size)
    # every epoch evaluates each evaluation split (leave-one-out: validation and test)
    eval_batches_full = sum(-(-splits[name].shape[0] // eval_batch) for name in task.eval_splits)
    full_every = config.full_eval_every_n
    partial = min(config.partial_eval_num_batches * len(task.eval_splits), eval_batches_full)
    full_evals = len([e for e in range(epochs) if e % full_every == 0 or e == epochs - 1])
    projected = epochs * steps_per_epoch * train_s + (full_evals * eval_batches_full + (epochs - full_evals) * partial) * eval_s
    return {
        "config": config_file, "bindings": FLAGS.binding, "dataset": dataset, "cuda_graph": use_graph, "users": users, "shape_assumed": dataset in ASSUMED_SHAPES, "batch_size": batch_size,
        "steps_per_s": 1.0 / train_s, "tokens_per_s": tokens / FLAGS.steps / train_s,
        "eval_batches_per_s": 1.0 / eval_s, "steps_per_epoch": steps_per_epoch, "epochs": epochs,
        "projected_recipe_minutes": projected / 60.0,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", **versions(),
    }


def main(argv: List[str]) -> None:
    del argv
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configs = FLAGS.config or sorted(str(p) for d in SHAPES for p in Path("configs", d).glob("*.gin"))
    for config in configs:
        torch.manual_seed(0)
        result = bench(config, device)
        line = json.dumps(result)
        print(line, flush=True)
        if FLAGS.out:
            with open(FLAGS.out, "a") as f:
                f.write(line + "\n")
        del result
        gc.collect()  # the last config's model, optimizer and graphs, before the next one's capture
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    app.run(main)
