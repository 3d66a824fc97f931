"""Per-user interaction sequences in a flat, fast-loading form.

A data set is one `.npz` file of flat arrays plus offsets: user u's
interactions, in time order, are rows `offsets[u]:offsets[u + 1]` of
`item_ids`, `ratings` and `timestamps`. Item ids are the ids the model sees
(1..max_item_id; 0 is padding). Loading ml-1m takes milliseconds, against
seconds for re-parsing the release's CSV of comma-joined strings.

Files are written atomically (temporary file, fsync, rename), so a reader
never sees a half-written cache; `load_sequences` also checks the arrays
against each other and against the counts stored with them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from generative_recommenders.files import atomic_write

CACHE_FILE = "sequences.npz"
FORMAT_VERSION = 1
SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST = 0, 1, 2
_OPTIONAL_ARRAYS = ("user_split", "item_keys", "item_titles", "user_keys")


@dataclasses.dataclass
class SequenceData:
    """All users' sequences of one data set, plus its candidate item ids."""

    name: str
    item_ids: np.ndarray  # int32 (total,)
    ratings: np.ndarray  # float32 (total,)
    timestamps: np.ndarray  # int64 (total,)
    offsets: np.ndarray  # int64 (num_users + 1,)
    user_ids: np.ndarray  # int64 (num_users,), the data set's own user ids
    candidate_ids: np.ndarray  # int32 sorted: items that can be recommended / sampled
    user_features: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # Session data sets: SPLIT_TRAIN / SPLIT_VALID / SPLIT_TEST of each sequence (None: one sequence per user).
    user_split: Optional[np.ndarray] = None  # int8 (num_users,)
    # Per item id (index 0 = padding): the source's own id, and a title where the source has one.
    item_keys: Optional[np.ndarray] = None  # str (max_item_id + 1,)
    item_titles: Optional[np.ndarray] = None  # str (max_item_id + 1,)
    # Per user, the source's own id where it is text (user_ids then count 1..n): what recommend.py shows.
    user_keys: Optional[np.ndarray] = None  # str (num_users,)

    @property
    def num_users(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def num_interactions(self) -> int:
        return int(self.item_ids.shape[0])

    @property
    def max_item_id(self) -> int:
        return int(max(self.item_ids.max(initial=0), self.candidate_ids.max(initial=0)))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, user: int) -> np.ndarray:
        return self.item_ids[self.offsets[user] : self.offsets[user + 1]]

    def validate(self) -> None:
        """Raises ValueError when the arrays are inconsistent."""
        total = self.num_interactions
        problems = []
        if self.offsets.ndim != 1 or self.offsets.shape[0] < 1 or self.offsets[0] != 0:
            problems.append("offsets must be 1-D and start at 0")
        elif self.offsets[-1] != total or np.any(np.diff(self.offsets) < 0):
            problems.append("offsets must be non-decreasing and end at the number of interactions")
        for field in ("ratings", "timestamps"):
            if getattr(self, field).shape != (total,):
                problems.append(f"{field} has shape {getattr(self, field).shape}, expected ({total},)")
        if self.user_ids.shape != (self.num_users,):
            problems.append("user_ids must have one entry per user")
        if total and self.item_ids.min() < 1:
            problems.append("item ids must be >= 1 (0 is padding)")
        if self.candidate_ids.size == 0 or self.candidate_ids.min() < 1:
            problems.append("candidate ids must be non-empty and >= 1")
        for key, values in self.user_features.items():
            if values.shape[0] != self.num_users:
                problems.append(f"user feature {key} must have one entry per user")
        if self.user_split is not None and (self.user_split.shape != (self.num_users,)
                                            or not np.isin(self.user_split, (SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST)).all()):
            problems.append("user_split must hold one of 0 (train), 1 (valid), 2 (test) per sequence")
        for field in ("item_keys", "item_titles"):
            values = getattr(self, field)
            if values is not None and values.shape != (self.max_item_id + 1,):
                problems.append(f"{field} must have one entry per item id 0..{self.max_item_id}")
        if self.user_keys is not None and self.user_keys.shape != (self.num_users,):
            problems.append("user_keys must have one entry per user")
        if problems:
            raise ValueError(f"invalid sequence data {self.name!r}: " + "; ".join(problems))

    def summary(self) -> Dict[str, int]:
        return {
            "users": self.num_users,
            "items": int(np.count_nonzero(np.bincount(self.item_ids))) if self.num_interactions else 0,
            "max_item_id": self.max_item_id,
            "candidates": int(self.candidate_ids.size),
            "interactions": self.num_interactions,
        }


def save_sequences(data: SequenceData, path: Path) -> None:
    """Writes `data` to `path` (an .npz file) atomically."""
    data.validate()
    arrays = {
        "item_ids": data.item_ids.astype(np.int32),
        "ratings": data.ratings.astype(np.float32),
        "timestamps": data.timestamps.astype(np.int64),
        "offsets": data.offsets.astype(np.int64),
        "user_ids": data.user_ids.astype(np.int64),
        "candidate_ids": data.candidate_ids.astype(np.int32),
    }
    for key, values in data.user_features.items():
        arrays[f"user_feature.{key}"] = values
    for field in _OPTIONAL_ARRAYS:
        if getattr(data, field) is not None:
            arrays[field] = getattr(data, field)
    meta = {"format_version": FORMAT_VERSION, "name": data.name, **data.summary()}
    arrays["meta_json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def load_sequences(path: Path) -> SequenceData:
    """Reads a file written by `save_sequences`; raises ValueError if it is not one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        meta = json.loads(arrays.pop("meta_json").tobytes().decode())
    except Exception as exc:
        raise ValueError(f"{path} is not a readable sequence cache ({exc}); re-run preprocessing") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has cache format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    features = {
        key.split(".", 1)[1]: arrays.pop(key) for key in list(arrays) if key.startswith("user_feature.")
    }
    data = SequenceData(name=meta["name"], user_features=features, **arrays)
    data.validate()
    summary = data.summary()
    if summary != {k: meta.get(k) for k in summary}:
        raise ValueError(f"{path}: arrays do not match the counts stored with them; re-run preprocessing")
    return data
