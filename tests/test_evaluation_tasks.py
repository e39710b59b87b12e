"""kNN classification, clustering and cross-set retrieval on hand-made embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from afmrl_dagster.retrieval.tasks import (
    clustering_scores,
    combine_retrieval,
    cross_set_retrieval,
    knn_classification_accuracy,
)


def separated_clusters(points_per_cluster: int = 6, seed: int = 0):
    """Three tight clusters around orthogonal axes: any sane clustering recovers them."""
    rng = np.random.default_rng(seed)
    centres = np.eye(3, 8)
    rows = [centre + 0.01 * rng.standard_normal(8) for centre in centres for _ in range(points_per_cluster)]
    labels = [name for name in "abc" for _ in range(points_per_cluster)]
    return np.array(rows), labels


def test_perfectly_separated_clusters_score_one():
    embeddings, labels = separated_clusters()
    scores = clustering_scores(embeddings, labels, seed=0)
    assert scores["nmi"] == pytest.approx(1.0) and scores["ari"] == pytest.approx(1.0)
    assert scores["purity"] == 1.0 and scores["num_clusters"] == 3


def test_clustering_of_mixed_labels_scores_below_one():
    embeddings, labels = separated_clusters()
    # Two labels spread over the three clusters: no clustering can be pure.
    mixed = ["x" if i % 2 else "y" for i in range(len(labels))]
    scores = clustering_scores(embeddings, mixed, seed=0)
    assert scores["num_clusters"] == 2
    assert scores["purity"] < 1.0 and scores["nmi"] < 0.5 and scores["ari"] < 0.5


def test_clustering_is_reproducible_with_a_seed():
    rng = np.random.default_rng(1)
    embeddings, labels = rng.standard_normal((30, 5)), [str(i % 4) for i in range(30)]
    assert clustering_scores(embeddings, labels, seed=3) == clustering_scores(embeddings, labels, seed=3)


def test_knn_on_separated_clusters_is_perfect():
    embeddings, labels = separated_clusters()
    assert knn_classification_accuracy(embeddings, labels, k=3) == 1.0


def test_knn_hand_made_case_majority_and_tie_by_nearest():
    # Angles on the unit circle (degrees) and labels; cosine similarity falls with angle.
    angles = np.radians([0, 10, 20, 30, 90, 100])
    embeddings = np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.array([[1.0], [2.0], [1.0], [3.0], [1.0], [1.0]])
    labels = ["a", "b", "a", "b", "c", "c"]
    # k=2 from row 0: neighbours 10deg (b), 20deg (a) -> tie, nearest is b: wrong.
    # row 1 (10): 0 (a) and 20 (a) -> a: wrong.  row 2 (20): 10 (b), 30 (b) -> b: wrong.
    # row 3 (30): 20 (a), 10 (b) -> tie, nearest a: wrong.  row 4 (90): 100 (c), 30 (b) -> tie, nearest c: right.
    # row 5 (100): 90 (c), 30 (b) -> c: right.  The norms must not matter (cosine).
    assert knn_classification_accuracy(embeddings, labels, k=2) == pytest.approx(2 / 6)
    # k=1: row 0 -> b, 1 -> a, 2 -> b (10 and 30 tie; lower row first), 3 -> a, 4 -> c, 5 -> c.
    assert knn_classification_accuracy(embeddings, labels, k=1) == pytest.approx(2 / 6)
    # Only rows 4 and 5 as queries, every other row still a neighbour.
    mask = np.array([False, False, False, False, True, True])
    assert knn_classification_accuracy(embeddings, labels, k=2, query_mask=mask) == 1.0
    # k=3 from row 0: 10 (b), 20 (a), 30 (b) -> b.  row 4: 100 (c), 30 (b), 20 (a) -> c.
    assert knn_classification_accuracy(embeddings, labels, k=3, query_mask=np.array([True, False, False, False, True, False])) == 0.5


def test_knn_rejects_bad_inputs():
    embeddings, labels = separated_clusters()
    with pytest.raises(ValueError, match="labels"):
        knn_classification_accuracy(embeddings, labels[:-1])
    with pytest.raises(ValueError, match="k must be"):
        knn_classification_accuracy(embeddings, labels, k=0)
    with pytest.raises(ValueError, match="selects no row"):
        knn_classification_accuracy(embeddings, labels, query_mask=np.zeros(len(labels), bool))


def test_cross_set_retrieval_photo_to_catalog():
    # Two catalog images (products p, q); photos of p near p's image, one photo of q nearer p's.
    gallery = np.array([[1.0, 0.0], [0.0, 1.0]])
    queries = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    metrics = cross_set_retrieval(queries, ["p", "q", "q"], gallery, ["p", "q"])
    assert metrics["num_queries"] == 3
    assert metrics["recall@1"] == pytest.approx(2 / 3)
    assert metrics["mrr"] == pytest.approx((1 + 1 + 0.5) / 3)
    with pytest.raises(ValueError, match="one width"):
        cross_set_retrieval(queries, ["p", "q", "q"], np.ones((2, 3)), ["p", "q"])


def test_combine_retrieval_weights_by_queries():
    one = {"recall@1": 1.0, "mrr": 1.0, "num_queries": 1.0, "queries_without_match": 0.0}
    three = {"recall@1": 0.0, "mrr": 0.5, "num_queries": 3.0, "queries_without_match": 2.0}
    combined = combine_retrieval([one, three])
    assert combined == {"recall@1": 0.25, "mrr": 0.625, "num_queries": 4.0, "queries_without_match": 2.0}
