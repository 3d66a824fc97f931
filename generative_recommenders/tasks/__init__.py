"""Kinds of experiment the trainer runs (train_fn.task): each builds its samples, model, loss and evaluation.

A task gives the trainer: `config` (its TrainConfig), `model`, `splits` (sample rows, "train" and the
evaluation splits), `eval_splits`, `selection_split`, `selection_metric`, `shown_metrics`,
`shards_evaluation` (whether each rank evaluates its own share and the metrics are summed), and the
methods `describe()`, `use_cuda_graphs(device)`, `batch_total(samples)`, `loss(train_model, samples,
total)`, `evaluate(samples, max_batches)`, `baselines(samples)`, `metric_notes()` (entries for results.json
known at the start, such as metrics undefined on the data) and `final_measurements()` (entries for
results.json measured after training).
"""

from generative_recommenders.tasks.ranking import RankingTask
from generative_recommenders.tasks.retrieval import RetrievalTask

TASKS = {"retrieval": RetrievalTask, "ranking": RankingTask}
