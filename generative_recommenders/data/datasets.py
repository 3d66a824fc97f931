"""Loads a data set by name: the built-in synthetic one, or a preprocessed public one."""

from __future__ import annotations

import time
from generative_recommenders.data.sequence_store import SequenceData, load_sequences
from generative_recommenders.data.synthetic import generate_synthetic, generate_synthetic_ratings

SYNTHETIC = "synthetic"
SYNTHETIC_RATINGS = "synthetic-ratings"  # the same sequences with learnable ratings (generative ranking)


def load_dataset(name: str, data_dir: str) -> SequenceData:
    """Reads `<data_dir>/<name>/sequences.npz`; the synthetic sets are generated in memory (seconds)."""
    if name == SYNTHETIC:
        return generate_synthetic()
    if name == SYNTHETIC_RATINGS:
        return generate_synthetic_ratings()
    from generative_recommenders.data.public_datasets import ensure_preprocessed

    start = time.time()
    data = load_sequences(ensure_preprocessed(name, data_dir))
    print(f"loaded {name} from {data_dir} in {time.time() - start:.2f}s: {data.summary()}", flush=True)
    return data
