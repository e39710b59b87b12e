"""Identical-product retrieval on held-out products: each held-out listing queries the whole
catalog (itself excluded); the other listings of its product are the relevant results."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from .catalog.splits import holdout_products
from .retrieval.metrics import retrieval_metrics

REPORTED_METRICS = ("recall@1", "recall@5", "recall@10", "map@10")


PARTS = ("train", "validation", "test")


@dataclass(frozen=True)
class HeldOutSplit:
    """Which listings train, which decide and which are reported, by product.

    ``fraction`` of each line's products are *test* products: held out of training and of every
    decision, scored once and reported. Of the other products, ``validation_fraction`` are
    *validation* products, also kept out of training: every decision (the quality gates, the
    promotion, any setting) is taken on them. The rest train. Both are unseen products at
    evaluation time. A product's part depends only on the seed and its id, so adding listings
    or lines moves no product between parts.
    """

    fraction: float = 0.3
    seed: int = 0
    validation_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")

    def test_products(self, catalog: pl.DataFrame) -> set[str]:
        return holdout_products(catalog["product_id"].to_list(), catalog["product_line"].to_list(), self.fraction, self.seed)

    def validation_products(self, catalog: pl.DataFrame) -> set[str]:
        rest = catalog.filter(~pl.col("product_id").is_in(list(self.test_products(catalog))))
        # A second, independent ranking (seed + 1) picks the validation products among the others.
        return holdout_products(rest["product_id"].to_list(), rest["product_line"].to_list(), self.validation_fraction, self.seed + 1)

    def part_of_products(self, catalog: pl.DataFrame) -> dict[str, str]:
        test, validation = self.test_products(catalog), self.validation_products(catalog)
        return {p: "test" if p in test else "validation" if p in validation else "train" for p in set(catalog["product_id"].to_list())}

    def mask(self, catalog: pl.DataFrame, part: str) -> np.ndarray:
        """Listings of ``part`` ('train', 'validation' or 'test'; 'held_out' = validation + test)."""
        if part == "held_out":
            return ~self.mask(catalog, "train")
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS} or 'held_out', got {part!r}")
        parts = self.part_of_products(catalog)
        return np.array([parts[p] == part for p in catalog["product_id"].to_list()], dtype=bool)

    def query_mask(self, catalog: pl.DataFrame) -> np.ndarray:
        """The listings kept out of training (validation and test products)."""
        return self.mask(catalog, "held_out")

    def gallery_mask(self, catalog: pl.DataFrame, part: str) -> np.ndarray:
        """What queries of ``part`` search: validation queries search every listing but the
        test ones (so no decision reads a test listing, not even as a distractor); test
        queries search the whole catalog, as a served query does."""
        if part == "validation":
            return ~self.mask(catalog, "test")
        return np.ones(catalog.height, dtype=bool)


def evaluate_embeddings(catalog: pl.DataFrame, embeddings: np.ndarray, query_mask: np.ndarray, gallery_mask: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of the queries ``query_mask`` against the listings of ``gallery_mask`` (default:
    every listing of ``catalog``); a query's own listing never counts."""
    listing_ids = catalog["listing_id"].to_list()
    product_ids = catalog["product_id"].to_list()
    query_index = np.flatnonzero(query_mask)
    gallery_index = np.arange(len(listing_ids)) if gallery_mask is None else np.flatnonzero(gallery_mask)
    return retrieval_metrics(
        embeddings[query_index],
        embeddings[gallery_index],
        [product_ids[i] for i in query_index],
        [product_ids[i] for i in gallery_index],
        query_listing_ids=[listing_ids[i] for i in query_index],
        gallery_listing_ids=[listing_ids[i] for i in gallery_index],
    )


