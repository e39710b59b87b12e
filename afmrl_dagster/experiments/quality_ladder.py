"""The fair test of AFMRL's claims, one dataset at a time: every row trained and scored through
the same code, decided on validation, reported once on test, with per-query intervals.

Each dataset fixes three disjoint parts (no listing in two), and says which products its
queries are (*closed set*: new photos or offers of trained products; *unseen products*: products
held out of training):

- ``builtin``: 40% of the products of each line are held out, half of them validation, half
  test (unseen products); their listings query the whole catalog but the other part's.
- ``grocery``: train on the ``train.txt`` photos and the iconic catalog images; the
  ``val.txt`` photos are split in two by photo (half of each product's photos each side):
  *validation* and *test* (closed set). Each part's photos query every training listing and
  catalog image (``identical_product``), the catalog images only (``photo_to_catalog``), and
  the 31 ``Packages`` catalog images only (``packages_to_catalog``, the look-alike siblings).
- ``wdc_products``: train on the ``train_medium`` offers; the ``valid_medium`` offers (minus
  any gold-standard offer) are validation, the ``000un`` gold standard is test (closed set);
  each offer of a part queries the others of that part.
- ``amazon_google``: matched products split by product, 50% train, 25% validation, 25% test
  (unseen products); records of a part query the other table (its records of the other
  parts removed).

Rows are grouped by the claim they test (:data:`ROWS`): AGCL against InfoNCE in its paper
form and with the BM25 scale put right, the false-negative mask where false negatives exist
(products split in two unlinked ids in training), and attributes in the encoder's own input
at training and serving time. Tower features are computed once per dataset and cached, so
each (row, seed) costs the head's training only.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl

from ..attributes.format import attributes_to_text, parse_attributes
from ..attributes.teacher import SellerAttributeTeacher
from ..catalog.loaders import load_wdc_products, parse_catalog_spec
from ..catalog.splits import holdout_products
from ..encoders.dual_tower import ListingFeatures, embed_features, zero_shot_embeddings
from ..encoders.towers import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL, TextFeaturizer
from ..evaluation.encoders import Encoder, tower_features
from ..evaluation.protocols import (
    CLOSED_SET,
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
from ..evaluation.statistics import estimate, first_match_ranks, paired_difference
from ..features import with_listing_text
from ..training.encoder_training import EncoderTrainingConfig, train_encoder

PARTS = ("validation", "test")
ZERO_SHOT_ROW = "zero-shot towers"
BASELINE_ROW = "plain InfoNCE"
INFO_NCE = {"use_weights": False, "use_false_negative_mask": False}


@dataclass(frozen=True)
class Row:
    """One trained configuration: AGCL switches, training overrides, what it tests and against what."""

    claim: str
    agcl: dict
    training: dict = field(default_factory=dict)
    baseline: str = BASELINE_ROW
    unlinked_duplicates: bool = False  # train on products split in two ids (false negatives to drop)
    attributes_in_text: bool = False  # title + attributes, at training and at serving


ROWS: dict[str, Row] = {
    BASELINE_ROW: Row("baseline", INFO_NCE, baseline=ZERO_SHOT_ROW),
    "AGCL, paper form (word terms, raw BM25)": Row("1: AGCL", {"bm25_normalisation": "raw"}, {"bm25_tokenizer": "words"}),
    "AGCL, fact terms, BM25 / positive's": Row("1: AGCL", {"bm25_normalisation": "positive"}, {"bm25_tokenizer": "pairs"}),
    "AGCL, fact terms, z-scored BM25": Row("1: AGCL", {"bm25_normalisation": "zscore"}, {"bm25_tokenizer": "pairs"}),
    "plain InfoNCE, unlinked duplicates": Row("1: mask", INFO_NCE, unlinked_duplicates=True),
    "AGCL mask only, unlinked duplicates": Row("1: mask", {"use_weights": False, "use_false_negative_mask": True},
                                               baseline="plain InfoNCE, unlinked duplicates", unlinked_duplicates=True),
    "plain InfoNCE, + attributes in the text": Row("2: attributes", INFO_NCE, attributes_in_text=True),
}
ALL_ROWS = (ZERO_SHOT_ROW, *ROWS)
WDC_TRAIN_FILE = "wdcproducts80cc20rnd000un_train_medium.json.gz"
WDC_VALIDATION_FILE = "wdcproducts80cc20rnd000un_valid_medium.json.gz"
WDC_TRAIN_FILES = f"{WDC_TRAIN_FILE},{WDC_VALIDATION_FILE}"
WDC_TEST_FILE = "wdcproducts80cc20rnd000un_gs.json.gz"


@dataclass
class LadderDataset:
    """Training listings (with the attribute text BM25 reads), the validation and test plans,
    and, where the listings themselves carry them, the attributes every listing has at serving
    time (``serving_attributes`` by listing id; ``None`` where only a model could read them)."""

    name: str
    description: str
    validation: EvaluationPlan
    test: EvaluationPlan
    train: pl.DataFrame
    attributes: list[dict]  # the teacher's attributes of each ``train`` listing
    serving_attributes: dict[str, dict] | None = None
    images: dict[str, bytes] = field(default_factory=dict)
    headline: str = "identical_product"  # the task the summary table reports
    training: dict = field(default_factory=dict)  # EncoderTrainingConfig overrides for this dataset

    @property
    def products(self) -> str:
        return self.test.products

    @property
    def attribute_texts(self) -> list[str]:
        """``key: value; ...`` per training listing, the text BM25 reads."""
        return [attributes_to_text(attributes) for attributes in self.attributes]

    def plan(self, part: str) -> EvaluationPlan:
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        return self.validation if part == "validation" else self.test

    def listings(self) -> pl.DataFrame:
        """Every listing the dataset embeds (training, validation, test), once each, by listing id."""
        columns = ["listing_id", "product_id", "product_line", "title", "image_uri"]
        parts = [self.train.select(columns), self.validation.listings.select(columns), self.test.listings.select(columns)]
        return pl.concat(parts).unique("listing_id", keep="first").sort("listing_id")


def seller_attributes(listings: pl.DataFrame, title_facts: bool = False) -> list[dict]:
    """The built-in teacher's attributes per listing: the seller's attributes, the known values
    its title names, and with ``title_facts`` the quantities and model codes of its title."""
    return [parse_attributes(raw).attributes or {} for raw in SellerAttributeTeacher(title_facts=title_facts).annotate(listings)]


def _serving_attributes(listings: pl.DataFrame, title_facts: bool) -> dict[str, dict]:
    return dict(zip(listings["listing_id"].to_list(), seller_attributes(listings, title_facts)))


def _split_products(products: list[str], lines: list[str], fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """``fraction`` of each line's products held out, then halved: (validation, test)."""
    held_out = holdout_products(products, lines, fraction, seed=seed)
    ordered = sorted(held_out, key=lambda p: hashlib.blake2b(f"{seed}:{p}".encode(), digest_size=8).digest())
    return set(ordered[::2]), set(ordered[1::2])


