"""Ranking evaluation (issues 12, 22): a generative ranking model scored on a split's held-out candidates.

Each sample is a history (the context) followed by its k held-out candidates
(data/ranking.py), scored through M-FALCON (inference/m_falcon.py): every
candidate is scored as if it alone followed the history. Paths (`PATHS`):

- "m_falcon": one fused pass over [history, k candidates] under the M-FALCON
  mask; the evaluation's path: on the ml-1m model it is faster than the cached
  one (benchmarks/results/m_falcon_h100.txt; `timing` measures both in a run).
- "cached" (HSTU only): the history encoded once, its keys and values kept,
  then the candidates in one microbatch.
- "per_candidate": one pass over [history, candidate] per candidate, what
  M-FALCON saves; `timing` compares its rate with the others'.

Predictions stay on the device until the metrics (evaluation/metrics.py) are
computed over the whole split.
"""

from __future__ import annotations

import time
from typing import Dict, Tuple, Union

import numpy as np
import torch

from generative_recommenders.data.ranking import RankingSequences
from generative_recommenders.evaluation.metrics import RankingPredictions, ranking_metrics
from generative_recommenders.inference.m_falcon import MFalconScorer
from generative_recommenders.modeling.hstu import HSTUEncoder
from generative_recommenders.modeling.ranking_model import RankingModel
from generative_recommenders.precision import autocast

PATHS = ("m_falcon", "cached", "per_candidate")


class RankingEvaluator:
    """Metrics of `model` over samples with candidates, `batch_size` samples (users) per batch."""

    def __init__(self, model: RankingModel, sequences: RankingSequences, max_history: int, batch_size: int,
                 mixed_precision: str = "none") -> None:
        self.model, self.sequences = model, sequences
        self.max_history, self.batch_size = max_history, batch_size
        self.mixed_precision = mixed_precision

    def paths(self) -> Tuple[str, ...]:
        """The scoring paths this model has (the history cache needs HSTU)."""
        return PATHS if isinstance(self.model.encoder, HSTUEncoder) else tuple(p for p in PATHS if p != "cached")

    def _scorer(self, path: str, num_slots: int) -> MFalconScorer:
        if path not in self.paths():
            raise ValueError(f"scoring path must be one of {', '.join(self.paths())} for this model, got {path!r}")
        return MFalconScorer(self.model, 1 if path == "per_candidate" else num_slots, use_cache=path == "cached")

    @torch.no_grad()
    def predictions(self, samples: np.ndarray, path: str = "m_falcon") -> RankingPredictions:
        """(S, max candidates) predictions of the samples' candidates, scored along `path`.

        The encoder runs under `mixed_precision` (precision.py); the heads and predictions are fp32.
        """
        if samples.shape[0] == 0 or not (samples[:, 2] > 0).all():
            raise ValueError("evaluation samples need at least one candidate each")
        num_slots = int(samples[:, 2].max())
        scorer = self._scorer(path, num_slots)
        on_device = torch.as_tensor(samples, device=self.sequences.offsets.device)  # one upload
        histories = on_device * torch.tensor([1, 1, 0], device=on_device.device)  # the samples without candidates
        history_tokens = 2 * np.minimum(samples[:, 1], self.max_history)
        heads = self.model.heads
        parts = []
        for start in range(0, samples.shape[0], self.batch_size):
            end = start + self.batch_size
            history = self.sequences.gather(histories[start:end], self.max_history, 2 * self.max_history,
                                            int(history_tokens[start:end].sum()), False)
            item_ids, timestamps, ratings, valid = self.sequences.candidates(on_device[start:end], num_slots)
            with autocast(self.mixed_precision, on_device.device):
                outputs = scorer(history, item_ids, timestamps)
            parts.append(RankingPredictions(
                liked_prob=torch.sigmoid(outputs["liked"]), expected_rating=heads.expected_rating(outputs),
                rating_class=heads.rating_class(outputs), ratings=ratings, valid=valid))
        return RankingPredictions.concat(parts)

    def __call__(self, samples: np.ndarray) -> Dict[str, float]:
        return ranking_metrics(self.predictions(samples))

    def timing(self, samples: np.ndarray, repeats: int = 3) -> Dict[str, Union[int, Dict[str, float]]]:
        """Each path's seconds (median of `repeats`, after a warm-up batch) and candidates per second scoring
        `samples`; for M-FALCON's paths also the speed-up over one pass per candidate and the largest gap in
        liked probability to it."""
        counts: Dict[str, Union[int, Dict[str, float]]] = {"users": int(samples.shape[0]),
                                                           "candidates": int(samples[:, 2].sum())}
        reference = None
        for path in ("per_candidate",) + tuple(p for p in self.paths() if p != "per_candidate"):
            seconds, scored = self._timed(samples, path, repeats)
            measured = {"seconds": seconds, "candidates_per_second": counts["candidates"] / seconds}
            liked = scored.liked_prob[scored.valid]
            if reference is None:
                reference = measured["candidates_per_second"], liked
            else:
                measured["speedup"] = measured["candidates_per_second"] / reference[0]
                measured["max_abs_diff_liked_prob"] = float((liked - reference[1]).abs().max())
            counts[path] = measured
        return counts

    def _timed(self, samples: np.ndarray, path: str, repeats: int) -> Tuple[float, RankingPredictions]:
        device = self.sequences.offsets.device
        self.predictions(samples[: self.batch_size], path)  # kernel compilation, allocator growth
        seconds = []
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            scored = self.predictions(samples, path)
            _synchronize(device)
            seconds.append(time.perf_counter() - start)
        return float(np.median(seconds)), scored


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
