"""The data set registry: a name -> the built-in synthetic sets, or a preprocessed public, session or own-log set.

The registry imports its sources (synthetic.py, public_datasets.py) and none of them imports it back.
"""

from __future__ import annotations

import time

from generative_recommenders.data.public_datasets import ensure_preprocessed
from generative_recommenders.data.sequence_store import SequenceData, load_sequences
from generative_recommenders.data.synthetic import (SYNTHETIC, SYNTHETIC_RATINGS, generate_synthetic,
                                                    generate_synthetic_ratings)


def load_dataset(name: str, data_dir: str) -> SequenceData:
    """Reads `<data_dir>/<name>/sequences.npz`; the synthetic sets are generated in memory (seconds)."""
    if name == SYNTHETIC:
        return generate_synthetic()
    if name == SYNTHETIC_RATINGS:
        return generate_synthetic_ratings()
    start = time.time()
    data = load_sequences(ensure_preprocessed(name, data_dir))
    print(f"loaded {name} from {data_dir} in {time.time() - start:.2f}s: {data.summary()}", flush=True)
    return data
