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
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from afmrl_dagster.encoders.dual_tower import ListingFeatures, embed_features
from afmrl_dagster.experiments.finetuned_tower import GEM_TOWER, FinetunedImageBlock, scored
from afmrl_dagster.experiments.quality_ladder import INFO_NCE, PARTS, dataset_features, load_ladder_dataset, rows_of, summarise
from afmrl_dagster.experiments.reader_fusion import READER, ReaderScores, entry_texts, reader_texts
from afmrl_dagster.local_files import write_text_atomically
from afmrl_dagster.readme import publish_result
from afmrl_dagster.settings import Settings
from afmrl_dagster.training.encoder_training import EncoderTrainingConfig, train_encoder

BLOCK = "photo-catalog"
REFERENCE = "frozen head (average pooling)"
ARMS = {  # name -> (image tower, fine-tuned towers' learning-rate scale or None for the frozen head)
    REFERENCE: ("efficientnet-lite0", None),
    "frozen head (GeM)": (GEM_TOWER, None),
    "fine-tuned block (GeM; towers at 0.1x)": (GEM_TOWER, 0.1),
    "fine-tuned block (GeM; towers at 1x)": (GEM_TOWER, 1.0),
}
TASKS = ("photo_to_catalog", "packages_to_catalog", "identical_product")


def log(message: str) -> None:
    print(f"photo_catalog: {message}", file=sys.stderr, flush=True)


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
    parser.add_argument("--cache", default=".afmrl/cache/ladder", help="frozen tower-feature and frozen-block cache (shared with quality.py)")
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
    log(f"{dataset.train.height} training listings, {len(dataset.validation.query_ids)} validation and "
        f"{len(dataset.test.query_ids)} test photos")

    block = None
    features: dict[str, ListingFeatures] = {}

    def frozen_blocks() -> FinetunedImageBlock:
        """The fine-tuned arms' starting encoder, its frozen-block cache filled once for every listing;
        its untrained pooled outputs are the GeM tower's frozen features."""
        nonlocal block
        if block is None:
            block = FinetunedImageBlock(dataset, args.cache, progress=log, tower=GEM_TOWER)
            features[GEM_TOWER] = block.features
        return block

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
            frozen_blocks()
        elif tower not in features:
            features[tower] = dataset_features(dataset, args.cache, image_tower=tower, progress=log)
        feature_seconds += time.perf_counter() - started
        source = features[tower]
        for seed in range(args.seeds):
            started = time.perf_counter()
            if scale is None:
                config = EncoderTrainingConfig(**training, seed=seed, agcl=dict(INFO_NCE))
                head = train_encoder(source.subset(rows_of(source, dataset.train)), dataset.train["product_id"].to_list(),
                                     dataset.train["product_line"].to_list(), dataset.attribute_texts, config).head
                embeddings = {part: embed_features(head, source.subset(rows_of(source, dataset.plan(part).listings))) for part in PARTS}
            else:
                embeddings = block.embed(block.train(seed, training, tower_learning_rate_scale=scale))
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
