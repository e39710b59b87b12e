"""A text score fused into embedding search: char-trigram BM25 of what a reader found on a
query's photo against each gallery entry's text, min-max scaled per query, added to the
cosine with a weight ``alpha`` (chosen on validation queries by the caller).

Served, the fusion re-ranks the encoder's top :data:`FUSION_CANDIDATES` (:class:`ReaderFusion`):
the text score is scaled over those candidates and added to their cosines, so every other
listing keeps its place below them. The pipeline's evaluation scores queries the same way
(:meth:`ReaderFusion.rescorer`), and chooses the weight on validation from :data:`FUSION_WEIGHTS`
(0 included: where the reader does not help, nothing is fused).

Trigrams of folded words tolerate OCR's dropped and confused letters, which whole-word
matching does not: ``"arla"`` read as ``"arl4"`` still shares ``" ar"`` and ``"arl"``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Sequence

import numpy as np
import polars as pl
import torch

from ..attributes.format import parse_attributes
from ..attributes.visual_reader import fold
from ..catalog.schema import seller_attributes_dict
from .metrics import top_indices

FUSION_CANDIDATES = 100  # the encoder's top candidates a reader's text re-ranks
FUSION_WEIGHTS = tuple(round(0.05 * i, 2) for i in range(31))  # the grid the weight is chosen from, on validation


def entry_text(title: str | None, description: str | None, seller_attributes) -> str:
    """What a catalog entry says of itself: title, description and its seller attributes' values."""
    return " ".join(part for part in (title, description, *seller_attributes_dict(seller_attributes).values()) if part)


def catalog_entry_texts(listings: pl.DataFrame) -> list[str]:
    """:func:`entry_text` of every row of a listings frame (``description`` and ``seller_attributes`` when it has them)."""
    missing = [None] * listings.height
    return [entry_text(title, description, attributes) for title, description, attributes in zip(
        listings["title"].to_list(), listings["description"].to_list() if "description" in listings.columns else missing,
        listings["seller_attributes"].to_list() if "seller_attributes" in listings.columns else missing)]


def reader_text(attributes: Mapping[str, str]) -> str:
    """The text a reader's attributes give the fusion: their values, joined."""
    return " ".join(str(value) for value in attributes.values())


def reader_output_text(output: str) -> str:
    """:func:`reader_text` of a reader's attribute JSON (the evaluation's cached outputs and a
    served query photo go through this one parse)."""
    return reader_text(parse_attributes(output).attributes or {})


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

    def scores(self, query: str, documents: Sequence[int] | None = None) -> np.ndarray:
        """BM25 of ``query`` against every document (or the ``documents`` given, in their order), ``float64``."""
        rows = range(len(self.bags)) if documents is None else [int(j) for j in documents]
        out = np.zeros(len(rows))
        grams = [(gram, idf) for gram in set(trigram_bag(query)) if (idf := self.idf.get(gram)) is not None]
        for position, j in enumerate(rows):
            bag, norm = self.bags[j], self.k1 * (1 - self.b + self.b * self.lengths[j] / self.mean_length)
            for gram, idf in grams:
                tf = bag.get(gram, 0)
                if tf:
                    out[position] += idf * tf * (self.k1 + 1) / (tf + norm)
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


class ReaderFusion:
    """A reader's text fused into the encoder's ranking of one gallery (``documents``: each
    gallery listing's :func:`entry_text`, in gallery order): the top ``candidates`` by cosine
    get ``weight`` x their text score, min-max scaled over those candidates."""

    def __init__(self, documents: Sequence[str], weight: float = 0.0, candidates: int = FUSION_CANDIDATES):
        if weight < 0 or candidates < 1:
            raise ValueError(f"need weight >= 0 and candidates >= 1, got {weight}, {candidates}")
        self.bm25 = TrigramBM25(documents)
        self.weight, self.candidates = weight, candidates

    def bonus(self, text: str | None, rows: Sequence[int]) -> np.ndarray:
        """Text scores of ``text`` against the gallery ``rows``, scaled to [0, 1] over them (0 without text)."""
        if not (text or "").strip() or len(rows) == 0:
            return np.zeros(len(rows))
        return min_max_rows(self.bm25.scores(text, rows)[None, :])[0]

    def rerank(self, text: str | None, cosines: np.ndarray, rows: np.ndarray, weight: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One query's candidates (``rows`` with their ``cosines``, best first) re-ordered by the
        fused score; returns (fused scores, rows), best first (ties: the encoder's order)."""
        weight = self.weight if weight is None else weight
        fused = np.asarray(cosines, dtype=np.float64) + weight * self.bonus(text, rows)
        order = np.argsort(-fused, kind="stable")
        return fused[order], np.asarray(rows)[order]

    def rescorer(self, texts: Sequence[str | None], gallery_rows: np.ndarray | None = None) -> Callable[[float], Callable]:
        """For :func:`~.metrics.per_query_retrieval`'s ``rescore``: given a weight, a function of
        (query rows, cosine scores ``[n, gallery]``) that adds the weight x each query's bonus on
        its top candidates. ``texts``: the reader's text of each query row; ``gallery_rows``: the
        document of each gallery column (default: the same order). Bonuses are computed once per
        query and reused for every weight tried."""
        bonuses: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def with_weight(weight: float) -> Callable[[np.ndarray, torch.Tensor], torch.Tensor]:
            def rescore(query_rows: np.ndarray, scores: torch.Tensor) -> torch.Tensor:
                if weight == 0:
                    return scores
                depth = min(self.candidates, scores.shape[1])
                top = None
                out = scores.clone()
                for r, query in enumerate(int(i) for i in query_rows):
                    if query not in bonuses:
                        top = top_indices(scores, depth) if top is None else top
                        columns = top[r]
                        documents = columns.numpy() if gallery_rows is None else np.asarray(gallery_rows)[columns.numpy()]
                        bonuses[query] = columns, torch.as_tensor(self.bonus(texts[query], documents), dtype=scores.dtype)
                    columns, bonus = bonuses[query]
                    out[r, columns] += weight * bonus
                return out
            return rescore
        return with_weight