def _builtin(spec: str, holdout_fraction: float) -> LadderDataset:
    catalog, images = builtin_or_parquet(spec)
    validation, test = _split_products(catalog["product_id"].to_list(), catalog["product_line"].to_list(), holdout_fraction, 0)
    plans = {}
    for part, products, other in (("validation", validation, test), ("test", test, validation)):
        queries = sorted(catalog.filter(pl.col("product_id").is_in(list(products)))["listing_id"].to_list())
        gallery = catalog.filter(~pl.col("product_id").is_in(list(other)))
        description = f"listings of {len(products)} held-out products query the catalog (the other part's products removed)"
        task = RetrievalTask("identical_product", description, tuple(queries), tuple(sorted(gallery["listing_id"].to_list())))
        plans[part] = make_plan("builtin", description, gallery, queries, [task], images=images, products=UNSEEN_PRODUCTS,
                                products_note=f"{len(products)} products held out of training")
    train = catalog.filter(~pl.col("product_id").is_in(list(validation | test))).sort("listing_id")
    description = (f"{holdout_fraction:.0%} of each line's products held out, half validation, half test; their listings "
                   "query the catalog")
    return LadderDataset("builtin", description, plans["validation"], plans["test"], train, seller_attributes(train),
                         _serving_attributes(catalog, False), images, training={"pairs_per_product": 4})


