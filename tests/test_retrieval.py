"""Retrieval metrics on hand-made rankings, faiss indexes, and the RAR retrieval reward."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from afmrl_dagster.attributes.format import listing_text, parse_attributes
from afmrl_dagster.encoders.dual_tower import DualTowerConfig, DualTowerHead
from afmrl_dagster.encoders.towers import TextFeaturizer
from afmrl_dagster.retrieval.index import IndexConfig, build_index, load_index, recall_against_exact, save_index, search
from afmrl_dagster.retrieval.metrics import recall_fraction_at_k, retrieval_metrics, top_indices
from afmrl_dagster.retrieval.reward import RetrievalReward

# scores[q][g]; with one-hot queries the gallery embeddings are the transposed table.
SCORES = np.array(
    [
        [0.8, 0.6, 0.4, 0.9, 0.1, 0.7],  # q0, product A: ranking g3(B) g0(A) g5(C) g1(A) g2(B) g4(A)
        [0.1, 0.2, 0.99, 0.5, 0.3, 0.0],  # q1, product B, is listing g2 itself: g2 excluded, g3(B) first
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # q2, product D: no match in the gallery
        [0.3, 0.9, 0.2, 0.1, 0.0, 0.9],  # q3, product C: g1(A) and g5(C) tie; lower index first
    ],
    dtype=np.float32,
)
GALLERY_PRODUCTS = ["A", "A", "B", "B", "A", "C"]
GALLERY_LISTINGS = [f"g{i}" for i in range(6)]
QUERY_PRODUCTS = ["A", "B", "D", "C"]
QUERY_LISTINGS = ["q0", "g2", "q2", "q3"]


def hand_made_metrics(**kwargs):
    return retrieval_metrics(np.eye(4, dtype=np.float32), SCORES.T.copy(), QUERY_PRODUCTS, GALLERY_PRODUCTS, QUERY_LISTINGS, GALLERY_LISTINGS, **kwargs)


def test_metrics_on_a_hand_made_ranking():
    metrics = hand_made_metrics()
    assert metrics["num_queries"] == 3 and metrics["queries_without_match"] == 1
    assert metrics["recall@1"] == pytest.approx(1 / 3)  # only q1
    assert metrics["recall@5"] == pytest.approx(1.0) and metrics["recall@10"] == pytest.approx(1.0)
    # q0: first positive at rank 2; q1: rank 1; q3: rank 2 (tie broken by gallery order).
    assert metrics["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    # AP@10: q0 positives at ranks 2, 4, 6 -> (1/2 + 2/4 + 3/6) / 3; q1 -> 1; q3 -> 1/2.
    assert metrics["map@10"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    cut = hand_made_metrics(ks=(1, 2), map_k=2, chunk_size=1)
    assert cut["recall@1"] == pytest.approx(1 / 3) and cut["recall@2"] == pytest.approx(1.0)
    # AP@2: q0 has one positive in the top 2 at rank 2, over min(3, 2) positives.
    assert cut["map@2"] == pytest.approx((0.25 + 1 + 0.5) / 3)
    assert cut["mrr"] == pytest.approx(metrics["mrr"])


def test_without_listing_ids_the_query_can_find_itself():
    metrics = retrieval_metrics(np.eye(4, dtype=np.float32), SCORES.T.copy(), QUERY_PRODUCTS, GALLERY_PRODUCTS)
    # q1 now ranks its own listing g2 (product B) first; the other queries are unchanged.
    assert metrics["recall@1"] == pytest.approx(1 / 3) and metrics["num_queries"] == 3
    with pytest.raises(ValueError, match="both"):
        retrieval_metrics(np.eye(4), SCORES.T, QUERY_PRODUCTS, GALLERY_PRODUCTS, QUERY_LISTINGS, None)


def naive_metrics(scores, query_products, gallery_products, k=5):
    hits, reciprocal, counted = 0, 0.0, 0
    for q, row in enumerate(scores):
        relevant = np.array(gallery_products) == query_products[q]
        if not relevant.any():
            continue
        counted += 1
        order = np.argsort(-row, kind="stable")
        hits += relevant[order[:k]].any()
        reciprocal += 1 / (1 + np.flatnonzero(relevant[order])[0])
    return hits / counted, reciprocal / counted


def test_metrics_match_a_naive_ranking_with_many_ties():
    rng = np.random.default_rng(0)
    queries = rng.integers(0, 3, size=(30, 4)).astype(np.float32)  # small integers: many tied scores
    gallery = rng.integers(0, 3, size=(50, 4)).astype(np.float32)
    query_products = [f"p{i}" for i in rng.integers(0, 12, 30)]
    gallery_products = [f"p{i}" for i in rng.integers(0, 10, 50)]
    metrics = retrieval_metrics(queries, gallery, query_products, gallery_products, ks=(5,), chunk_size=7)
    recall, mrr = naive_metrics(queries @ gallery.T, query_products, gallery_products)
    assert metrics["recall@5"] == pytest.approx(recall) and metrics["mrr"] == pytest.approx(mrr)


def test_top_indices_breaks_ties_by_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0], [0.0, 0.0, 0.0, 5.0, 0.0, 0.0]])
    assert top_indices(scores, 3).tolist() == [[1, 2, 4], [3, 0, 1]]
    expected = np.argsort(-scores.numpy(), axis=1, kind="stable")
    assert top_indices(scores, 6).tolist() == expected.tolist()


def test_recall_fraction_at_k():
    ranked = ["a", "b", "a", "c", "a"]
    assert recall_fraction_at_k(ranked, "a", num_relevant=3, k=3) == pytest.approx(2 / 3)
    assert recall_fraction_at_k(ranked, "a", num_relevant=3, k=2) == pytest.approx(1 / 2)
    assert recall_fraction_at_k(ranked, "a", num_relevant=3, k=50) == pytest.approx(1.0)
    assert recall_fraction_at_k(ranked, "z", num_relevant=0, k=5) == 0.0
    with pytest.raises(ValueError):
        recall_fraction_at_k(ranked, "a", 1, 0)


def clustered(n=1500, dim=32, clusters=40, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    points = centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(
    "config, minimum",
    [(IndexConfig(), 1.0), (IndexConfig(kind="hnsw", hnsw_m=16), 0.9), (IndexConfig(kind="ivf", nlist=16, nprobe=16), 1.0)],
)
def test_indexes_search_and_round_trip(tmp_path, config, minimum):
    embeddings = clustered()
    index = build_index(embeddings, config)
    assert index.ntotal == len(embeddings)
    assert recall_against_exact(index, embeddings, sample_size=100, k=10) >= minimum
    scores, rows = search(index, embeddings[:3], k=5)
    assert rows.shape == (3, 5) and rows[:, 0].tolist() == [0, 1, 2]  # each point finds itself first
    np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-5)
    path = save_index(index, tmp_path / "indexes" / f"{config.kind}.faiss")
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    loaded_scores, loaded_rows = search(load_index(path), embeddings[:3], k=5)
    np.testing.assert_array_equal(loaded_rows, rows)
    np.testing.assert_allclose(loaded_scores, scores, rtol=1e-6)


def test_small_ivf_search_caps_k_and_config_validation():
    embeddings = clustered(n=10)
    index = build_index(embeddings, IndexConfig(kind="ivf", nlist=64, nprobe=8, use_gpu=True))
    assert index.nlist == 10
    _, rows = search(index, embeddings[:2], k=50)
    assert rows.shape == (2, 10)
    with pytest.raises(ValueError, match="kind"):
        IndexConfig(kind="lsh")


# --- RAR reward -----------------------------------------------------------------------

TITLE = "cotton crew t-shirt"
COLOURS = ["red", "blue", "green", "black"]


@pytest.fixture(scope="module")
def reward_setup():
    torch.manual_seed(0)
    featurizer = TextFeaturizer()
    head = DualTowerHead(DualTowerConfig(embed_dim=32, image_dim=24, text_dim=featurizer.dim, hidden_dim=32))
    rng = np.random.default_rng(0)
    # Four products of one line that look alike and differ only by colour, three listings
    # each, so attributes decide the ranking; plus a singleton product.
    product_images = np.repeat(np.abs(rng.normal(size=(1, 24))), len(COLOURS), axis=0).astype(np.float32)
    products, listings, texts, image = [], [], [], []
    for p, colour in enumerate(COLOURS):
        for copy in range(3):
            products.append(f"shirt-{colour}")
            listings.append(f"{colour}-{copy}")
            texts.append(listing_text(TITLE, {"colour": colour}))
            image.append(product_images[p])
    products.append("mug")
    listings.append("mug-0")
    texts.append(listing_text("white mug", {"material": "ceramic"}))
    image.append(np.abs(rng.normal(size=24)).astype(np.float32))
    image = np.stack(image)
    with torch.inference_mode():
        gallery = head.eval()(torch.from_numpy(image), torch.ones(len(image), dtype=torch.bool), torch.from_numpy(featurizer.encode(texts))).numpy()
    query_rows = [0, 3, 12]  # red-0, blue-0, mug-0: each is also in the gallery
    reward = RetrievalReward(
        head, featurizer, [TITLE, TITLE, "white mug"], image[query_rows], np.ones(3, dtype=bool),
        [products[r] for r in query_rows], [listings[r] for r in query_rows], gallery, products, listings,
        k=2, vocabulary={"colour", "size", "material"},
    )
    return reward, featurizer, head, gallery, products, listings, image[query_rows]


def naive_reward(setup, query, text, k=2):
    reward, featurizer, head, gallery, products, listings, query_image = setup
    parsed = parse_attributes(text, reward.vocabulary)
    if not parsed.is_valid:
        return -0.1
    title = reward.query_titles[query]
    with torch.inference_mode():
        embedding = head(
            torch.from_numpy(query_image[query : query + 1]), torch.ones(1, dtype=torch.bool),
            torch.from_numpy(featurizer.encode([listing_text(title, parsed.attributes)])),
        ).numpy()[0]
    own = listings.index(reward_query_listing(query))
    scores = gallery @ embedding
    scores[own] = -np.inf
    ranked = [products[i] for i in np.argsort(-scores, kind="stable")]
    positives = sum(p == products[own] for i, p in enumerate(products) if i != own)
    return recall_fraction_at_k(ranked, products[own], positives, k)


def reward_query_listing(query):
    return ["red-0", "blue-0", "mug-0"][query]


def test_reward_matches_naive_recomputation(reward_setup):
    reward = reward_setup[0]
    texts = [
        ['{"colour": "red"}', "not json", '{"colour": "blue"}', '```json\n{"colour": "red", "size": "xl"}\n```'],
        ['{"colour": "blue"}', '{"brand": "acme"}', "{}", '{"colour": "green"}'],
    ]
    rewards = reward(np.array([0, 1]), texts)
    assert rewards.shape == (2, 4) and rewards.dtype == np.float32
    expected = np.array([[naive_reward(reward_setup, q, t) for t in row] for q, row in zip([0, 1], texts)], dtype=np.float32)
    np.testing.assert_allclose(rewards, expected, atol=1e-6)
    # The right colour reproduces the gallery listings of the product exactly: both positives found.
    assert rewards[0, 0] == 1.0 and rewards[1, 0] == 1.0
    assert rewards[0, 1] == pytest.approx(-0.1) and rewards[1, 1] == pytest.approx(-0.1)  # not JSON; key outside vocabulary
    assert rewards[0, 2] == 0.0 and rewards[1, 3] == 0.0  # a wrong colour retrieves the sibling product
    assert reward.last_stats["valid_fraction"] == pytest.approx(6 / 8)


def test_reward_for_query_without_positives_and_input_checks(reward_setup):
    reward = reward_setup[0]
    assert reward.has_positives.tolist() == [True, True, False]
    assert reward.num_positives.tolist() == [2, 2, 0]
    rewards = reward(np.array([2]), [[json.dumps({"material": "ceramic"}), "[]"]])
    np.testing.assert_allclose(rewards, [[0.0, -0.1]])
    with pytest.raises(ValueError, match="same number"):
        reward(np.array([0, 1]), [["{}"], ["{}", "{}"]])
    with pytest.raises(ValueError, match="groups"):
        reward(np.array([0]), [["{}"], ["{}"]])


def naive_graded(setup, query, text, kind):
    """Reciprocal rank of the first true match, or the cosine margin over the best wrong listing."""
    reward, featurizer, head, gallery, products, listings, query_image = setup
    parsed = parse_attributes(text, reward.vocabulary)
    if not parsed.is_valid:
        return -0.1
    with torch.inference_mode():
        embedding = head(
            torch.from_numpy(query_image[query : query + 1]), torch.ones(1, dtype=torch.bool),
            torch.from_numpy(featurizer.encode([listing_text(reward.query_titles[query], parsed.attributes)])),
        ).numpy()[0]
    own = listings.index(reward_query_listing(query))
    scores = {i: float(gallery[i] @ embedding) for i in range(len(gallery)) if i != own}
    true = max(s for i, s in scores.items() if products[i] == products[own])
    wrong = max(s for i, s in scores.items() if products[i] != products[own])
    if kind == "margin":
        return true - wrong
    return 1.0 / (1 + sum(s > true for s in scores.values()))


@pytest.mark.parametrize("kind", ["reciprocal_rank", "margin"])
def test_graded_rewards_match_naive_recomputation_and_separate_what_recall_ties(reward_setup, kind):
    recall = reward_setup[0]
    graded = RetrievalReward(
        reward_setup[2], reward_setup[1], recall.query_titles, reward_setup[6], np.ones(3, dtype=bool),
        ["shirt-red", "shirt-blue", "mug"], ["red-0", "blue-0", "mug-0"], reward_setup[3], reward_setup[4], reward_setup[5],
        k=2, vocabulary={"colour", "size", "material"}, kind=kind,
    )
    texts = [['{"colour": "red"}', '{"colour": "blue"}', '{"colour": "red", "size": "xl"}', "nope"]]
    rewards = graded(np.array([0]), texts)
    expected = [naive_graded(reward_setup, 0, t, kind) for t in texts[0]]
    np.testing.assert_allclose(rewards[0], expected, atol=1e-5)
    assert rewards[0, 3] == pytest.approx(-0.1)
    # A wrong colour still ranks the true product somewhere: graded, not a flat 0 as Recall@2 gives.
    assert recall(np.array([0]), texts)[0, 1] == 0.0 and rewards[0, 1] != rewards[0, 0]
    with pytest.raises(ValueError, match="reward kind"):
        RetrievalReward(reward_setup[2], reward_setup[1], recall.query_titles, reward_setup[6], np.ones(3, dtype=bool),
                        ["a", "b", "c"], ["x", "y", "z"], reward_setup[3], reward_setup[4], reward_setup[5], kind="ndcg")
