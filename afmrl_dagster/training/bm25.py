"""BM25 between the attribute texts of the listings in a training batch (AGCL's B_ij).

IDF and document lengths are fitted once on the training catalog; each item's term
statistics are stored once as a compressed sparse row table. A batch matrix is then a
sparse gather plus one scatter-add, with no Python loop over pairs, so AGCL's weights
cost little next to the forward and backward pass.

B_ij = sum over the tokens t of item i's text (with repetition, as Okapi BM25 with an
unbounded query-term saturation) of IDF(t) * tf(t, j) (k1 + 1) / (tf(t, j) + k1 (1 - b + b |j| / avgdl)),
with IDF(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5)), which stays positive for common terms.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np
import torch

Tokenizer = Callable[[str], list[str]]

_WORD = re.compile(r"\d+(?:[.,]\d+)?|[^\W_]+")


def word_tokens(text: str) -> list[str]:
    """Lowercase word and number tokens: ``"colour: red; fat: 1.5 %"`` -> colour, red, fat, 1.5."""
    return _WORD.findall((text or "").lower())


def pair_tokens(text: str) -> list[str]:
    """One ``key=value`` token per ``key: value`` fact of an attribute text (``;``-separated).

    Whole facts match only when both key and value agree, so ``colour: red`` does not
    overlap ``trim: red``. Segments without a colon fall back to word tokens.
    """
    tokens = []
    for segment in (text or "").lower().split(";"):
        key, colon, value = segment.partition(":")
        key, value = " ".join(key.split()), " ".join(value.split())
        if colon and key and value:
            tokens.append(f"{key}={value}")
        elif segment.strip():
            tokens.extend(word_tokens(segment))
    return tokens


TOKENIZERS: dict[str, Tokenizer] = {"words": word_tokens, "pairs": pair_tokens}


def resolve_tokenizer(tokenizer: str | Tokenizer) -> Tokenizer:
    """A tokenizer by name (``words``, ``pairs``) or the callable itself."""
    if callable(tokenizer):
        return tokenizer
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {sorted(TOKENIZERS)} or a callable")
    return TOKENIZERS[tokenizer]


class BM25Scorer:
    """BM25 fitted on a corpus; scores pairs of corpus items by index."""

    def __init__(self, corpus_texts: Sequence[str], k1: float = 1.2, b: float = 0.75, tokenizer: str | Tokenizer = "words"):
        if k1 < 0:
            raise ValueError(f"k1 must be >= 0, got {k1}")
        if not 0.0 <= b <= 1.0:
            raise ValueError(f"b must be in [0, 1], got {b}")
        self.k1, self.b = float(k1), float(b)
        self.tokenize = resolve_tokenizer(tokenizer)
        self.vocabulary: dict[str, int] = {}
        per_item_terms, per_item_counts, lengths = [], [], []
        for text in corpus_texts:
            ids = np.array([self.vocabulary.setdefault(token, len(self.vocabulary)) for token in self.tokenize(text)], dtype=np.int64)
            terms, counts = np.unique(ids, return_counts=True)
            per_item_terms.append(terms)
            per_item_counts.append(counts)
            lengths.append(len(ids))
        self.num_items = len(lengths)
        sizes = np.array([len(terms) for terms in per_item_terms], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        terms = np.concatenate(per_item_terms) if per_item_terms else np.zeros(0, np.int64)
        counts = (np.concatenate(per_item_counts) if per_item_counts else np.zeros(0, np.int64)).astype(np.float64)
        document_frequency = np.bincount(terms, minlength=len(self.vocabulary)).astype(np.float64)
        self.idf = np.log1p((self.num_items - document_frequency + 0.5) / (document_frequency + 0.5))
        self.lengths = np.asarray(lengths, dtype=np.float64)
        self.average_length = float(self.lengths.mean()) if self.num_items and self.lengths.mean() > 0 else 1.0
        item_of_entry = np.repeat(np.arange(self.num_items), sizes)
        norm = self.k1 * (1.0 - self.b + self.b * self.lengths[item_of_entry] / self.average_length)
        doc_weight = self.idf[terms] * counts * (self.k1 + 1.0) / (counts + norm)
        # Gathers run in numpy: for a few thousand entries its per-call cost is lower than
        # torch's, and it does not compete for intra-op threads with the training step.
        self._indptr = indptr
        self._terms = terms
        self._query_counts = counts.astype(np.float32)
        self._doc_weights = doc_weight.astype(np.float32)

    def _gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row in batch, position in the CSR arrays) of every stored term of ``indices``."""
        starts = self._indptr[indices]
        lengths = self._indptr[indices + 1] - starts
        rows = np.repeat(np.arange(len(indices)), lengths)
        first = np.repeat(np.cumsum(lengths) - lengths, lengths)
        positions = starts[rows] + np.arange(int(lengths.sum())) - first
        return rows, positions

    def _check(self, indices) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= self.num_items):
            raise ValueError(f"indices must lie in [0, {self.num_items}), got range [{int(indices.min())}, {int(indices.max())}]")
        return indices

    def batch_matrix(self, indices, doc_indices=None) -> torch.Tensor:
        """``[len(indices), len(doc_indices)]`` float32 with entry (i, j) = BM25(query=item i's text, doc=item j's text).

        ``doc_indices`` defaults to ``indices`` (the square in-batch matrix, diagonal included).
        """
        queries = self._check(indices)
        docs = queries if doc_indices is None else self._check(doc_indices)
        doc_rows, doc_positions = self._gather(docs)
        # Dense document side over only the terms that occur in the batch's documents...
        batch_terms, column = np.unique(self._terms[doc_positions], return_inverse=True)
        if len(batch_terms) == 0:
            return torch.zeros(len(queries), len(docs))
        dense_docs = np.zeros((len(batch_terms), len(docs)), dtype=np.float32)
        dense_docs[column, doc_rows] = self._doc_weights[doc_positions]
        # ...and a sparse query side: the product costs (query terms in the batch) x (docs).
        query_rows, query_positions = self._gather(queries)
        query_terms = self._terms[query_positions]
        slot = np.minimum(np.searchsorted(batch_terms, query_terms), len(batch_terms) - 1)
        shared = batch_terms[slot] == query_terms
        sparse_queries = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([query_rows[shared], slot[shared]])),
            torch.from_numpy(self._query_counts[query_positions[shared]]),
            (len(queries), len(batch_terms)),
            check_invariants=False,
        )
        return torch.sparse.mm(sparse_queries, torch.from_numpy(dense_docs))