def _grocery_parts(queries: list[str], products: dict[str, str]) -> tuple[list[str], list[str]]:
    """``val.txt`` photos halved per product by a fixed hash: (validation, test)."""
    by_product: dict[str, list[str]] = {}
    for listing in queries:
        by_product.setdefault(products[listing], []).append(listing)
    sides: tuple[list[str], list[str]] = ([], [])
    odd = 0  # a product with an odd number of photos gives its extra one to each side in turn
    for product in sorted(by_product):
        ordered = sorted(by_product[product], key=lambda p: hashlib.blake2b(p.encode(), digest_size=8).digest())
        first = odd % 2
        sides[first].extend(ordered[::2])
        sides[1 - first].extend(ordered[1::2])
        odd += len(ordered) % 2
    return sorted(sides[0]), sorted(sides[1])


def _grocery(root: Path) -> LadderDataset:
    full = grocery_plan(root, resolve_splits("val.txt", root), None)
    catalog = full.listings
    products = dict(zip(catalog["listing_id"].to_list(), catalog["product_id"].to_list()))
    held = set(full.query_ids)
    train = catalog.filter(~pl.col("listing_id").is_in(list(held)))
    gallery = tuple(sorted(train["listing_id"].to_list()))
    iconic = tuple(i for i in gallery if i.startswith(GROCERY_ICONIC_PREFIX))
    package_products = set(catalog.filter(pl.col("image_uri").str.contains("/Packages/"))["product_id"].to_list())
    packages = tuple(i for i in iconic if products[i] in package_products)
    plans = {}
    for part, queries in zip(PARTS, _grocery_parts(sorted(held), products)):
        package_queries = tuple(i for i in queries if products[i] in package_products)
        tasks = [
            RetrievalTask("identical_product", f"{part} photos query every training photo and catalog image", tuple(queries), gallery),
            RetrievalTask("photo_to_catalog", f"{part} photos query the 81 catalog images", tuple(queries), iconic),
            RetrievalTask("packages_to_catalog", f"{part} photos of packaged products query the {len(packages)} packaged catalog images",
                          package_queries, packages),
        ]
        plans[part] = make_plan("grocery", tasks[0].description, catalog, queries, tasks, products=CLOSED_SET,
                                products_note="new photos of trained products: every split photographs the same products")
    # A store photo has no attributes of its own; for AGCL's weights (training only) the
    # attributes of its product's catalog entry stand in for what a multimodal teacher reads
    # off the package. No serving-time attributes: reading them off a photo takes a model
    # (the visual reader, benchmarks/visual_reader.py).
    iconic_rows = train.filter(pl.col("listing_id").str.starts_with(GROCERY_ICONIC_PREFIX))
    by_product = dict(zip(iconic_rows["product_id"].to_list(), seller_attributes(iconic_rows)))
    attributes = [by_product.get(product, {}) for product in train["product_id"].to_list()]
    description = ("train on the train.txt photos and the catalog images; the val.txt photos, halved per product, are "
                   "validation and test and query the training photos and catalog images")
    return LadderDataset("grocery", description, plans["validation"], plans["test"], train, attributes, None,
                         training={"epochs": 40, "pairs_per_product": 4})


def _wdc(root: Path) -> LadderDataset:
    test = wdc_plan(root, [root / WDC_TEST_FILE], None)
    validation = wdc_plan(root, [root / WDC_VALIDATION_FILE], None)
    kept = validation.listings.filter(~pl.col("listing_id").is_in(test.query_ids))
    ids = kept["listing_id"].to_list()
    task = RetrievalTask("identical_product", "each validation offer queries the other validation offers", tuple(ids), tuple(ids))
    validation = make_plan("wdc_products", task.description, kept, ids, [task], products=CLOSED_SET,
                           products_note="offers of trained products (the 000un release)")
    train = load_wdc_products(root, files=[WDC_TRAIN_FILE])
    train = train.filter(~pl.col("listing_id").is_in(test.query_ids + ids)).sort("listing_id")
    every = pl.concat([train, validation.listings, test.listings], how="diagonal_relaxed").unique("listing_id")
    return LadderDataset("wdc_products", f"train on {WDC_TRAIN_FILE}; validation: the {WDC_VALIDATION_FILE} offers "
                         f"(gold-standard offers removed); test: {WDC_TEST_FILE}; each offer queries the others of its part",
                         validation, test, train, seller_attributes(train, title_facts=True), _serving_attributes(every, True))


