"""The ablation ladder: zero-shot towers, plain InfoNCE, AGCL's parts and full AGCL, trained
and evaluated through the same code on one dataset at a time, over several seeds.

Each dataset fixes which listings train and how the rest is evaluated (the protocols of
``afmrl evaluate``):

- ``builtin``: 30% of the products of each line are held out; their listings query the
  whole catalog.
- ``grocery``: train on the ``train.txt`` photos and the iconic catalog images; the
  ``val.txt`` photos query every listing not in ``val.txt``.
- ``wdc_products``: train on the offers of the train and valid pair files (minus any offer
  of the gold standard); the ``*_gs`` offers form the evaluation catalog, each querying the
  others.
- ``amazon_google``: the matched products are split in two by product; records of the
  first half train, records of the second half query the other table.

Every row reads the same inputs (image and bare title through the frozen towers); the
attributes only feed AGCL's BM25 weights during training. Tower features are computed once
per dataset and cached on disk, so seeds and rows cost only the head's training.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl

from ..attributes.format import attributes_to_text, parse_attributes
from ..attributes.teacher import SellerAttributeTeacher
from ..catalog.loaders import load_wdc_products, parse_catalog_spec
from ..catalog.splits import holdout_products
from ..encoders.dual_tower import ListingFeatures, embed_features, zero_shot_embeddings
from ..encoders.towers import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL
from ..evaluation.encoders import Encoder, tower_features
from ..evaluation.protocols import (
    GROCERY_ICONIC_PREFIX,
    UNSEEN_PRODUCTS,
    EvaluationPlan,
    RetrievalTask,
    amazon_google_plan,
    builtin_or_parquet,
    grocery_plan,
    make_plan,
    resolve_splits,
    wdc_plan,
)
from ..evaluation.report import RETRIEVAL_COLUMNS
from ..evaluation.scoring import score_plan
from ..training.encoder_training import EncoderTrainingConfig, train_encoder

ZERO_SHOT_ROW = "zero-shot towers"
TRAINED_ROWS: dict[str, dict] = {
    "plain InfoNCE": {"use_weights": False, "use_false_negative_mask": False},
    "AGCL weights only": {"use_weights": True, "use_false_negative_mask": False},
    "AGCL mask only": {"use_weights": False, "use_false_negative_mask": True},
    "full AGCL": {"use_weights": True, "use_false_negative_mask": True},
    # A variant outside the paper: the positive pair keeps the lowest weight (see AGCLConfig).
    "full AGCL, positive at weight e": {"use_weights": True, "use_false_negative_mask": True, "weight_positive": False},
}
ROWS = (ZERO_SHOT_ROW, *TRAINED_ROWS)
REPORTED = ("recall@1", "recall@5", "map@10", "mrr")
WDC_TRAIN_FILES = "wdcproducts80cc20rnd000un_train_medium.json.gz,wdcproducts80cc20rnd000un_valid_medium.json.gz"
WDC_TEST_FILE = "wdcproducts80cc20rnd000un_gs.json.gz"


@dataclass
class LadderDataset:
    """Training listings (with the attribute text BM25 reads) and the evaluation plan."""

    name: str
    description: str
    plan: EvaluationPlan
    train: pl.DataFrame
    attributes: list[dict]  # the teacher's attributes of each ``train`` listing
    images: dict[str, bytes] = field(default_factory=dict)
    headline: str = "identical_product"  # the task the summary table reports
    training: dict = field(default_factory=dict)  # EncoderTrainingConfig overrides for this dataset

    @property
    def attribute_texts(self) -> list[str]:
        """``key: value; ...`` per training listing, the text BM25 reads."""
        return [attributes_to_text(attributes) for attributes in self.attributes]

    def listings(self) -> pl.DataFrame:
        """Every listing the dataset embeds: training and evaluation, once each, by listing id."""
        columns = ["listing_id", "product_id", "product_line", "title", "image_uri"]
        both = pl.concat([self.train.select(columns), self.plan.listings.select(columns)])
        return both.unique("listing_id", keep="first").sort("listing_id")


def seller_attributes(listings: pl.DataFrame, title_facts: bool = False) -> list[dict]:
    """The built-in teacher's attributes per listing: the seller's attributes, the known values
    its title names, and with ``title_facts`` the quantities and model codes of its title."""
    return [parse_attributes(raw).attributes or {} for raw in SellerAttributeTeacher(title_facts=title_facts).annotate(listings)]


def _builtin(spec: str, holdout_fraction: float) -> LadderDataset:
    catalog, images = builtin_or_parquet(spec)
    held_out = holdout_products(catalog["product_id"].to_list(), catalog["product_line"].to_list(), holdout_fraction, seed=0)
    queries = sorted(catalog.filter(pl.col("product_id").is_in(list(held_out)))["listing_id"].to_list())
    description = f"listings of the {len(held_out)} held-out products ({holdout_fraction:.0%} per line) query the whole catalog"
    task = RetrievalTask("identical_product", description, tuple(queries), tuple(sorted(catalog["listing_id"].to_list())))
    plan = make_plan("builtin", description, catalog, queries, [task], images=images, products=UNSEEN_PRODUCTS,
                     products_note="the held-out products' listings; the other products train")
    train = catalog.filter(~pl.col("product_id").is_in(list(held_out))).sort("listing_id")
    return LadderDataset("builtin", description, plan, train, seller_attributes(train), images)


def _grocery(root: Path) -> LadderDataset:
    plan = grocery_plan(root, resolve_splits("val.txt", root), None)
    queries = set(plan.query_ids)
    train = plan.listings.filter(~pl.col("listing_id").is_in(list(queries)))
    # A store photo has no attributes of its own; the attributes of its product's catalog
    # entry (brand, country, volume or weight) stand in for what a multimodal teacher reads
    # off the package.
    iconic = train.filter(pl.col("listing_id").str.starts_with(GROCERY_ICONIC_PREFIX))
    by_product = dict(zip(iconic["product_id"].to_list(), seller_attributes(iconic)))
    attributes = [by_product.get(product, {}) for product in train["product_id"].to_list()]
    description = ("train on the train.txt photos and the catalog images; val.txt photos query every "
                   "listing not in val.txt (train photos and catalog images)")
    # Deliberately longer than the pipeline's default: grocery's few training photos per product need more passes.
    return LadderDataset("grocery", description, plan, train, attributes, headline="identical_product",
                         training={"epochs": 150})


def _wdc(root: Path) -> LadderDataset:
    plan = wdc_plan(root, [root / WDC_TEST_FILE], None)
    train = load_wdc_products(root, files=WDC_TRAIN_FILES.split(","))
    train = train.filter(~pl.col("listing_id").is_in(plan.query_ids)).sort("listing_id")
    return LadderDataset("wdc_products", f"train on {WDC_TRAIN_FILES.replace(',', ' + ')} (gold-standard offers removed); "
                         + plan.description, plan, train, seller_attributes(train, title_facts=True))


def _amazon_google(root: Path, test_fraction: float) -> LadderDataset:
    full = amazon_google_plan(root, None)
    catalog = full.listings
    sizes = catalog.group_by("product_id").len()
    matched = sizes.filter(pl.col("len") >= 2)["product_id"].to_list()
    test_products = holdout_products(matched, ["amazon-google"] * len(matched), test_fraction, seed=0)
    test_ids = set(catalog.filter(pl.col("product_id").is_in(list(test_products)))["listing_id"].to_list())
    tasks = [replace(task, query_ids=tuple(i for i in task.query_ids if i in test_ids)) for task in full.tasks]
    description = (f"matched products split by product: {len(matched) - len(test_products)} train, "
                   f"{len(test_products)} test; test records query the whole other table")
    plan = make_plan("amazon_google", description, catalog, sorted(test_ids), tasks, pooled=full.pooled, products=UNSEEN_PRODUCTS,
                     products_note="the test products' records; the other matched products train")
    train = catalog.filter(pl.col("product_id").is_in(list(set(matched) - test_products))).sort("listing_id")
    return LadderDataset("amazon_google", description, plan, train, seller_attributes(train, title_facts=True))


def load_ladder_dataset(spec: str, holdout_fraction: float | None = None) -> LadderDataset:
    """``builtin[:...]``, ``grocery:ROOT``, ``wdc_products:ROOT`` or ``amazon_google:ROOT``.

    ``holdout_fraction``: the share of products held out for testing on the built-in catalog
    (default 0.3) and on Amazon-Google (default 0.5, of the matched products)."""
    if spec == "builtin" or spec.startswith("builtin:"):
        return _builtin(spec, 0.3 if holdout_fraction is None else holdout_fraction)
    name, root = parse_catalog_spec(spec)
    root = root.absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} (from {spec!r}) does not exist")
    if name == "grocery":
        return _grocery(root)
    if name == "wdc_products":
        return _wdc(root)
    if name == "amazon_google":
        return _amazon_google(root, 0.5 if holdout_fraction is None else holdout_fraction)
    raise ValueError(f"the ladder has no protocol for {name!r}; use builtin, grocery, wdc_products or amazon_google")


# ---- features -----------------------------------------------------------------------------------


def _features_key(listings: pl.DataFrame, image_tower: str, text_tower: str) -> str:
    digest = hashlib.blake2b(digest_size=12)
    digest.update(json.dumps([image_tower, text_tower]).encode())
    for column in ("listing_id", "title", "image_uri"):
        digest.update(json.dumps(listings[column].to_list()).encode())
    return digest.hexdigest()


def dataset_features(
    dataset: LadderDataset, cache_dir: str | Path | None = None,
    image_tower: str = DEFAULT_IMAGE_MODEL, text_tower: str = DEFAULT_TEXT_MODEL,
    progress: Callable[[str], None] = lambda message: None,
) -> ListingFeatures:
    """Tower features of every listing of ``dataset`` (in :meth:`LadderDataset.listings` order),
    read from ``cache_dir`` when an earlier run computed them for the same listings and towers."""
    listings = dataset.listings()
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{dataset.name}-{_features_key(listings, image_tower, text_tower)}.npz"
        if path.is_file():
            with np.load(path) as stored:
                return ListingFeatures(listings["listing_id"].to_list(), stored["image"], stored["image_mask"], stored["text"])
    features, _ = tower_features(Encoder("zero-shot", image_tower, text_tower), listings, dataset.images, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp.npz")
        np.savez(temporary, image=features.image, image_mask=features.image_mask, text=features.text)
        temporary.replace(path)
    return features


# ---- running the ladder ------------------------------------------------------------------------------


@dataclass
class LadderSettings:
    """What every trained row shares; ``training`` overrides :class:`EncoderTrainingConfig` fields."""

    seeds: tuple[int, ...] = (0, 1, 2)
    rows: tuple[str, ...] = ROWS
    training: dict = field(default_factory=dict)  # none: the pipeline's schedule, EncoderTrainingConfig's defaults
    agcl: dict = field(default_factory=dict)  # AGCLConfig overrides shared by all rows (delta, bm25_scale)


def rows_of(features: ListingFeatures, listings: pl.DataFrame) -> np.ndarray:
    position = {listing_id: i for i, listing_id in enumerate(features.listing_ids)}
    return np.array([position[i] for i in listings["listing_id"].to_list()], dtype=np.int64)


def run_ladder(
    dataset: LadderDataset,
    features: ListingFeatures,
    settings: LadderSettings | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> list[dict]:
    """One record per (row, seed): the metrics of every task, training seconds and epochs."""
    settings = settings or LadderSettings()
    unknown = set(settings.rows) - set(ROWS)
    if unknown:
        raise ValueError(f"unknown ladder row(s) {sorted(unknown)}; known: {list(ROWS)}")
    train_rows = rows_of(features, dataset.train)
    eval_rows = rows_of(features, dataset.plan.listings)
    train_features, eval_features = features.subset(train_rows), features.subset(eval_rows)
    records = []
    if ZERO_SHOT_ROW in settings.rows:
        metrics = score_plan(dataset.plan, zero_shot_embeddings(eval_features))
        records.append({"dataset": dataset.name, "row": ZERO_SHOT_ROW, "seed": None, "seconds": 0.0, "metrics": metrics})
        progress(f"{dataset.name}: {ZERO_SHOT_ROW} R@1 {metrics[dataset.headline]['recall@1']:.3f}")
    overrides = {**settings.training, **dataset.training}
    for row in settings.rows:
        if row == ZERO_SHOT_ROW:
            continue
        for seed in settings.seeds:
            config = EncoderTrainingConfig(**overrides, seed=seed, agcl={**settings.agcl, **TRAINED_ROWS[row]})
            started = time.perf_counter()
            result = train_encoder(train_features, dataset.train["product_id"].to_list(),
                                   dataset.train["product_line"].to_list(), dataset.attribute_texts, config)
            seconds = time.perf_counter() - started
            metrics = score_plan(dataset.plan, embed_features(result.head, eval_features))
            records.append({"dataset": dataset.name, "row": row, "seed": seed, "seconds": seconds,
                            "epochs": config.epochs, "first_loss": result.history[0]["loss"],
                            "final_loss": result.history[-1]["loss"],
                            # Over the last epoch: how far the weights move off 1 and how often the mask drops a negative.
                            "mean_negative_weight": result.history[-1]["mean_negative_weight"],
                            "masked_fraction": result.history[-1]["masked_fraction"], "metrics": metrics})
            progress(f"{dataset.name}: {row} seed {seed} R@1 {metrics[dataset.headline]['recall@1']:.3f} ({seconds:.0f} s)")
    return records


def paired_differences(records: list[dict], task: str, row: str, baseline: str = "plain InfoNCE", metric: str = "recall@1") -> list[float]:
    """``metric`` of ``row`` minus that of ``baseline``, seed by seed (seeds both rows ran)."""
    by_seed = {(r["row"], r["seed"]): r["metrics"][task][metric] for r in records}
    seeds = sorted(seed for (name, seed) in by_seed if name == row and (baseline, seed) in by_seed)
    return [by_seed[(row, seed)] - by_seed[(baseline, seed)] for seed in seeds]


def mean_sd(values: list[float], signed: bool = False) -> str:
    """``mean ± sample sd`` to three decimals (the mean alone for one value); ``signed`` shows the sign."""
    mean = statistics.fmean(values)
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return text + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def ladder_markdown(dataset: str, records: list[dict], headline: str = "identical_product", metrics: tuple[str, ...] = REPORTED) -> str:
    """A table of one dataset: mean ± sd over seeds per row, every retrieval task's R@1, and the
    seed-by-seed R@1 difference against plain InfoNCE."""
    rows: dict[str, list[dict]] = {}
    for record in records:
        rows.setdefault(record["row"], []).append(record)
    first = records[0]["metrics"]
    other_tasks = [name for name, values in first.items() if name != headline and "recall@1" in values]
    header = ["encoder", "seeds", *(RETRIEVAL_COLUMNS[m] for m in metrics), *(f"R@1 {task}" for task in other_tasks), "ΔR@1 vs InfoNCE (paired)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    has_baseline = "plain InfoNCE" in rows
    for row, group in rows.items():
        cells = [row, str(sum(r["seed"] is not None for r in group) or "-")]
        cells += [mean_sd([r["metrics"][headline][m] for r in group]) for m in metrics]
        cells += [mean_sd([r["metrics"][task]["recall@1"] for r in group]) for task in other_tasks]
        difference = paired_differences(records, headline, row) if has_baseline and row not in ("plain InfoNCE", ZERO_SHOT_ROW) else []
        cells.append(mean_sd(difference, signed=True) if difference else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
