"""A text score fused into embedding search: char-trigram BM25 of what a reader found on a
query's photo against each gallery entry's text, min-max scaled per query, added to the
cosine with a weight ``alpha`` (chosen on validation queries by the caller).

Trigrams of folded words tolerate OCR's dropped and confused letters, which whole-word
matching does not: ``"arla"`` read as ``"arl4"`` still shares ``" ar"`` and ``"arl"``.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np

from ..attributes.visual_reader import fold


def trigram_bag(text: str) -> Counter:
    """Char trigrams of each folded word padded with spaces (word starts and ends count)."""
    grams: Counter = Counter()
    for word in fold(text).split():
        padded = f" {word} "
        grams.update(padded[i : i + 3] for i in range(len(padded) - 2))
    return grams


class TrigramBM25:
    """Okapi BM25 over char trigrams, fitted on the gallery's documents."""

    def __init__(self, documents: Sequence[str], k1: float = 1.2, b: float = 0.75):
        self.bags = [trigram_bag(doc) for doc in documents]
        self.lengths = np.array([sum(bag.values()) for bag in self.bags], dtype=np.float64)
        self.mean_length = max(float(self.lengths.mean()) if len(self.lengths) else 0.0, 1.0)
        document_frequency: Counter = Counter(gram for bag in self.bags for gram in bag)
        n = len(self.bags)
        self.idf = {gram: math.log(1 + (n - count + 0.5) / (count + 0.5)) for gram, count in document_frequency.items()}
        self.k1, self.b = k1, b

    def scores(self, query: str) -> np.ndarray:
        """BM25 of ``query`` against every document, ``float64 [len(documents)]``."""
        out = np.zeros(len(self.bags))
        for gram in set(trigram_bag(query)):
            idf = self.idf.get(gram)
            if idf is None:
                continue
            for j, bag in enumerate(self.bags):
                tf = bag.get(gram, 0)
                if tf:
                    out[j] += idf * tf * (self.k1 + 1) / (tf + self.k1 * (1 - self.b + self.b * self.lengths[j] / self.mean_length))
        return out

    def matrix(self, queries: Sequence[str]) -> np.ndarray:
        """Scores of each query (rows) against every document, min-max scaled per row."""
        if not queries:
            return np.zeros((0, len(self.bags)))
        return min_max_rows(np.stack([self.scores(query) for query in queries]))


def min_max_rows(scores: np.ndarray) -> np.ndarray:
    """Each row scaled to [0, 1] (a constant row becomes 0), so one weight suits every query."""
    low, high = scores.min(axis=1, keepdims=True), scores.max(axis=1, keepdims=True)
    return np.where(high > low, (scores - low) / np.maximum(high - low, 1e-12), 0.0)