def _amazon_google(root: Path, holdout_fraction: float) -> LadderDataset:
    full = amazon_google_plan(root, None)
    catalog = full.listings
    sizes = catalog.group_by("product_id").len()
    matched = sizes.filter(pl.col("len") >= 2)["product_id"].to_list()
    validation, test = _split_products(matched, ["amazon-google"] * len(matched), holdout_fraction, 0)
    plans = {}
    for part, products, other in (("validation", validation, test), ("test", test, validation)):
        query_ids = set(catalog.filter(pl.col("product_id").is_in(list(products)))["listing_id"].to_list())
        other_ids = set(catalog.filter(pl.col("product_id").is_in(list(other)))["listing_id"].to_list())
        tasks = [replace(task, query_ids=tuple(i for i in task.query_ids if i in query_ids),
                         gallery_ids=tuple(i for i in task.gallery_ids if i not in other_ids)) for task in full.tasks]
        description = f"records of {len(products)} held-out matched products query the other table"
        plans[part] = make_plan("amazon_google", description, catalog, sorted(query_ids), tasks, pooled=full.pooled,
                                products=UNSEEN_PRODUCTS, products_note=f"{len(products)} matched products held out of training")
    train = catalog.filter(pl.col("product_id").is_in(list(set(matched) - validation - test))).sort("listing_id")
    description = (f"matched products split by product: {len(matched) - len(validation) - len(test)} train, {len(validation)} "
                   f"validation, {len(test)} test; records query the other table")
    return LadderDataset("amazon_google", description, plans["validation"], plans["test"], train,
                         seller_attributes(train, title_facts=True), _serving_attributes(catalog, True))


def load_ladder_dataset(spec: str, holdout_fraction: float | None = None) -> LadderDataset:
    """``builtin[:...]``, ``grocery:ROOT``, ``wdc_products:ROOT`` or ``amazon_google:ROOT``.

    ``holdout_fraction``: the share of products held out (then halved into validation and
    test) on the built-in catalog (default 0.4) and on Amazon-Google (default 0.5)."""
    if spec == "builtin" or spec.startswith("builtin:"):
        return _builtin(spec, 0.4 if holdout_fraction is None else holdout_fraction)
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


def features_key(listings: pl.DataFrame, image_tower: str, text_tower: str) -> str:
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
        path = Path(cache_dir) / f"{dataset.name}-{features_key(listings, image_tower, text_tower)}.npz"
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


def features_with_attributes(dataset: LadderDataset, features: ListingFeatures, text_featurizer: TextFeaturizer) -> ListingFeatures:
    """``features`` with the text part of title + attributes: the teacher's for training
    listings, the serving-time ones for every other listing."""
    if dataset.serving_attributes is None:
        raise ValueError(f"{dataset.name}: no serving-time attributes (a photo's attributes take a model to read)")
    listings = dataset.listings()
    taught = dict(zip(dataset.train["listing_id"].to_list(), dataset.attributes))
    attributes = [taught.get(i, dataset.serving_attributes.get(i, {})) for i in listings["listing_id"].to_list()]
    return with_listing_text(features, text_featurizer, listings["title"].to_list(), attributes)


# ---- scoring -------------------------------------------------------------------------------------


def plan_ranks(plan: EvaluationPlan, embeddings: np.ndarray, query_embeddings: np.ndarray | None = None) -> dict[str, list[int]]:
    """Rank of the first true match of every query of every task (pooled tasks concatenated);
    ``embeddings`` has one row per listing of ``plan.listings``, and so has ``query_embeddings``
    when queries are embedded apart from the gallery (e.g. with another generator's attributes)."""
    queries = embeddings if query_embeddings is None else query_embeddings
    ids = plan.listings["listing_id"].to_list()
    row = {listing_id: i for i, listing_id in enumerate(ids)}
    products = plan.listings["product_id"].to_list()
    ranks: dict[str, list[int]] = {}
    for task in plan.tasks:
        q = [row[i] for i in task.query_ids]
        g = [row[i] for i in task.gallery_ids]
        ranks[task.name] = first_match_ranks(queries[q], [products[i] for i in q], embeddings[g], [products[i] for i in g],
                                             list(task.query_ids), list(task.gallery_ids)).tolist()
    for name, parts in plan.pooled.items():
        ranks[name] = [rank for part in parts for rank in ranks[part]]
    return ranks


def rank_metrics(ranks: list[int]) -> dict[str, float]:
    """R@1, R@5 and MRR of first-match ranks (a query without a true match counts as a miss)."""
    values = np.asarray(ranks)
    found = values > 0
    return {"recall@1": float(np.mean(values == 1)), "recall@5": float(np.mean(found & (values <= 5))),
            "mrr": float(np.mean(np.where(found, 1.0 / np.maximum(values, 1), 0.0)))}


