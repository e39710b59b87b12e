"""Attribute generation throughput: the built-in generator writing for listings one at a time
vs in batches, same model, same listings, in one run.

The generator is the pipeline's default size, distilled for a few epochs on the built-in
catalog's teacher attributes so that its outputs have realistic lengths (it stops at
``<eos>`` as a trained model does). Features are drawn at random: throughput does not depend
on their values. Both modes run greedy decoding with the key-value cache; timings alternate
between the modes so machine load drifts affect both alike.

    python benchmarks/generation.py [--listings 256] [--batch-sizes 16,64,256] [--write-results docs/results.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import polars as pl
import torch

from afmrl_dagster.attributes.generator import AttributeGenerator, GeneratorConfig, generate_attribute_texts
from afmrl_dagster.attributes.teacher import SellerAttributeTeacher, annotate_listings
from afmrl_dagster.attributes.vocabulary import AttributeVocabulary
from afmrl_dagster.catalog.builtin import generate_product_line
from afmrl_dagster.catalog.source import builtin_config
from afmrl_dagster.readme import publish_result
from afmrl_dagster.training.generator_sft import SFTConfig, train_generator_sft

BLOCK = "generation-throughput"
IMAGE_DIM, TEXT_DIM = 1280, 384


def distilled_generator(seed: int = 0) -> tuple[AttributeGenerator, AttributeVocabulary, list[dict]]:
    config = builtin_config("builtin")
    catalog = pl.concat([generate_product_line(line, config).listings for line in config.product_lines])
    table = annotate_listings(SellerAttributeTeacher(), catalog)
    targets = [json.loads(text) for text in table["attributes_json"].to_list()]
    vocabulary = AttributeVocabulary.from_attribute_sets(targets)
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(len(targets), IMAGE_DIM)).astype(np.float32)
    text = rng.normal(size=(len(targets), TEXT_DIM)).astype(np.float32)
    torch.manual_seed(seed)
    model = AttributeGenerator(len(vocabulary), IMAGE_DIM, TEXT_DIM, GeneratorConfig(grammar_keys=len(vocabulary.keys)))
    train_generator_sft(model, vocabulary, image, np.ones(len(targets), bool), text, targets, SFTConfig(epochs=8, seed=seed))
    return model.eval(), vocabulary, targets


def measure(model, vocabulary, listings: int, batch_sizes: list[int], one_at_a_time: int, repeats: int, seed: int) -> dict:
    rng = np.random.default_rng(seed + 1)
    image = rng.normal(size=(listings, IMAGE_DIM)).astype(np.float32)
    mask = np.ones(listings, bool)
    text = rng.normal(size=(listings, TEXT_DIM)).astype(np.float32)
    modes = {1: one_at_a_time, **{size: listings for size in batch_sizes}}
    times: dict[int, list[float]] = {size: [] for size in modes}
    lengths: dict[int, float] = {}
    for size, count in modes.items():  # warm-up
        generate_attribute_texts(model, vocabulary, image[:min(count, size)], mask[:min(count, size)], text[:min(count, size)], batch_size=size)
    for _ in range(repeats):
        for size, count in modes.items():
            started = time.perf_counter()
            outputs = generate_attribute_texts(model, vocabulary, image[:count], mask[:count], text[:count], batch_size=size)
            times[size].append((time.perf_counter() - started) / count)
            lengths[size] = statistics.fmean(len(output) for output in outputs)
    per_listing = {size: statistics.median(values) for size, values in times.items()}
    return {"per_listing_s": per_listing, "chars": lengths, "modes": modes}


def table(result: dict, args) -> str:
    base = result["per_listing_s"][1]
    lines = [
        f"Built-in generator ({result['parameters'] / 1e6:.2f} M parameters, d_model {GeneratorConfig().d_model}, "
        f"{GeneratorConfig().n_layers} layers), distilled 8 epochs on the built-in catalog; greedy decoding within the attribute grammar, with the "
        f"key-value cache; median of {args.repeats} rounds; torch {torch.__version__}, {torch.get_num_threads()} CPU threads.",
        "",
        "| mode | listings timed | listings / s | mean output chars | speed-up vs one at a time |",
        "|---|---|---|---|---|",
    ]
    for size, seconds in result["per_listing_s"].items():
        mode = "one at a time" if size == 1 else f"batches of {size}"
        lines.append(f"| {mode} | {result['modes'][size]} | {1 / seconds:.1f} | {result['chars'][size]:.0f} | "
                     + (f"**{base / seconds:.1f}x**" if size != 1 else "1.0x") + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listings", type=int, default=256, help="listings generated per batched round")
    parser.add_argument("--one-at-a-time", type=int, default=64, help="listings generated per round one at a time")
    parser.add_argument("--batch-sizes", default="16,64,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-results", metavar="FILE")
    args = parser.parse_args(argv)
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    print("generation: distilling the generator ...", file=sys.stderr, flush=True)
    model, vocabulary, _ = distilled_generator(args.seed)
    result = measure(model, vocabulary, args.listings, batch_sizes, args.one_at_a_time, args.repeats, args.seed)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    text = table(result, args)
    return publish_result(text, args.write_results, BLOCK)


if __name__ == "__main__":
    raise SystemExit(main())
