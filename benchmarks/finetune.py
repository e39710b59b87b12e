"""dual-tower-finetune against the frozen-tower head (dual-tower), same data, sampler, AGCL loss and epochs.

Figures are on VALIDATION products only:

- ``grocery`` (closed set): the quality ladder's grocery dataset, restricted to the
  ``Packages/`` products (near-identical brand-and-variant siblings) and at most
  ``--photos-per-product`` training photos each (plus the catalog image) so that the fine-tuned
  arm fits the CPU budget; the ``val.txt`` photos of those products query the training photos
  and catalog images (``identical_product``) and the catalog images alone (``photo_to_catalog``).
- ``wdc_products`` (unseen products): the pipeline's split (:class:`HeldOutSplit`) of the WDC
  training offers; the train products' offers train, the validation products' offers query every
  offer but the test products' (the validation protocol); test products are never read.

Both arms read the same inputs (the photo and the bare title) and start from the same PCA of the
zero-shot tower features. The frozen arm trains the head on tower features computed once; the
fine-tuned arm trains the last ``--blocks`` image blocks and text layers with the head, its frozen
blocks' outputs computed once per image and text (the encoder's cache, shared by the seeds).

    python benchmarks/finetune.py [--data ../shared/data] [--seeds 3] [--epochs-grocery 30]
        [--epochs-wdc 10] [--blocks 1] [--write-results docs/results.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from afmrl_dagster.catalog.loaders import load_wdc_products
from afmrl_dagster.encoders.dual_tower import ListingFeatures
from afmrl_dagster.encoders.finetune import new_finetuned_encoder
from afmrl_dagster.encoders.listing_encoder import ListingInputs
from afmrl_dagster.evaluation.protocols import GROCERY_ICONIC_PREFIX
from afmrl_dagster.evaluation.splits import HeldOutSplit
from afmrl_dagster.evaluation.statistics import bootstrap_interval
from afmrl_dagster.experiments.quality_ladder import WDC_TRAIN_FILES, load_ladder_dataset, seller_attributes
from afmrl_dagster.local_files import write_text_atomically
from afmrl_dagster.readme import publish_result
from afmrl_dagster.settings import Settings
from afmrl_dagster.training.encoder_training import EncoderTrainingConfig, train_encoder, train_listing_encoder
from afmrl_dagster.attributes.format import attributes_to_text

BLOCK = "finetune"
ARMS = ("dual-tower (frozen towers)", "dual-tower-finetune")


def log(message: str) -> None:
    print(f"finetune: {message}", file=sys.stderr, flush=True)


def read_file(uri: str) -> bytes:
    return Path(uri).read_bytes()


def grocery_task(root: Path, photos_per_product: int) -> dict:
    dataset = load_ladder_dataset(f"grocery:{root}")
    packages = dataset.train.filter(pl.col("image_uri").str.contains("/Packages/"))["product_id"].unique().to_list()
    train = dataset.train.with_columns(text=pl.Series(dataset.attribute_texts)).filter(pl.col("product_id").is_in(packages))
    iconic = train.filter(pl.col("listing_id").str.starts_with(GROCERY_ICONIC_PREFIX))
    photos = train.filter(~pl.col("listing_id").str.starts_with(GROCERY_ICONIC_PREFIX)).sort("listing_id")
    photos = photos.group_by("product_id", maintain_order=True).head(photos_per_product).select(train.columns)
    train = pl.concat([iconic, photos]).sort("listing_id")
    queries = dataset.validation.listings.filter(pl.col("listing_id").is_in(list(dataset.validation.query_ids))
                                           & pl.col("product_id").is_in(packages)).sort("listing_id")
    return {
        "name": "grocery", "products": "closed set",
        "note": (f"the {len(packages)} Packages/ products; train on {photos.height} store photos (at most {photos_per_product} per product) "
                 f"and {iconic.height} catalog images; their {queries.height} validation photos "
                 "(half of val.txt; the other half is the ladder's test) are the queries "
                 "(new photos of trained products)"),
        "train": train, "train_texts": train["text"].to_list(), "queries": queries,
        "galleries": {"identical_product": train, "photo_to_catalog": iconic},
    }


def wdc_task(root: Path) -> dict:
    offers = load_wdc_products(root, files=WDC_TRAIN_FILES.split(","))
    split = HeldOutSplit()
    train = offers.filter(pl.Series(split.mask(offers, "train"))).sort("listing_id")
    validation = offers.filter(pl.Series(split.mask(offers, "validation"))).sort("listing_id")
    return {
        "name": "wdc_products", "products": "unseen products",
        "note": (f"the pipeline's split of {WDC_TRAIN_FILES.replace(',', ' + ')}: the offers of {train['product_id'].n_unique()} train products "
                 f"train; the {validation.height} offers of {validation['product_id'].n_unique()} validation products query every "
                 "train and validation offer (test products never read)"),
        "train": train, "train_texts": [attributes_to_text(a) for a in seller_attributes(train, title_facts=True)],
        "queries": validation, "galleries": {"identical_product": pl.concat([train, validation]).sort("listing_id")},
    }


def inputs_of(listings: pl.DataFrame) -> ListingInputs:
    return ListingInputs(listings["listing_id"].to_list(), listings["title"].to_list(),
                         image_uris=listings["image_uri"].to_list(), read_bytes=read_file)


def hits_at_1(query_emb, query_ids, query_products, gallery_emb, gallery_ids, gallery_products) -> np.ndarray:
    """Per query: 1 when its nearest gallery listing (its own listing excluded) is of its product."""
    scores = query_emb @ gallery_emb.T
    position = {listing_id: j for j, listing_id in enumerate(gallery_ids)}
    for i, listing_id in enumerate(query_ids):
        if listing_id in position:
            scores[i, position[listing_id]] = -np.inf
    best = scores.argmax(1)
    return np.array([gallery_products[j] == query_products[i] for i, j in enumerate(best)], dtype=float)


def mean_sd(values: list[float], signed: bool = False) -> str:
    text = f"{statistics.fmean(values):+.3f}" if signed else f"{statistics.fmean(values):.3f}"
    return text + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def run_task(task: dict, args, base) -> dict:
    train, queries = task["train"], task["queries"]
    everything = pl.concat([train.select(queries.columns), queries]).unique("listing_id", keep="first").sort("listing_id")
    inputs = inputs_of(everything)
    row = {listing_id: i for i, listing_id in enumerate(everything["listing_id"].to_list())}
    train_rows = np.array([row[i] for i in train["listing_id"].to_list()])
    started = time.perf_counter()
    # Zero-shot tower features of every listing, through the fine-tuned encoder's own towers (bit-identical to
    # the frozen featurizers); this fills its frozen-block cache, which every seed's copy starts with.
    chunks = []
    base.eval()
    with torch.inference_mode():
        for start in range(0, len(inputs), 64):
            rows = np.arange(start, min(start + 64, len(inputs)))
            chunks.append([t.float().cpu().numpy() for t in base.tower_features(inputs, rows)])
            log(f"{task['name']}: tower features {rows[-1] + 1}/{len(inputs)}")
    image, mask, text = (np.concatenate(parts) for parts in zip(*chunks))
    features = ListingFeatures(inputs.listing_ids, image, mask, text)
    feature_seconds = time.perf_counter() - started
    train_inputs = inputs.subset(train_rows)
    train_inputs.features = None
    products, lines = train["product_id"].to_list(), train["product_line"].to_list()
    epochs = args.epochs_grocery if task["name"] == "grocery" else args.epochs_wdc
    records = []
    for seed in range(args.seeds):
        config = EncoderTrainingConfig(epochs=epochs, batch_size=args.batch_size, seed=seed)
        for arm in ARMS:
            started = time.perf_counter()
            if arm == ARMS[0]:
                result = train_encoder(features.subset(train_rows), products, lines, task["train_texts"], config)
                encoder = result.encoder
                trained = time.perf_counter() - started
                embed_inputs = ListingInputs(inputs.listing_ids, inputs.titles, features=features)
            else:
                encoder = copy.deepcopy(base)
                # the same PCA start as the frozen arm: from the zero-shot features of the training listings
                train_inputs.features = features.subset(train_rows)
                result = train_listing_encoder(encoder, train_inputs, products, lines, task["train_texts"], config)
                train_inputs.features = None
                encoder = result.encoder
                trained = time.perf_counter() - started
                embed_inputs = inputs
            embeddings = encoder.embed(embed_inputs)
            seconds = time.perf_counter() - started
            query = embeddings[[row[i] for i in queries["listing_id"].to_list()]]
            hits = {}
            for name, gallery in task["galleries"].items():
                hits[name] = hits_at_1(query, queries["listing_id"].to_list(), queries["product_id"].to_list(),
                                       embeddings[[row[i] for i in gallery["listing_id"].to_list()]],
                                       gallery["listing_id"].to_list(), gallery["product_id"].to_list())
            record = {"task": task["name"], "arm": arm, "seed": seed, "train_seconds": trained, "seconds": seconds,
                      "seconds_per_epoch": trained / epochs, "epochs": epochs, "losses": [r["loss"] for r in result.history],
                      "recall@1": {name: float(h.mean()) for name, h in hits.items()}, "hits": {name: h.tolist() for name, h in hits.items()}}
            records.append(record)
            log(f"{task['name']} seed {seed} {arm}: R@1 {record['recall@1']} in {seconds:.0f} s "
                f"(loss {record['losses'][0]:.3f} -> {record['losses'][-1]:.3f})")
    return {"task": task["name"], "products": task["products"], "note": task["note"], "feature_seconds": feature_seconds,
            "queries": queries.height, "train_listings": train.height, "epochs": epochs, "records": records}


def table(result: dict) -> str:
    galleries = list(result["records"][0]["hits"])
    header = ["encoder", "seeds", *(f"R@1 {g} (mean ± sd)" for g in galleries), *(f"95% CI {g} (queries)" for g in galleries),
              "ΔR@1 vs frozen (paired seeds)", "95% CI of Δ (queries)", "s/epoch", "train + embed s/seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_arm = {arm: [r for r in result["records"] if r["arm"] == arm] for arm in ARMS}
    headline = galleries[0]
    for arm, group in by_arm.items():
        cells = [arm, str(len(group))]
        cells += [mean_sd([r["recall@1"][g] for r in group]) for g in galleries]
        for g in galleries:
            low, high = bootstrap_interval(np.mean([r["hits"][g] for r in group], axis=0))
            cells.append(f"{low:.3f} – {high:.3f}")
        if arm == ARMS[0]:
            cells += ["", ""]
        else:
            base = {r["seed"]: r for r in by_arm[ARMS[0]]}
            deltas = [r["recall@1"][headline] - base[r["seed"]]["recall@1"][headline] for r in group]
            per_query = np.mean([np.array(r["hits"][headline]) - np.array(base[r["seed"]]["hits"][headline]) for r in group], axis=0)
            low, high = bootstrap_interval(per_query)
            cells += [mean_sd(deltas, signed=True), f"{low:+.3f} – {high:+.3f}"]
        cells += [f"{statistics.fmean(r['seconds_per_epoch'] for r in group):.2f}", f"{statistics.fmean(r['seconds'] for r in group):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=Settings.from_env().data)
    parser.add_argument("--tasks", default="grocery,wdc_products")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs-grocery", type=int, default=30)
    parser.add_argument("--epochs-wdc", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=1, help="image blocks and text layers the fine-tuned arm trains")
    parser.add_argument("--photos-per-product", type=int, default=8)
    parser.add_argument("--out", default=".afmrl/benchmarks/finetune.json")
    parser.add_argument("--write-results", metavar="FILE")
    args = parser.parse_args(argv)
    started_all = time.perf_counter()
    torch.manual_seed(0)
    base = new_finetuned_encoder(unfrozen_blocks=args.blocks, frozen_cache_items=1_000_000)
    results = []
    for name in [n.strip() for n in args.tasks.split(",") if n.strip()]:
        folder = Path(args.data) / ("grocery_store" if name == "grocery" else "wdc_products")
        if not folder.is_dir():
            log(f"skipping {name}: {folder} does not exist")
            continue
        task = grocery_task(folder, args.photos_per_product) if name == "grocery" else wdc_task(folder)
        log(f"{name}: {task['train'].height} training listings, {task['queries'].height} validation queries")
        results.append(run_task(task, args, base))
    total = time.perf_counter() - started_all
    write_text_atomically(args.out, json.dumps({"seconds": total, "threads": torch.get_num_threads(), "torch": torch.__version__,
                                                "machine": platform.machine(), "blocks": args.blocks, "results": results}) + "\n")
    sections = [
        f"`dual-tower-finetune` (last {args.blocks} EfficientNet-Lite0 block(s) with the final 1x1 convolution, last {args.blocks} "
        f"MiniLM layer(s), towers at 0.1 x the head's learning rate) against `dual-tower` (the head over frozen tower features). "
        f"Both arms: same training listings, product-line sampler, full AGCL, batch {args.batch_size} products, PCA start, epochs as "
        f"below; R@1 on VALIDATION queries, mean ± sample sd over {args.seeds} seeds; the 95% intervals bootstrap the queries "
        f"(hits averaged over seeds); Δ is each seed's R@1 minus the frozen arm's with the same seed. s/epoch: training only "
        f"(the tower features / frozen-block outputs, computed once per listing and shared by both arms and every seed, are not in it). "
        f"Whole run {total / 60:.1f} min on {torch.get_num_threads()} CPU threads (a shared machine), torch {torch.__version__}."
    ]
    for result in results:
        sections.append(
            f"**{result['task']}** ({result['train_listings']} training listings, {result['queries']} validation queries, "
            f"{result['epochs']} epochs; tower features {result['feature_seconds'] / 60:.1f} min). Products: **{result['products']}**: "
            f"{result['note']}.\n\n" + table(result)
        )
    return publish_result("\n\n".join(sections), args.write_results, BLOCK)


if __name__ == "__main__":
    raise SystemExit(main())
