"""Cost of AGCL over plain InfoNCE: time of one full training step, same head, same batch.

A step is: BM25 matrices (AGCL only) + head forward on anchors and positives + loss +
backward + optimizer step. Both losses train their own copy of one head on the same batch;
steps alternate between the two so that machine load drifts affect both alike. Features
are random; attribute texts are realistic ``key: value`` lists drawn from a vocabulary.

    python benchmarks/agcl_step.py [--steps 30] [--threads N] [--write-results docs/results.md]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from afmrl_dagster.readme import publish_result
from afmrl_dagster.encoders.dual_tower import DualTowerConfig, DualTowerHead, ListingFeatures
from afmrl_dagster.training.agcl import AGCLConfig, AGCLLoss
from afmrl_dagster.training.bm25 import BM25Scorer
from afmrl_dagster.training.encoder_training import FeatureTensors, ProductBatchSampler, batch_loss, make_optimizer


VOCABULARY = {
    "colour": ["red", "blue", "navy", "black", "white", "green", "beige", "pink", "gray", "burgundy", "olive", "mustard"],
    "size": ["xs", "s", "m", "l", "xl", "xxl", "36", "38", "40", "42"],
    "material": ["cotton", "polyester", "linen", "wool", "silk", "denim", "viscose", "leather", "cotton blend"],
    "neckline": ["v-neck", "round-neck", "boat neck", "turtleneck", "square neck", "halter"],
    "sleeve": ["short sleeve", "long sleeve", "sleeveless", "3/4 sleeve", "cap sleeve"],
    "pattern": ["solid", "stripes", "dots", "floral", "check", "animal print", "paisley"],
    "fit": ["slim", "regular", "relaxed", "oversized", "tailored"],
    "brand": ["arla", "zara", "uniqlo", "h&m", "levi's", "mango", "cos", "weekday", "monki", "lindex"],
    "length": ["mini", "midi", "maxi", "knee length", "ankle length"],
    "closure": ["zip", "buttons", "pull-on", "hook and eye", "drawstring"],
    "fat": ["0.5 %", "1.5 %", "3 %", "3.8 %"],
    "volume": ["0.5 l", "1 l", "1.5 l", "2 l"],
}


def attribute_texts(num_products: int, listings_per_product: int, attributes: int, rng: np.random.Generator) -> list[str]:
    """``attributes`` facts per product; each listing of a product repeats them with one changed value."""
    keys = list(VOCABULARY)
    texts = []
    for _ in range(num_products):
        chosen = rng.choice(len(keys), size=attributes, replace=False)
        facts = {keys[k]: VOCABULARY[keys[k]][rng.integers(len(VOCABULARY[keys[k]]))] for k in chosen}
        for listing in range(listings_per_product):
            noisy = dict(facts)
            if listing:  # sellers disagree on one fact
                key = keys[chosen[rng.integers(attributes)]]
                noisy[key] = VOCABULARY[key][rng.integers(len(VOCABULARY[key]))]
            texts.append("; ".join(f"{key}: {value}" for key, value in sorted(noisy.items())))
    return texts


def measure(batch_size: int, embed_dim: int, attributes: int, steps: int, warmup: int, num_products: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    listings_per_product = 2
    n = num_products * listings_per_product
    texts = attribute_texts(num_products, listings_per_product, attributes, rng)
    product_ids = [f"p{i // listings_per_product}" for i in range(n)]
    product_lines = [f"line{(i // listings_per_product) % 40}" for i in range(n)]
    features = ListingFeatures(
        [f"l{i}" for i in range(n)], np.abs(rng.normal(size=(n, 1280))), rng.random(n) > 0.05, rng.normal(size=(n, 384))
    )
    tensors = FeatureTensors.from_features(features)
    _, codes = np.unique(product_ids, return_inverse=True)
    scorer = BM25Scorer(texts)
    anchors, positives = ProductBatchSampler(product_ids, product_lines, batch_size, seed=seed).epoch(0)[0]
    base = DualTowerHead(DualTowerConfig(embed_dim=embed_dim))
    runs = {}
    for name, config in (("plain InfoNCE", AGCLConfig(use_weights=False, use_false_negative_mask=False)), ("AGCL", AGCLConfig())):
        head = copy.deepcopy(base).train()
        runs[name] = (head, AGCLLoss(config), make_optimizer(head, 1e-4, 0.01), [])

    def step(name: str) -> float:
        head, loss_fn, optimizer, _ = runs[name]
        started = time.perf_counter()
        out = batch_loss(head, loss_fn, tensors, anchors, positives, codes, scorer)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    for _ in range(warmup):
        for name in runs:
            step(name)
    for _ in range(steps):
        for name in runs:
            runs[name][3].append(step(name))
    bm25_times = []
    for _ in range(steps):
        started = time.perf_counter()
        scorer.batch_matrix(anchors, positives)
        scorer.batch_matrix(positives, anchors)
        bm25_times.append(time.perf_counter() - started)
    medians = {name: statistics.median(run[3]) for name, run in runs.items()}
    return {
        "plain": medians["plain InfoNCE"],
        "agcl": medians["AGCL"],
        "bm25": statistics.median(bm25_times),
        "ratio": medians["AGCL"] / medians["plain InfoNCE"],
        "batch_size": len(anchors),
        "catalog": n,
        "vocabulary": len(scorer.vocabulary),
    }


def table(result: dict, args: argparse.Namespace) -> str:
    return "\n".join(
        [
            f"AGCL step vs plain InfoNCE step: batch {result['batch_size']} pairs, embed dim {args.embed_dim}, "
            f"{args.attributes} attributes per item, BM25 over {result['catalog']} listings "
            f"({result['vocabulary']} terms), median of {args.steps} steps after {args.warmup} warm-up, "
            f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads.",
            "",
            "| step | median ms |",
            "|---|---|",
            f"| plain InfoNCE (forward + backward + AdamW) | {result['plain'] * 1e3:.2f} |",
            f"| AGCL (BM25 both directions + forward + backward + AdamW) | {result['agcl'] * 1e3:.2f} |",
            f"| of which BM25 matrices alone | {result['bm25'] * 1e3:.2f} |",
            f"| **ratio AGCL / InfoNCE** | **{result['ratio']:.3f}** |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--attributes", type=int, default=8)
    parser.add_argument("--products", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--write-results", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.batch_size, args.embed_dim, args.attributes, args.steps, args.warmup, args.products, args.seed)
    return publish_result(table(result, args), args.write_results, "agcl-step")


if __name__ == "__main__":
    sys.exit(main())
