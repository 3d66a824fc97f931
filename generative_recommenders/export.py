"""Item and user embeddings of a trained run, for nearest-neighbour search (e.g. faiss IndexFlatIP).

    python3 -m generative_recommenders.export --run_dir=exps/synthetic-l50/hstu-default --out=embeddings.npz

The .npz holds float32, C-contiguous arrays that faiss takes as they are:

- item_embeddings (C, D): the vectors the model scores its C candidates with
  (L2-normalised under train_fn.item_l2_norm, the default of every config);
  item_ids (C,): their ids in the model; item_keys (C,): the source's own
  ids, where the data set keeps them.
- user_embeddings (U, D): each user's query after their whole history (the
  queries recommend.py ranks with); user_ids (U,): the data set's user ids;
  user_keys (U,): the source's own ids, where they are text (an own log's).

A user's inner products with the items are recommend.py's scores; recommend.py
then removes the user's history items (user protocols), a plain search does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from absl import app, flags

from generative_recommenders.config import ConfigError
from generative_recommenders.files import atomic_write, check_output_file
from generative_recommenders.trained_run import TrainedRun, load_run, query_batches, query_sequences, run_cli

FLAGS = flags.FLAGS


def _float32(vectors: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(vectors.detach().cpu().numpy(), dtype=np.float32)


@torch.no_grad()
def embeddings(run: TrainedRun) -> Dict[str, np.ndarray]:
    """The arrays of the module docstring."""
    model, index, data = run.task.model, run.task.index, run.data
    sequences, samples = query_sequences(data, np.arange(data.num_users), run.device)
    users = torch.cat([run.task.evaluator.queries(batch).cpu()  # recommend.py's (the evaluation's) queries
                       for batch in query_batches(run, sequences, samples)])
    arrays = {"item_embeddings": _float32(model.item_vectors(index.candidate_ids)),
              "item_ids": index.candidate_ids.cpu().numpy().astype(np.int64),
              "user_embeddings": _float32(users), "user_ids": data.user_ids.astype(np.int64)}
    if data.item_keys is not None:
        arrays["item_keys"] = data.item_keys[arrays["item_ids"]]
    if data.user_keys is not None:
        arrays["user_keys"] = data.user_keys
    return arrays


def save(arrays: Dict[str, np.ndarray], path: str) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    atomic_write(Path(path), write)


def _main() -> None:
    if not (FLAGS.out or "").endswith(".npz"):
        raise ConfigError(f"--out must name an .npz file, got {FLAGS.out}")
    check_output_file(Path(FLAGS.out))  # as recommend does: before the work, and no directory is made for it
    run = load_run(FLAGS.run_dir, FLAGS.epoch)
    print(f"{run.run_name}: {FLAGS.epoch} epoch {run.epoch + 1} ({run.checkpoint}) on {run.device}", flush=True)
    arrays = embeddings(run)
    save(arrays, FLAGS.out)
    print(f"wrote {arrays['item_embeddings'].shape[0]} item and {arrays['user_embeddings'].shape[0]} user "
          f"embeddings of dimension {arrays['item_embeddings'].shape[1]} to {FLAGS.out}")


def main(argv: List[str]) -> None:
    del argv
    run_cli(_main)


if __name__ == "__main__":
    flags.mark_flag_as_required("run_dir")
    app.run(main)
