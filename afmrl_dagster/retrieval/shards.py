"""One index per product line, searched together.

A line's refresh rebuilds its own shard (from the shared :class:`~afmrl_dagster.retrieval.index_template.IndexTemplate`
where the kind is trained), and leaves every other shard as it is. A search asks every shard
for its top-k and merges them by score, so the result is the top-k of the union (exact when
every shard is exact).
"""

from __future__ import annotations

import faiss
import numpy as np

from .index import _as_matrix, search


class ShardedIndex:
    """Shards by product line; each holds its index and the gallery rows (global ids) of its vectors."""

    def __init__(self) -> None:
        self.shards: dict[str, tuple[faiss.Index, np.ndarray]] = {}

    def put(self, line: str, index: faiss.Index, rows: np.ndarray) -> None:
        """Add or replace ``line``'s shard; ``rows[i]`` is the gallery row of the shard's vector ``i``."""
        rows = np.asarray(rows, dtype=np.int64)
        if index.ntotal != len(rows):
            raise ValueError(f"shard {line!r}: the index holds {index.ntotal} vectors but {len(rows)} rows were given")
        for other, (_, taken) in self.shards.items():
            if other != line and np.intersect1d(taken, rows).size:
                raise ValueError(f"shard {line!r} repeats gallery rows of shard {other!r}")
        self.shards[line] = (index, rows)

    def remove(self, line: str) -> None:
        self.shards.pop(line, None)

    @property
    def ntotal(self) -> int:
        return sum(index.ntotal for index, _ in self.shards.values())

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, gallery rows) per query over every shard; -1 pads where fewer exist."""
        queries = _as_matrix(queries)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores, rows = [np.full((len(queries), 0), -np.inf, dtype=np.float32)], [np.zeros((len(queries), 0), dtype=np.int64)]
        for index, global_rows in self.shards.values():
            if index.ntotal == 0:
                continue
            found_scores, found = search(index, queries, k)
            scores.append(np.where(found >= 0, found_scores, -np.inf).astype(np.float32))
            rows.append(np.where(found >= 0, global_rows[np.clip(found, 0, None)], -1))
        scores, rows = np.concatenate(scores, axis=1), np.concatenate(rows, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_scores, top_rows = np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)
        if top_rows.shape[1] < k:
            pad = k - top_rows.shape[1]
            top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            top_rows = np.pad(top_rows, ((0, 0), (0, pad)), constant_values=-1)
        return top_scores, np.where(np.isfinite(top_scores), top_rows, -1)