# ---- running the ladder ------------------------------------------------------------------------------


@dataclass
class LadderSettings:
    """What every trained row shares; ``training`` overrides :class:`EncoderTrainingConfig` fields."""

    seeds: tuple[int, ...] = (0, 1, 2)
    rows: tuple[str, ...] = ALL_ROWS
    training: dict = field(default_factory=dict)  # none: the pipeline's schedule, EncoderTrainingConfig's defaults
    agcl: dict = field(default_factory=dict)  # AGCLConfig overrides shared by all rows (delta, bm25_scale)
    duplicate_fraction: float = 0.25  # share of the products with 4+ training listings split in two unlinked ids


def rows_of(features: ListingFeatures, listings: pl.DataFrame) -> np.ndarray:
    position = {listing_id: i for i, listing_id in enumerate(features.listing_ids)}
    return np.array([position[i] for i in listings["listing_id"].to_list()], dtype=np.int64)


def unlink_duplicates(product_ids: list[str], product_lines: list[str], fraction: float, seed: int = 0) -> tuple[list[str], int]:
    """Product ids with ``fraction`` of each line's products of 4+ listings split in two: every
    second listing of such a product gets the id ``<product>#twin``, so the loss meets two
    listings of one product as a negative pair (a false negative), as in a catalog whose
    duplicates are not linked. Returns the ids and the number of products split."""
    counts: dict[str, int] = {}
    for product in product_ids:
        counts[product] = counts.get(product, 0) + 1
    eligible = [i for i, product in enumerate(product_ids) if counts[product] >= 4]
    if not eligible:
        return list(product_ids), 0
    chosen = holdout_products([product_ids[i] for i in eligible], [product_lines[i] for i in eligible], fraction, seed=seed)
    seen: dict[str, int] = {}
    out = []
    for product in product_ids:
        if product in chosen:
            seen[product] = seen.get(product, 0) + 1
            out.append(f"{product}#twin" if seen[product] % 2 == 0 else product)
        else:
            out.append(product)
    return out, len(chosen)


