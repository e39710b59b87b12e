"""Grocery store photo -> catalog image: the frozen-tower head against the fine-tuned image tower.

The quality ladder (``benchmarks/quality.py``) trains heads over frozen tower features; on
grocery its best row stops near 0.86 R@1 from a store photo to the product's catalog image.
This benchmark takes the ladder's grocery dataset as it is (train on every ``train.txt`` photo
and the 81 catalog images; the ``val.txt`` photos halved per product into validation and test;
closed set) and trains, over the same sampler, epochs and plain InfoNCE loss:

- ``frozen head (average pooling)``: the head over ``efficientnet-lite0`` features (the pipeline's default);
- ``frozen head (GeM)``: the head over ``efficientnet-lite0-gem`` features (generalised mean, p = 3);
- ``fine-tuned block (GeM; towers at 0.1x)``: ``dual-tower-finetune`` training EfficientNet-Lite0's last
  block and final 1x1 convolution with the head, the towers at 0.1 x the head's learning rate
  (the backend's default), the text tower frozen;
- ``fine-tuned block (GeM; towers at 1x)``: the same with the towers at the head's learning rate.

Each arm is also scored with its cosine fused with the visual reader's char-trigram BM25 (the
words OCR reads off the photo against each catalog entry's text; :mod:`afmrl_dagster.experiments.reader_fusion`),
the same trained encoder, the fusion weight chosen on validation (``+ visual reader`` rows;
``--no-reader`` leaves them out). Every arm is decided on the validation photos; test is scored once per arm and shown beside
it. The fine-tuned arms compute each image's frozen blocks once (a warm cache every seed's copy
starts from), so a seed costs the last block's training only.

    python benchmarks/photo_catalog.py [--data ../shared/data] [--seeds 3] [--arms ...]
        [--write-results docs/results.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from afmrl_dagster.encoders.dual_tower import ListingFeatures, embed_features
from afmrl_dagster.encoders.finetune import new_finetuned_encoder
from afmrl_dagster.encoders.listing_encoder import ListingInputs
from afmrl_dagster.experiments.reader_fusion import ReaderScores, entry_texts, reader_texts
from afmrl_dagster.experiments.quality_ladder import (
    INFO_NCE,
    PARTS,
    dataset_features,
    load_ladder_dataset,
    plan_ranks,
    rank_metrics,
    summarise,
)
from afmrl_dagster.local_files import write_text_atomically
from afmrl_dagster.readme import publish_result
from afmrl_dagster.settings import Settings
from afmrl_dagster.training.encoder_training import EncoderTrainingConfig, train_encoder, train_listing_encoder

BLOCK = "photo-catalog"
REFERENCE = "frozen head (average pooling)"
GEM_TOWER = "efficientnet-lite0-gem"
ARMS = {  # name -> (image tower, fine-tuned towers' learning-rate scale or None for the frozen head)
    REFERENCE: ("efficientnet-lite0", None),
    "frozen head (GeM)": (GEM_TOWER, None),
    "fine-tuned block (GeM; towers at 0.1x)": (GEM_TOWER, 0.1),
    "fine-tuned block (GeM; towers at 1x)": (GEM_TOWER, 1.0),
}
TASKS = ("photo_to_catalog", "packages_to_catalog", "identical_product")
READER = "visual reader"


def log(message: str) -> None:
    print(f"photo_catalog: {message}", file=sys.stderr, flush=True)


def scored(dataset, embeddings: dict[str, np.ndarray]) -> dict:
    out = {}
    for part in PARTS:
        ranks = plan_ranks(dataset.plan(part), embeddings[part])
        out[part] = {"ranks": ranks, "metrics": {task: rank_metrics(values) for task, values in ranks.items()}}
    return out


def table(records: list[dict], arms: list[str]) -> str:
    header = ["arm", "seeds", *(f"validation R@1 {task} (mean ± sd)" for task in TASKS), "Δ validation photo_to_catalog [95% CI]",
              *(f"test R@1 {task} [95% CI]" for task in TASKS), "s/seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [row for arm in arms for row in (arm, f"{arm} + {READER}") if any(r["row"] == row for r in records)]
    summaries = {task: summarise(records, task, {row: REFERENCE for row in rows if row != REFERENCE}) for task in TASKS}
    for row in rows:
        group = [r for r in records if r["row"] == row]
        cells = [row, str(len(group))]
        for task in TASKS:
            values = summaries[task].get(row, {}).get("validation_r1")
            cells.append("-" if not values else
                         f"{statistics.fmean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""))
        delta = summaries["photo_to_catalog"][row].get("validation_delta")
        cells.append("" if delta is None else delta.text(signed=True) + (" (resolved)" if delta.resolved else ""))
        cells += [summaries[task][row]["test_r1"].text() if row in summaries[task] else "-" for task in TASKS]
        cells.append(f"{statistics.fmean(r['seconds'] for r in group):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=Settings.from_env().data, help="folder holding grocery_store/")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated, from: " + ", ".join(ARMS))
    parser.add_argument("--epochs", type=int, default=None, help="override the ladder's grocery epochs (a quick look)")
    parser.add_argument("--cache", default=".afmrl/cache/ladder", help="frozen tower-feature cache (shared with quality.py)")
    parser.add_argument("--ocr-cache", default=".afmrl/cache/visual_reader", help="the visual reader's OCR cache (shared with quality.py)")
    parser.add_argument("--no-reader", action="store_true", help="leave out the rows fused with the visual reader")
    parser.add_argument("--out", default=".afmrl/benchmarks/photo_catalog.json")
    parser.add_argument("--write-results", metavar="FILE", help=f"replace the {BLOCK} block of this file with the table")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if unknown := [a for a in arms if a not in ARMS]:
        parser.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if REFERENCE not in arms:
        arms.insert(0, REFERENCE)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    root = Path(args.data) / "grocery_store"
    if not root.is_dir():
        parser.error(f"{root} does not exist (the grocery store dataset; see ../shared/data/README.md)")
    started_all = time.perf_counter()
    dataset = load_ladder_dataset(f"grocery:{root}")
    training = {**dataset.training, **({"epochs": args.epochs} if args.epochs else {})}
    listings = dataset.listings()
    inputs = ListingInputs(listings["listing_id"].to_list(), listings["title"].to_list(), image_uris=listings["image_uri"].to_list(),
                           read_bytes=lambda uri: Path(uri).read_bytes())
    index = {listing: i for i, listing in enumerate(inputs.listing_ids)}
    train_rows = np.array([index[i] for i in dataset.train["listing_id"].to_list()])
    part_rows = {part: np.array([index[i] for i in dataset.plan(part).listings["listing_id"].to_list()]) for part in PARTS}
    products, lines = dataset.train["product_id"].to_list(), dataset.train["product_line"].to_list()
    log(f"{dataset.train.height} training listings, {len(dataset.validation.query_ids)} validation and "
        f"{len(dataset.test.query_ids)} test photos")

    base = None
    features: dict[str, ListingFeatures] = {}

    def gem_encoder():
        """The fine-tuned arms' starting encoder, its frozen-block cache filled once for every listing;
        its untrained pooled outputs are the GeM tower's frozen features."""
        nonlocal base
        if base is None:
            torch.manual_seed(0)
            base = new_finetuned_encoder(GEM_TOWER, unfrozen_blocks=1, unfrozen_text_layers=0, frozen_cache_items=1_000_000)
            base.eval()
            chunks = []
            with torch.inference_mode():
                for start in range(0, len(inputs), 64):
                    rows = np.arange(start, min(start + 64, len(inputs)))
                    chunks.append([t.float().cpu().numpy() for t in base.tower_features(inputs, rows)])
                    if (start // 64) % 10 == 0:
                        log(f"frozen blocks {rows[-1] + 1}/{len(inputs)}")
            image, mask, text = (np.concatenate(parts) for parts in zip(*chunks))
            features[GEM_TOWER] = ListingFeatures(inputs.listing_ids, image, mask, text)
        return base

    reader = None
    if not args.no_reader:
        texts, _ = reader_texts(dataset, args.ocr_cache, progress=log)
        reader = ReaderScores(dataset, texts, entry_texts(dataset))
    records = []
    feature_seconds = 0.0
    for arm in arms:
        tower, scale = ARMS[arm]
        started = time.perf_counter()
        if tower == GEM_TOWER:
            gem_encoder()
        elif tower not in features:
            features[tower] = dataset_features(dataset, args.cache, image_tower=tower, progress=log)
        feature_seconds += time.perf_counter() - started
        source = features[tower]
        for seed in range(args.seeds):
            config = EncoderTrainingConfig(**training, seed=seed, agcl=dict(INFO_NCE))
            started = time.perf_counter()
            if scale is None:
                head = train_encoder(source.subset(train_rows), products, lines, dataset.attribute_texts, config).head
                embeddings = {part: embed_features(head, source.subset(part_rows[part])) for part in PARTS}
            else:
                encoder = copy.deepcopy(base)
                encoder.config.tower_learning_rate_scale = scale
                train_inputs = inputs.subset(train_rows)
                train_inputs.features = source.subset(train_rows)  # the PCA start, as the frozen arm's
                encoder = train_listing_encoder(encoder, train_inputs, products, lines, dataset.attribute_texts, config).encoder
                embeddings = {part: encoder.embed(inputs.subset(part_rows[part])) for part in PARTS}
            seconds = time.perf_counter() - started
            outcome = scored(dataset, embeddings)
            records.append({"row": arm, "seed": seed, "seconds": seconds, **outcome})
            log(f"{arm} seed {seed}: validation R@1 photo_to_catalog "
                f"{outcome['validation']['metrics']['photo_to_catalog']['recall@1']:.3f} ({seconds:.0f} s)")
            if reader is not None:  # the same encoder, its cosine fused with the reader's BM25 (alpha chosen on validation)
                alpha, fused = reader.fuse(embeddings)
                records.append({"row": f"{arm} + {READER}", "seed": seed, "seconds": seconds, "alpha": alpha, **fused})
                log(f"{arm} + {READER} seed {seed}: alpha {alpha}, validation R@1 photo_to_catalog "
                    f"{fused['validation']['metrics']['photo_to_catalog']['recall@1']:.3f}")
    total = time.perf_counter() - started_all
    write_text_atomically(args.out, json.dumps({"seconds": total, "seeds": args.seeds, "torch": torch.__version__,
                                                "records": records}) + "\n")
    text = "\n\n".join([
        f"**grocery** ({dataset.train.height} training listings; {len(dataset.validation.query_ids)} validation and "
        f"{len(dataset.test.query_ids)} test photos; products: **{dataset.products}**): {dataset.description}. "
        f"Every arm: plain InfoNCE, the ladder's grocery schedule ({training.get('epochs')} epochs, "
        f"{training.get('pairs_per_product')} pairs per product per epoch), PCA start, {args.seeds} seeds. Validation R@1: mean ± sd "
        f"over seeds; Δ: paired on the validation photos against *{REFERENCE}*; test: per-photo hits averaged over seeds, "
        f"95% bootstrap interval over photos, scored once per arm. s/seed: training and embedding (the frozen features and "
        f"frozen-block outputs, computed once, are not in it: {feature_seconds / 60:.1f} min). Whole run {total / 60:.1f} min "
        f"on {torch.get_num_threads()} CPU threads, torch {torch.__version__}.",
        table(records, arms),
    ])
    return publish_result(text, args.write_results, BLOCK)


if __name__ == "__main__":
    raise SystemExit(main())