def results_markdown(results: pl.DataFrame, metrics: tuple[str, ...] = REPORTED_METRICS, caption: str | None = None) -> str:
    """A markdown table with one row per encoder (``encoder`` column; ``products`` too when the
    table carries it: which products queried, e.g. ``unseen (test)``) and the reported metrics."""
    columns = ["encoder"] + (["products"] if "products" in results.columns else [])
    header = "| " + " | ".join(columns) + " | " + " | ".join(metric.replace("recall@", "R@").replace("map@", "mAP@") for metric in metrics) + " |"
    lines = ([caption, ""] if caption else []) + [header, "|" + "---|" * (len(columns) + len(metrics))]
    for row in results.iter_rows(named=True):
        lines.append("| " + " | ".join(str(row[c]) for c in columns) + " | " + " | ".join(f"{row[m]:.3f}" for m in metrics) + " |")
    return "\n".join(lines)


def evaluation_set_fingerprint(catalog: pl.DataFrame, query_mask: np.ndarray) -> str:
    """Names an evaluation set: the same fingerprint means the same queries against the same catalog."""
    from .fingerprint import fingerprint

    return fingerprint("evaluation_set", catalog.select("listing_id", "product_id"), list(map(bool, query_mask)))


def evaluate_parts(
    catalog: pl.DataFrame, embeddings: np.ndarray, split: HeldOutSplit, parts: tuple[str, ...] = ("validation", "test")
) -> dict[str, dict[str, float]]:
    """Metrics per part of ``split``, each part's listings querying the gallery :meth:`HeldOutSplit.gallery_mask` gives it."""
    return {part: evaluate_embeddings(catalog, embeddings, split.mask(catalog, part), split.gallery_mask(catalog, part)) for part in parts}


def score_registered_version(
    version,
    catalog: pl.DataFrame,
    features_table: pl.DataFrame,
    attributes_table: pl.DataFrame,
    attributes_generator_uri: str,
    query_mask: np.ndarray,
    gallery_mask: np.ndarray,
    store,
    text_featurizer,
    device: str = "cpu",
    log=print,
) -> dict[str, float]:
    """Metrics of a registered encoder version (an MLflow ``ModelVersion``) on ``query_mask`` against ``gallery_mask``,
    served as it is served: its weights and the generator named by its serving tags. When that
    generator is the one that wrote ``attributes_table`` (``attributes_generator_uri``), its stored
    text features are reused; otherwise the generator writes the catalog's attributes again."""
    from .encoders.dual_tower import embed_features, load_head, load_stored_head
    from .features import listing_features, served_listing_features
    from .serving import SERVING_TAG_PREFIX

    tags = version.tags or {}
    encoder_uri, generator_uri = tags.get(f"{SERVING_TAG_PREFIX}encoder_uri"), tags.get(f"{SERVING_TAG_PREFIX}generator_uri")
    ids = catalog["listing_id"].to_list()
    if encoder_uri:
        head = load_stored_head(store, encoder_uri, device=device)
    else:
        import tempfile

        from .registry import download_model_artifact

        with tempfile.TemporaryDirectory() as scratch:
            head = load_head(download_model_artifact(f"models:/{version.name}/{version.version}", "head", scratch), device=device)
    if generator_uri is None or generator_uri == attributes_generator_uri:
        if generator_uri is None:
            log(f"version {version.version} carries no serving tags: re-scored with the current generated attributes")
        features = served_listing_features(features_table, attributes_table, ids)
    else:
        from .attributes.format import parse_attributes
        from .attributes.generator import generate_attribute_texts, load_stored_generator
        from .features import with_listing_text

        log(f"version {version.version} serves with the generator at {generator_uri}: writing the catalog's attributes with it")
        generator, vocabulary = load_stored_generator(store, generator_uri, device=device)
        base = listing_features(features_table, ids)
        texts = generate_attribute_texts(generator, vocabulary, base.image, base.image_mask, base.text)
        attributes = [parse_attributes(text, set(vocabulary.keys)).attributes or {} for text in texts]
        features = with_listing_text(base, text_featurizer, catalog["title"].to_list(), attributes)
    return evaluate_embeddings(catalog, embed_features(head, features, device=device), query_mask, gallery_mask)
