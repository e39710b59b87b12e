"""Evaluation tasks on listing embeddings beyond identical-product retrieval.

- kNN classification: does a listing's neighbourhood name its label (product line, coarse class)?
- clustering: do k-means clusters of the embeddings recover the products?
- cross-set retrieval: queries and gallery from different subsets or modalities (store photo
  to catalog image, one shop's table to another's).

Plain numpy/torch/scikit-learn; every result is deterministic for fixed inputs and seed.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from .metrics import retrieval_metrics


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    matrix = np.asarray(embeddings, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [N, dim], got shape {matrix.shape}")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


def _vote(neighbour_labels: Sequence) -> object:
    """Majority label of ``neighbour_labels`` (nearest first); a tie goes to the label seen nearest."""
    counts = Counter(neighbour_labels)
    best = max(counts.values())
    return next(label for label in neighbour_labels if counts[label] == best)


def knn_classification_accuracy(
    embeddings: np.ndarray,
    labels: Sequence,
    k: int = 5,
    query_mask: np.ndarray | None = None,
    chunk_size: int = 1024,
) -> float:
    """Leave-one-out kNN accuracy: each query row is labelled by the majority of its ``k``
    cosine-nearest other rows (ties: the label met nearest), against its true label.

    ``query_mask`` (bool ``[N]``) picks the rows that are classified; every row other than the
    query itself is a candidate neighbour. Ties in similarity go to the lower row index.
    """
    unit = _unit_rows(embeddings)
    labels = list(labels)
    if len(labels) != len(unit):
        raise ValueError(f"{len(unit)} embeddings but {len(labels)} labels")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(unit) < 2:
        raise ValueError("kNN needs at least 2 rows (a query and a neighbour)")
    mask = np.ones(len(unit), bool) if query_mask is None else np.asarray(query_mask, dtype=bool)
    if mask.shape != (len(unit),):
        raise ValueError(f"query_mask must have shape ({len(unit)},), got {mask.shape}")
    queries = np.flatnonzero(mask)
    if len(queries) == 0:
        raise ValueError("query_mask selects no row")
    depth = min(k, len(unit) - 1)
    correct = 0
    for start in range(0, len(queries), chunk_size):
        rows = queries[start : start + chunk_size]
        scores = unit[rows] @ unit.T
        scores[np.arange(len(rows)), rows] = -np.inf  # leave the query itself out
        # Stable sort on negated scores: equal similarities keep row order.
        nearest = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
        for row, neighbours in zip(rows, nearest):
            correct += _vote([labels[j] for j in neighbours]) == labels[row]
    return correct / len(queries)


def clustering_scores(embeddings: np.ndarray, labels: Sequence, seed: int = 0, n_init: int = 4) -> dict[str, float]:
    """k-means on the L2-normalised embeddings with one cluster per distinct label.

    Returns ``nmi`` (normalised mutual information), ``ari`` (adjusted Rand index) and
    ``purity`` (share of rows whose cluster's majority label is their own), plus
    ``num_clusters``.
    """
    unit = _unit_rows(embeddings)
    labels = [str(label) for label in labels]
    if len(labels) != len(unit):
        raise ValueError(f"{len(unit)} embeddings but {len(labels)} labels")
    if len(unit) == 0:
        raise ValueError("clustering needs at least one row")
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    num_clusters = len(set(labels))
    clusters = KMeans(n_clusters=num_clusters, n_init=n_init, random_state=seed).fit_predict(unit)
    majority = 0
    for cluster in np.unique(clusters):
        members = [labels[i] for i in np.flatnonzero(clusters == cluster)]
        majority += Counter(members).most_common(1)[0][1]
    return {
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ari": float(adjusted_rand_score(labels, clusters)),
        "purity": majority / len(labels),
        "num_clusters": float(num_clusters),
    }


def cross_set_retrieval(
    query_embeddings: np.ndarray,
    query_product_ids: Sequence[str],
    gallery_embeddings: np.ndarray,
    gallery_product_ids: Sequence[str],
    query_listing_ids: Sequence[str] | None = None,
    gallery_listing_ids: Sequence[str] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    map_k: int = 10,
) -> dict[str, float]:
    """Identical-product retrieval of queries from one set against a gallery from another
    (store photo -> catalog image, text -> image, one shop -> another); see
    :func:`~afmrl_dagster.retrieval.metrics.retrieval_metrics` for the metrics. Listing ids,
    when given, keep a listing present in both sets from matching itself."""
    queries = np.asarray(query_embeddings, dtype=np.float32)
    gallery = np.asarray(gallery_embeddings, dtype=np.float32)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"query and gallery embeddings must be 2-D with one width, got {queries.shape} and {gallery.shape}")
    if len(gallery) == 0:
        raise ValueError("the gallery is empty")
    return retrieval_metrics(
        queries, gallery, list(query_product_ids), list(gallery_product_ids),
        query_listing_ids=query_listing_ids, gallery_listing_ids=gallery_listing_ids, ks=ks, map_k=map_k,
    )


def combine_retrieval(results: Sequence[dict[str, float]]) -> dict[str, float]:
    """Metrics of several retrieval runs pooled as one: per-query means weighted by ``num_queries``."""
    if not results:
        raise ValueError("nothing to combine")
    scored = sum(result["num_queries"] for result in results)
    combined = {}
    for name in results[0]:
        if name in ("num_queries", "queries_without_match"):
            combined[name] = float(sum(result[name] for result in results))
        else:
            combined[name] = sum(result[name] * result["num_queries"] for result in results) / max(scored, 1.0)
    return combined