def run_ladder(
    dataset: LadderDataset,
    features: ListingFeatures,
    settings: LadderSettings | None = None,
    text_featurizer: TextFeaturizer | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> list[dict]:
    """One record per (row, seed): first-match ranks of every task on validation and test,
    their metrics, training seconds and the last epoch's AGCL diagnostics. A row with
    attributes in the text is left out on a dataset without serving-time attributes."""
    settings = settings or LadderSettings()
    unknown = set(settings.rows) - set(ALL_ROWS)
    if unknown:
        raise ValueError(f"unknown ladder row(s) {sorted(unknown)}; known: {list(ALL_ROWS)}")
    rows = [row for row in settings.rows if row == ZERO_SHOT_ROW or not ROWS[row].attributes_in_text or dataset.serving_attributes]
    with_attributes = None
    if any(row != ZERO_SHOT_ROW and ROWS[row].attributes_in_text for row in rows):
        with_attributes = features_with_attributes(dataset, features, text_featurizer or TextFeaturizer(DEFAULT_TEXT_MODEL))
    part_rows = {part: rows_of(features, dataset.plan(part).listings) for part in PARTS}
    train_rows = rows_of(features, dataset.train)
    products, lines = dataset.train["product_id"].to_list(), dataset.train["product_line"].to_list()
    twins, split_products = unlink_duplicates(products, lines, settings.duplicate_fraction)
    attribute_texts = dataset.attribute_texts

    def scored(embed: Callable[[ListingFeatures], np.ndarray], source: ListingFeatures) -> dict:
        out = {}
        for part in PARTS:
            ranks = plan_ranks(dataset.plan(part), embed(source.subset(part_rows[part])))
            out[part] = {"ranks": ranks, "metrics": {task: rank_metrics(values) for task, values in ranks.items()}}
        return out

    records = []
    trained: dict[tuple, dict] = {}  # a training identical to one already run (unlinked duplicates where none was split) is reused
    if ZERO_SHOT_ROW in rows:
        result = scored(zero_shot_embeddings, features)
        records.append({"dataset": dataset.name, "row": ZERO_SHOT_ROW, "seed": None, "seconds": 0.0, **result})
        progress(f"{dataset.name}: {ZERO_SHOT_ROW} validation R@1 {result['validation']['metrics'][dataset.headline]['recall@1']:.3f}")
    for name in rows:
        if name == ZERO_SHOT_ROW:
            continue
        row = ROWS[name]
        source = with_attributes if row.attributes_in_text else features
        row_products = twins if row.unlinked_duplicates else products
        for seed in settings.seeds:
            config = EncoderTrainingConfig(**{**settings.training, **dataset.training, **row.training}, seed=seed,
                                           agcl={**settings.agcl, **row.agcl})
            key = (row.attributes_in_text, tuple(row_products), repr(config))
            if key in trained:
                records.append({**trained[key], "row": name, "same_training_as": trained[key]["row"]})
                progress(f"{dataset.name}: {name} seed {seed}: the same training as {trained[key]['row']} (no product split), reused")
                continue
            started = time.perf_counter()
            result = train_encoder(source.subset(train_rows), row_products, lines, attribute_texts, config)
            seconds = time.perf_counter() - started
            outcome = scored(partial(embed_features, result.head), source)
            records.append({"dataset": dataset.name, "row": name, "seed": seed, "seconds": seconds, "epochs": config.epochs,
                            "steps": result.global_step, "first_loss": result.history[0]["loss"],
                            "final_loss": result.history[-1]["loss"],
                            "mean_negative_weight": result.history[-1]["mean_negative_weight"],
                            "masked_fraction": result.history[-1]["masked_fraction"],
                            "unlinked_products": split_products if row.unlinked_duplicates else 0, **outcome})
            trained[key] = records[-1]
            progress(f"{dataset.name}: {name} seed {seed} validation R@1 "
                     f"{outcome['validation']['metrics'][dataset.headline]['recall@1']:.3f} ({seconds:.0f} s)")
    return records


# ---- reporting -----------------------------------------------------------------------------------


def mean_sd(values: list[float], signed: bool = False) -> str:
    """``mean ± sample sd`` to three decimals (the mean alone for one value); ``signed`` shows the sign."""
    mean = statistics.fmean(values)
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return text + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def seed_mean_hits(records: list[dict], part: str, task: str, metric: str = "recall@1") -> np.ndarray:
    """Per-query outcome averaged over the seeds of ``records`` (hit at 1, or reciprocal rank)."""
    per_seed = []
    for record in records:
        ranks = np.asarray(record[part]["ranks"][task])
        per_seed.append((ranks == 1).astype(float) if metric == "recall@1" else np.where(ranks > 0, 1.0 / np.maximum(ranks, 1), 0.0))
    return np.mean(per_seed, axis=0)


def summarise(records: list[dict], task: str, baselines: dict[str, str] | None = None) -> dict[str, dict]:
    """Per row: validation R@1 (mean, sd over seeds), test R@1 and MRR with 95% intervals over
    queries (seed-averaged), and the paired test R@1 difference against the row's baseline."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        if task in record["test"]["ranks"]:
            groups.setdefault(record["row"], []).append(record)
    baselines = baselines or {name: row.baseline for name, row in ROWS.items()}
    out = {}
    for name, group in groups.items():
        test_hits = seed_mean_hits(group, "test", task)
        summary = {
            "seeds": sum(r["seed"] is not None for r in group),
            "validation_r1": [r["validation"]["metrics"][task]["recall@1"] for r in group],
            "validation_hits": seed_mean_hits(group, "validation", task).tolist(),
            "test_r1": estimate(test_hits),
            "test_mrr": estimate(seed_mean_hits(group, "test", task, "mrr")),
            "test_queries": len(test_hits),
        }
        baseline = baselines.get(name)
        if baseline in groups:
            summary["baseline"] = baseline
            summary["test_delta"] = paired_difference(test_hits, seed_mean_hits(groups[baseline], "test", task))
            summary["validation_delta"] = paired_difference(summary["validation_hits"],
                                                            seed_mean_hits(groups[baseline], "validation", task))
        out[name] = summary
    return out


def chosen_on_validation(records: list[dict], task: str, candidates: tuple[str, ...]) -> str:
    """The candidate row with the highest mean validation R@1 (ties: the earlier candidate)."""
    summary = summarise(records, task)
    present = [name for name in candidates if name in summary]
    if not present:
        raise ValueError(f"none of {candidates} was run")
    return max(present, key=lambda name: (statistics.fmean(summary[name]["validation_r1"]), -present.index(name)))
