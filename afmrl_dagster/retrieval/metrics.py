"""Identical-product retrieval metrics over exact inner-product rankings.

A gallery item is relevant to a query when it is a listing of the same product; the query's
own listing is never part of its ranking. Ties in score are broken by gallery order, so the
metrics are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Sequence

import numpy as np
import torch


def recall_fraction_at_k(ranked_product_ids: Sequence[str], query_product_id: str, num_relevant: int, k: int) -> float:
    """Fraction of the query's ``num_relevant`` positives found in the first ``k`` ranked items.

    The denominator is ``min(num_relevant, k)`` so that a perfect ranking scores 1 even when
    a product has more than ``k`` listings; 0 when the query has no positive.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if num_relevant <= 0:
        return 0.0
    hits = sum(1 for product in list(ranked_product_ids)[:k] if product == query_product_id)
    return hits / min(num_relevant, k)


def top_indices(scores: torch.Tensor, depth: int) -> torch.Tensor:
    """Indices ``[rows, depth]`` of the highest scores per row, ties broken by lower index.

    ``torch.topk`` alone picks arbitrarily among ties at the cut and a full stable sort is
    ~40x slower on large galleries, so: take everything above the cut value, fill up with
    the lowest-index items tied at it, then order that small set.
    """
    if depth == 0:
        return torch.zeros(len(scores), 0, dtype=torch.int64)
    cut = torch.topk(scores, depth, dim=1).values[:, -1:]
    above = scores > cut
    tied = scores == cut
    room = depth - above.sum(1, keepdim=True)
    chosen = above | (tied & (torch.cumsum(tied, dim=1) <= room))
    candidates = chosen.nonzero()[:, 1].reshape(len(scores), depth)
    order = torch.sort(-torch.gather(scores, 1, candidates), dim=1, stable=True).indices
    return torch.gather(candidates, 1, order)


def _codes(values: Sequence[str], vocabulary: dict[str, int]) -> np.ndarray:
    return np.array([vocabulary.setdefault(str(value), len(vocabulary)) for value in values], dtype=np.int64)


def per_query_retrieval(
    query_embeddings: np.ndarray,
    gallery_embeddings: np.ndarray,
    query_product_ids: Sequence[str],
    gallery_product_ids: Sequence[str],
    query_listing_ids: Sequence[str] | None = None,
    gallery_listing_ids: Sequence[str] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    map_k: int = 10,
    chunk_size: int = 512,
    rescore: Callable[[np.ndarray, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Each scored query's ``recall@k`` (0 or 1: a positive in the top k), ``map@{map_k}`` and
    ``mrr``, and the rows of the queries scored (those with a relevant gallery item once their
    own listing is excluded). The means are :func:`retrieval_metrics`; the values per query are
    what a paired comparison of two encoders on the same queries reads. ``rescore(query rows,
    scores)`` may change a chunk's cosine scores before ranking (a reader's text fused at search)."""
    queries = torch.as_tensor(np.asarray(query_embeddings, dtype=np.float32))
    gallery = torch.as_tensor(np.asarray(gallery_embeddings, dtype=np.float32))
    if len(queries) != len(query_product_ids) or len(gallery) != len(gallery_product_ids):
        raise ValueError("embeddings and product ids must have the same number of rows")
    if (query_listing_ids is None) != (gallery_listing_ids is None):
        raise ValueError("give both query_listing_ids and gallery_listing_ids, or neither")
    if not ks or min(ks) < 1 or map_k < 1:
        raise ValueError(f"ks and map_k must be >= 1, got {ks}, {map_k}")
    products: dict[str, int] = {}
    gallery_products = torch.from_numpy(_codes(gallery_product_ids, products))
    query_products = torch.from_numpy(_codes(query_product_ids, products))
    if query_listing_ids is not None:
        listings: dict[str, int] = {}
        gallery_listings = torch.from_numpy(_codes(gallery_listing_ids, listings))
        query_listings = torch.from_numpy(_codes(query_listing_ids, listings))
    depth = min(max(max(ks), map_k), len(gallery))
    positions = torch.arange(len(gallery))
    rows: list[np.ndarray] = []
    values: dict[str, list[np.ndarray]] = {name: [] for name in [*(f"recall@{k}" for k in ks), f"map@{map_k}", "mrr"]}
    for start in range(0, len(queries), chunk_size):
        stop = start + chunk_size
        scores = queries[start:stop] @ gallery.T
        relevant = query_products[start:stop, None] == gallery_products[None, :]
        if query_listing_ids is not None:
            own = query_listings[start:stop, None] == gallery_listings[None, :]
            scores = scores.masked_fill(own, float("-inf"))
            relevant &= ~own
        if rescore is not None:
            scores = rescore(np.arange(start, start + len(scores)), scores)
        num_relevant = relevant.sum(1)
        keep = num_relevant > 0
        scores, relevant, num_relevant = scores[keep], relevant[keep], num_relevant[keep]
        if len(scores) == 0:
            continue
        rows.append(start + np.flatnonzero(keep.numpy()))
        top_relevant = torch.gather(relevant, 1, top_indices(scores, depth)).float()
        for k in ks:
            values[f"recall@{k}"].append(top_relevant[:, :k].amax(1).numpy() if depth else np.zeros(len(scores), np.float32))
        cut = top_relevant[:, :map_k]
        precision = cut.cumsum(1) / torch.arange(1, cut.shape[1] + 1)
        denominator = num_relevant.clamp_max(map_k).float()
        values[f"map@{map_k}"].append(((precision * cut).sum(1) / denominator).numpy())
        # Rank of the first relevant item in the full tie-broken ranking.
        best = scores.masked_fill(~relevant, float("-inf")).amax(1, keepdim=True)
        first_index = torch.where(relevant & (scores == best), positions, len(gallery)).amin(1, keepdim=True)
        ahead = (scores > best) | ((scores == best) & (positions < first_index))
        values["mrr"].append((1.0 / (ahead.sum(1) + 1).float()).numpy())
    joined = {name: np.concatenate(parts).astype(np.float64) if parts else np.zeros(0) for name, parts in values.items()}
    return (np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)), joined


def retrieval_metrics(
    query_embeddings: np.ndarray,
    gallery_embeddings: np.ndarray,
    query_product_ids: Sequence[str],
    gallery_product_ids: Sequence[str],
    query_listing_ids: Sequence[str] | None = None,
    gallery_listing_ids: Sequence[str] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    map_k: int = 10,
    chunk_size: int = 512,
) -> dict[str, float]:
    """``recall@k`` (hit rate: at least one positive in the top k, the paper's R@K), ``map@{map_k}``, ``mrr``.

    Also ``num_queries`` (queries scored) and ``queries_without_match`` (skipped: no relevant
    gallery item once their own listing is excluded).
    """
    scored, values = per_query_retrieval(query_embeddings, gallery_embeddings, query_product_ids, gallery_product_ids,
                                         query_listing_ids, gallery_listing_ids, ks, map_k, chunk_size)
    result = {name: float(value.sum()) / max(len(scored), 1) for name, value in values.items()}
    result["num_queries"] = float(len(scored))
    result["queries_without_match"] = float(len(query_embeddings) - len(scored))
    return result
