"""External check of the attribute step on WDC-PAVE: the built-in generator, distilled on the
gold attributes of 80% of the products, writes attributes for the other 20% from their text
(title, then the start of the description, through the frozen text tower); scored against
the gold values (pair precision, recall and F1, validity, per-key exact match).

The built-in generator writes values from a closed vocabulary (those seen in training), so
the table also gives the ceiling that implies: the share of test pairs whose value occurs in
the training set.

    python benchmarks/pave.py [--data ../shared/data/wdc_pave] [--epochs 60] [--write-results docs/results.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from afmrl_dagster.attributes.generator import AttributeGenerator, GeneratorConfig, generate_attribute_texts
from afmrl_dagster.attributes.vocabulary import AttributeVocabulary
from afmrl_dagster.attributes.pave import load_wdc_pave
from afmrl_dagster.catalog.splits import holdout_products
from afmrl_dagster.encoders.towers import DEFAULT_TEXT_MODEL, TextFeaturizer
from afmrl_dagster.readme import publish_result
from afmrl_dagster.settings import Settings
from afmrl_dagster.training.generator_sft import SFTConfig, attribute_accuracy, train_generator_sft

BLOCK = "pave-check"
DESCRIPTION_CHARS = 300
TOP_KEYS = 8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(Settings.from_env().data, "wdc_pave"))
    parser.add_argument("--epochs", type=int, default=SFTConfig.epochs)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N offers (a quick look)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-results", metavar="FILE")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    offers = load_wdc_pave(args.data)
    if args.limit:
        offers = offers.head(args.limit)
    test_products = holdout_products(offers["product_id"].to_list(), offers["category"].to_list(), args.test_fraction, args.seed)
    is_test = offers["product_id"].is_in(list(test_products)).to_numpy()
    gold = [json.loads(text) for text in offers["gold_json"].to_list()]
    texts = [f"{title} | {(description or '')[:DESCRIPTION_CHARS]}" for title, description in
             zip(offers["title"].to_list(), offers["description"].to_list())]
    text = TextFeaturizer(DEFAULT_TEXT_MODEL).encode(texts)
    image = np.zeros((len(texts), 1), np.float32)  # text offers: no image
    mask = np.zeros(len(texts), bool)
    train, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    vocabulary = AttributeVocabulary.from_attribute_sets([gold[i] for i in train])
    torch.manual_seed(args.seed)
    model = AttributeGenerator(len(vocabulary), image.shape[1], text.shape[1], GeneratorConfig(max_new_tokens=48, grammar_keys=len(vocabulary.keys)))
    print(f"pave: {len(train)} training offers, {len(test)} test offers, vocabulary {len(vocabulary)}", file=sys.stderr, flush=True)
    train_generator_sft(model, vocabulary, image[train], mask[train], text[train], [gold[i] for i in train],
                        SFTConfig(epochs=args.epochs, seed=args.seed))
    predicted = generate_attribute_texts(model, vocabulary, image[test], mask[test], text[test])
    scores = attribute_accuracy(predicted, [gold[i] for i in test], vocabulary.keys)
    test_pairs = [(key, value) for i in test for key, value in gold[i].items()]
    reachable = sum(key in vocabulary.keys and value in vocabulary.values for key, value in test_pairs) / max(len(test_pairs), 1)
    key_counts = {}
    for key, _ in test_pairs:
        key_counts[key] = key_counts.get(key, 0) + 1
    top = sorted(key_counts, key=lambda key: -key_counts[key])[:TOP_KEYS]
    minutes = (time.perf_counter() - started) / 60
    lines = [
        f"WDC-PAVE `{os.path.basename(os.path.normpath(args.data))}`: {len(train)} training offers, {len(test)} test offers of "
        f"unseen products ({args.test_fraction:.0%} of each category's products), {len(test_pairs)} gold pairs; built-in generator "
        f"distilled {args.epochs} epochs on the gold attributes; input: title + first {DESCRIPTION_CHARS} description characters; "
        f"{minutes:.1f} min on {torch.get_num_threads()} CPU threads.",
        "",
        "| validity | pair precision | pair recall | pair F1 | ceiling: test pairs whose value was seen in training |",
        "|---|---|---|---|---|",
        f"| {scores['validity_rate']:.3f} | {scores['pair_precision']:.3f} | {scores['pair_recall']:.3f} | "
        f"**{scores['pair_f1']:.3f}** | {reachable:.3f} |",
        "",
        "| key | test offers with it | exact match |",
        "|---|---|---|",
        *(f"| {key} | {key_counts[key]} | {scores['key_exact_match'][key]:.3f} |" for key in top),
    ]
    text_block = "\n".join(lines)
    return publish_result(text_block, args.write_results, BLOCK)


if __name__ == "__main__":
    raise SystemExit(main())
