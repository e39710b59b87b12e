"""AGCL: BM25 batch matrices, the loss against hand computation, sampler and training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from afmrl_dagster.encoders.dual_tower import ListingFeatures, embed_features, zero_shot_embeddings
from afmrl_dagster.retrieval.metrics import retrieval_metrics
from afmrl_dagster.training.agcl import AGCLConfig, AGCLLoss
from afmrl_dagster.training.bm25 import BM25Scorer, pair_tokens, word_tokens
from afmrl_dagster.training.encoder_training import EncoderTrainingConfig, ProductBatchSampler, train_encoder

ATTRIBUTE_TEXTS = [
    "colour: red; neckline: v-neck; size: m",
    "colour: red; neckline: round-neck; size: m",
    "colour: blue; neckline: v-neck",
    "brand: arla; fat: 3 %; volume: 1 l",
    "brand: arla; fat: 1.5 %; volume: 1 l; organic: yes",
    "",
    "colour: red; trim: red; red: red",
]


def naive_bm25(texts, query, doc, k1=1.2, b=0.75, tokenize=word_tokens):
    """Textbook Okapi BM25, one pair at a time."""
    docs = [tokenize(t) for t in texts]
    n = len(docs)
    average = sum(len(d) for d in docs) / n
    score = 0.0
    for term in tokenize(texts[query]):
        df = sum(term in d for d in docs)
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        tf = docs[doc].count(term)
        score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(docs[doc]) / average))
    return score


@pytest.mark.parametrize("tokenizer", ["words", "pairs"])
def test_bm25_batch_matrix_equals_naive_per_pair(tokenizer):
    tokenize = word_tokens if tokenizer == "words" else pair_tokens
    scorer = BM25Scorer(ATTRIBUTE_TEXTS, k1=1.2, b=0.75, tokenizer=tokenizer)
    indices = np.array([6, 0, 1, 2, 3, 4, 5, 0])
    matrix = scorer.batch_matrix(indices)
    expected = torch.tensor([[naive_bm25(ATTRIBUTE_TEXTS, i, j, tokenize=tokenize) for j in indices] for i in indices], dtype=torch.float32)
    assert matrix.shape == (8, 8)
    torch.testing.assert_close(matrix, expected, rtol=1e-5, atol=1e-6)
    rectangular = scorer.batch_matrix([0, 3], [1, 4, 5])
    torch.testing.assert_close(rectangular, expected[[1, 4]][:, [2, 5, 6]], rtol=1e-5, atol=1e-6)
    # Overlapping attributes score higher than disjoint ones; the empty text scores zero.
    assert matrix[1, 2] > matrix[1, 4] and matrix[:, 6].abs().sum() == 0
    with pytest.raises(ValueError, match="indices"):
        scorer.batch_matrix([0, 7])


def test_tokenizers():
    assert word_tokens("Colour: Red; fat: 1.5 %; Mjölk") == ["colour", "red", "fat", "1.5", "mjölk"]
    assert pair_tokens("colour: Red;  neckline:  v-neck ; loose words") == ["colour=red", "neckline=v-neck", "loose", "words"]
    with pytest.raises(ValueError, match="tokenizer"):
        BM25Scorer(["a"], tokenizer="chars")


def hand_loss(s, tau, bm25, same, use_weights, use_mask, delta, weight_positive=True):
    """L_i = -log(w_ii e^{s_ii/tau} / (w_ii e^{s_ii/tau} + sum_{j in N_i} w_ij e^{s_ij/tau})), literally."""
    size = len(s)
    losses, dropped = [], 0
    for i in range(size):
        w = lambda j: math.exp(1 + math.tanh(bm25[i][j])) if use_weights else 1.0  # noqa: E731, B023 (called within the iteration)
        positive = (w(i) if weight_positive or not use_weights else math.e) * math.exp(s[i][i] / tau)
        negatives = 0.0
        for j in range(size):
            if j == i:
                continue
            if same[i][j] or (use_mask and s[i][j] > s[i][i] + delta):
                dropped += 1
                continue
            negatives += w(j) * math.exp(s[i][j] / tau)
        losses.append(-math.log(positive / (positive + negatives)))
    return sum(losses) / size, dropped / (size * (size - 1))


def hand_made_batch():
    # Unit vectors at chosen angles give known cosine similarities.
    angles = torch.tensor([0.0, 0.3, 1.4, 2.0])
    queries = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    candidate_angles = torch.tensor([0.5, 0.25, 1.5, 0.1])
    candidates = torch.stack([torch.cos(candidate_angles), torch.sin(candidate_angles)], dim=1)
    bm25 = torch.tensor([[2.0, 0.5, 0.0, 1.0], [0.3, 3.0, 0.0, 0.2], [0.0, 0.0, 1.0, 0.0], [1.5, 0.1, 0.0, 0.5]])
    same = torch.zeros(4, 4, dtype=torch.bool)
    return queries, candidates, bm25, same


@pytest.mark.parametrize("use_weights", [True, False])
@pytest.mark.parametrize("use_mask", [True, False])
def test_loss_matches_hand_computation(use_weights, use_mask):
    queries, candidates, bm25, same = hand_made_batch()
    same[3, 1] = True  # candidate 1 is another listing of query 3's product
    tau, delta = 0.1, 0.1
    loss_fn = AGCLLoss(AGCLConfig(use_weights=use_weights, use_false_negative_mask=use_mask, delta=delta, symmetric=False))
    out = loss_fn(queries, candidates, tau, bm25, same)
    s = (queries @ candidates.T).tolist()
    expected, dropped = hand_loss(s, tau, bm25.tolist(), same.tolist(), use_weights, use_mask, delta)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["masked_fraction"].item() == pytest.approx(dropped)
    if not use_weights:
        assert out["mean_negative_weight"].item() == 1.0
    else:
        assert math.e <= out["mean_negative_weight"].item() < math.e**2


def test_positive_at_the_lowest_weight_matches_hand_computation():
    queries, candidates, bm25, same = hand_made_batch()
    loss_fn = AGCLLoss(AGCLConfig(weight_positive=False, symmetric=False))
    out = loss_fn(queries, candidates, 0.1, bm25, same)
    s = (queries @ candidates.T).tolist()
    expected, _ = hand_loss(s, 0.1, bm25.tolist(), same.tolist(), True, True, 0.1, weight_positive=False)
    paper, _ = hand_loss(s, 0.1, bm25.tolist(), same.tolist(), True, True, 0.1)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert expected > paper  # the positives' own overlap no longer lifts them


def test_mask_drops_exactly_the_expected_entries():
    queries, candidates, bm25, same = hand_made_batch()
    s = queries @ candidates.T
    # s_ij = cos(angle difference): row 0 has s_03 = cos(0.1) > cos(0.5) + 0.1; row 3's positive
    # s_33 = cos(1.9) is so low that all its negatives exceed it by more than delta.
    expected_dropped = {(0, 3), (3, 0), (3, 1), (3, 2)}
    assert expected_dropped == {(i, j) for i in range(4) for j in range(4) if i != j and s[i, j] > s[i, i] + 0.1}
    loss_fn = AGCLLoss(AGCLConfig(use_weights=False, use_false_negative_mask=True, delta=0.1, symmetric=False))
    out = loss_fn(queries, candidates, 0.1, bm25, same)
    assert out["masked_fraction"].item() == pytest.approx(4 / 12)
    logits = s / 0.1
    manual = []
    for i in range(4):
        kept = [j for j in range(4) if (i, j) not in expected_dropped]
        manual.append(torch.logsumexp(logits[i, kept], 0) - logits[i, i])
    assert out["loss"].item() == pytest.approx(torch.stack(manual).mean().item(), rel=1e-6)


def test_plain_infonce_equals_cross_entropy_both_directions():
    torch.manual_seed(0)
    queries = F.normalize(torch.randn(6, 8), dim=-1)
    candidates = F.normalize(torch.randn(6, 8), dim=-1)
    tau = torch.tensor(0.07)
    same = torch.zeros(6, 6, dtype=torch.bool)
    bm25 = torch.rand(6, 6) * 5
    logits = queries @ candidates.T / tau
    labels = torch.arange(6)
    plain = AGCLConfig(use_weights=False, use_false_negative_mask=False)
    out = AGCLLoss(plain)(queries, candidates, tau, bm25, same)
    torch.testing.assert_close(out["query_to_candidate_loss"], F.cross_entropy(logits, labels))
    torch.testing.assert_close(out["candidate_to_query_loss"], F.cross_entropy(logits.T, labels))
    torch.testing.assert_close(out["loss"], 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)))
    assert out["masked_fraction"].item() == 0.0
    # Weights only: cross-entropy on logits + log w.
    weighted = AGCLLoss(AGCLConfig(use_false_negative_mask=False, symmetric=False))(queries, candidates, tau, bm25, same)
    torch.testing.assert_close(weighted["loss"], F.cross_entropy(logits + 1 + torch.tanh(bm25), labels))
    scaled = AGCLLoss(AGCLConfig(use_false_negative_mask=False, symmetric=False, bm25_scale=0.1))(queries, candidates, tau, bm25, same)
    torch.testing.assert_close(scaled["loss"], F.cross_entropy(logits + 1 + torch.tanh(0.1 * bm25), labels))


def test_reverse_direction_uses_reverse_bm25_and_same_product_is_never_negative():
    queries, candidates, bm25, same = hand_made_batch()
    reverse = torch.rand(4, 4)
    loss_fn = AGCLLoss(AGCLConfig(use_false_negative_mask=False))
    out = loss_fn(queries, candidates, 0.2, bm25, same, bm25_reverse=reverse)
    s_t = (candidates @ queries.T).tolist()
    expected, _ = hand_loss(s_t, 0.2, reverse.tolist(), same.tolist(), True, False, 0.0)
    assert out["candidate_to_query_loss"].item() == pytest.approx(expected, rel=1e-5)
    same[0, 1] = True
    plain = AGCLLoss(AGCLConfig(use_weights=False, use_false_negative_mask=False, symmetric=False))
    dropped = plain(queries, candidates, 0.2, None, same)
    logits = queries @ candidates.T / 0.2
    row0 = torch.logsumexp(logits[0, [0, 2, 3]], 0) - logits[0, 0]
    rest = torch.logsumexp(logits[1:], 1) - logits.diagonal()[1:]
    assert dropped["loss"].item() == pytest.approx(((row0 + rest.sum()) / 4).item(), rel=1e-6)
    assert dropped["masked_fraction"].item() == pytest.approx(1 / 12)
    with pytest.raises(ValueError, match="bm25 is required"):
        AGCLLoss()(queries, candidates, 0.2, None, same)


def test_gradient_flows_and_is_stable_at_small_temperature():
    torch.manual_seed(1)
    raw_q = torch.randn(16, 32, requires_grad=True)
    raw_c = torch.randn(16, 32, requires_grad=True)
    log_tau = torch.tensor(math.log(0.01), requires_grad=True)
    bm25 = torch.rand(16, 16) * 20
    same = torch.zeros(16, 16, dtype=torch.bool)
    out = AGCLLoss()(F.normalize(raw_q, dim=-1), F.normalize(raw_c, dim=-1), log_tau.exp(), bm25, same)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    for grad in (raw_q.grad, raw_c.grad, log_tau.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_config_validation():
    with pytest.raises(ValueError, match="delta"):
        AGCLConfig(delta=5.0)
    with pytest.raises(ValueError, match="sampler"):
        EncoderTrainingConfig(sampler="hard")
    with pytest.raises(ValueError, match="batch_size"):
        EncoderTrainingConfig(batch_size=1)
    assert EncoderTrainingConfig(agcl={"delta": 0.2}).agcl.delta == 0.2


def test_product_batch_sampler():
    # Lines a and b with 6 products each (2 listings), plus products with one listing only.
    product_ids = [f"p{i // 2}" for i in range(24)] + ["solo1", "solo2"]
    lines = ["a" if i // 2 < 6 else "b" for i in range(24)] + ["a", "b"]
    sampler = ProductBatchSampler(product_ids, lines, batch_size=6, mode="product_line", seed=3)
    assert sampler.num_products == 12 and len(sampler) == 2
    batches = sampler.epoch(0)
    seen = set()
    for anchors, positives in batches:
        anchor_products = [product_ids[i] for i in anchors]
        assert [product_ids[i] for i in positives] == anchor_products
        assert all(a != p for a, p in zip(anchors, positives))
        assert len(set(anchor_products)) == len(anchor_products)
        assert len({lines[i] for i in anchors}) == 1  # line sizes fit the batch exactly
        seen |= set(anchor_products)
    assert seen == {f"p{i}" for i in range(12)}
    again = ProductBatchSampler(product_ids, lines, batch_size=6, mode="product_line", seed=3).epoch(0)
    assert all((a1 == a2).all() and (p1 == p2).all() for (a1, p1), (a2, p2) in zip(batches, again))
    random_batches = ProductBatchSampler(product_ids, lines, 6, "random", seed=3)
    mixed = sum(len({lines[i] for i in a}) > 1 for seed in range(5) for a, _ in random_batches.epoch(seed))
    assert mixed > 0
    with pytest.raises(ValueError, match="at least 2 products"):
        ProductBatchSampler(["x", "y"], ["a", "a"], 4)


def synthetic_catalog(num_lines=6, per_line=8, listings=3, seed=0):
    """Products in lines of near-identical siblings; features carry a product signal plus noise."""
    rng = np.random.default_rng(seed)
    product_ids, product_lines, texts, image, text = [], [], [], [], []
    for line in range(num_lines):
        line_image, line_text = rng.normal(size=48), rng.normal(size=24)
        for variant in range(per_line):
            product_image = line_image + 0.35 * rng.normal(size=48)
            product_text = line_text + 0.35 * rng.normal(size=24)
            for _ in range(listings):
                product_ids.append(f"l{line}v{variant}")
                product_lines.append(f"line{line}")
                texts.append(f"type: line{line}; variant: v{variant}; colour: c{variant % 3}")
                image.append(product_image + 0.3 * rng.normal(size=48))
                text.append(product_text + 0.3 * rng.normal(size=24))
    n = len(product_ids)
    mask = rng.random(n) > 0.1
    image = np.where(mask[:, None], np.abs(np.array(image)), 0.0)
    features = ListingFeatures([f"x{i}" for i in range(n)], image, mask, np.array(text))
    return features, product_ids, product_lines, texts


def test_train_encoder_is_deterministic_and_beats_zero_shot():
    features, product_ids, lines, texts = synthetic_catalog()
    config = EncoderTrainingConfig(epochs=12, batch_size=8, learning_rate=3e-3, seed=7, head={"embed_dim": 32, "hidden_dim": 64})
    epochs_seen = []
    first = train_encoder(features, product_ids, lines, texts, config, on_epoch=epochs_seen.append)
    second = train_encoder(features, product_ids, lines, texts, config)
    assert [r["epoch"] for r in first.history] == list(range(1, 13)) and epochs_seen == first.history
    assert set(first.history[0]) == {"epoch", "loss", "lr", "temperature", "mean_negative_weight", "masked_fraction", "seconds"}
    for name, tensor in first.head.state_dict().items():
        torch.testing.assert_close(tensor, second.head.state_dict()[name], rtol=0, atol=0, msg=name)
    assert first.history[-1]["loss"] < first.history[0]["loss"]
    assert math.e <= first.history[0]["mean_negative_weight"] < math.e**2
    embeddings = embed_features(first.head, features)
    trained = retrieval_metrics(embeddings, embeddings, product_ids, product_ids, features.listing_ids, features.listing_ids)
    zero = zero_shot_embeddings(features)
    baseline = retrieval_metrics(zero, zero, product_ids, product_ids, features.listing_ids, features.listing_ids)
    assert trained["recall@1"] > baseline["recall@1"] + 0.05
    assert trained["mrr"] > baseline["mrr"]


def test_plain_infonce_training_runs_with_random_sampler_and_accumulation():
    features, product_ids, lines, texts = synthetic_catalog(num_lines=3, per_line=4, listings=2)
    config = EncoderTrainingConfig(
        epochs=2, batch_size=4, sampler="random", grad_accumulation=2, warmup_fraction=0.0,
        agcl={"use_weights": False, "use_false_negative_mask": False}, head={"embed_dim": 16, "hidden_dim": 16},
    )
    result = train_encoder(features, product_ids, lines, texts, config)
    assert all(r["mean_negative_weight"] == 1.0 and r["masked_fraction"] == 0.0 for r in result.history)
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine reaches zero at the last step
    assert not result.head.training


def test_agcl_step_benchmark_runs_and_writes_its_block(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    readme = tmp_path / "README.md"
    readme.write_text("<!-- agcl-step:start -->\n<!-- agcl-step:end -->\n")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "agcl_step.py"
    done = subprocess.run([sys.executable, str(script), "--batch-size", "16", "--steps", "2", "--warmup", "1", "--write-results", str(readme)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "**ratio AGCL / InfoNCE**" in readme.read_text()


@pytest.mark.parametrize("normalisation", ["positive", "zscore"])
def test_normalised_bm25_matches_hand_computation(normalisation):
    queries, candidates, bm25, same = hand_made_batch()
    if normalisation == "positive":
        scaled = [[value / row[i] for value in row] for i, row in enumerate(bm25.tolist())]
    else:
        scaled = []
        for row in bm25.tolist():
            mean = sum(row) / len(row)
            sd = math.sqrt(sum((v - mean) ** 2 for v in row) / len(row))
            scaled.append([(v - mean) / sd for v in row])
    loss_fn = AGCLLoss(AGCLConfig(bm25_normalisation=normalisation, symmetric=False))
    out = loss_fn(queries, candidates, 0.1, bm25, same)
    s = (queries @ candidates.T).tolist()
    expected, _ = hand_loss(s, 0.1, scaled, same.tolist(), True, True, 0.1)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    # Raw BM25 of facts shared in the batch saturates tanh (every weight ~e^2); a normalised row keeps them apart.
    from afmrl_dagster.training.agcl import bm25_log_weights

    saturated = torch.tensor([[9.0, 6.0, 4.0, 3.0]] * 4)
    raw = bm25_log_weights(saturated).exp()[0]
    spread = bm25_log_weights(saturated, normalisation=normalisation).exp()[0]
    assert raw.max() / raw.min() < 1.02 and spread.max() / spread.min() > 1.4
    with pytest.raises(ValueError, match="bm25_normalisation"):
        AGCLConfig(bm25_normalisation="softmax")


def test_normalisation_of_rows_without_overlap_gives_equal_weights():
    from afmrl_dagster.training.agcl import normalise_bm25

    bm25 = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    assert normalise_bm25(bm25, "positive").tolist() == [[0.0, 0.0], [1.0, 1.0]]  # row 0's positive shares nothing
    assert normalise_bm25(bm25, "zscore")[1].tolist() == [0.0, 0.0]  # a constant row


def test_sampler_draws_several_pairs_of_a_product_into_one_batch():
    product_ids = [f"p{i // 4}" for i in range(32)]  # 8 products of 4 listings
    lines = ["a"] * 32
    sampler = ProductBatchSampler(product_ids, lines, batch_size=8, seed=1, pairs_per_product=4)
    assert len(sampler) == 4
    batches = sampler.epoch(0)
    assert sum(len(a) for a, _ in batches) == 32
    for anchors, positives in batches:
        products = [product_ids[i] for i in anchors]
        assert products == [product_ids[i] for i in positives] and all(a != p for a, p in zip(anchors, positives))
        assert len(set(products)) == 2  # 4 pairs each of 2 products: several views of a product per batch
    with pytest.raises(ValueError, match="pairs_per_product"):
        EncoderTrainingConfig(pairs_per_product=0)
