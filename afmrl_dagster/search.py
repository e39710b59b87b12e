"""The inference path: a query (photo and/or text) -> generated attributes -> encoder ->
index -> the top-k listings, with scores and the attributes the generator wrote.

By default the encoder is the registered champion (``models:/afmrl-encoder@champion``), the
index the stored one built with that encoder version (the pipeline's, or the CIT encoder's),
and the generator the one that wrote that index's attributes, so a query is embedded
exactly as the catalog was. Everything is read from the artefact store and MLflow the
pipeline wrote to.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from .attributes.format import listing_text, parse_attributes
from .attributes.generator import AttributeGenerator, generate_attribute_texts, load_generator, load_stored_generator
from .attributes.vocabulary import AttributeVocabulary
from .encoders.dual_tower import DualTowerHead, ListingFeatures, embed_features
from .encoders.towers import ImageFeaturizer, TextFeaturizer, decode_image
from .retrieval.index import load_index, search
from .storage import ObjectStore

DEFAULT_ENCODER = "models:/afmrl-encoder@champion"
INDEX_MANIFEST = "manifests/retrieval_index/__all__.json"
GENERATOR_MANIFEST = "manifests/attribute_generator/__all__.json"
CIT_MANIFEST = "manifests/cit_encoder/__all__.json"
CATALOG_TABLES = "tables/raw_catalog/"


class SearchError(ValueError):
    """A search cannot run as asked; the message says what is missing."""


@dataclass
class SearchHit:
    rank: int
    listing_id: str
    product_id: str
    title: str
    score: float


@dataclass
class SearchResult:
    attributes_text: str  # what the generator wrote for the query
    attributes: dict  # parsed ({} when it does not parse)
    hits: list[SearchHit]
    seconds: dict = field(default_factory=dict)  # features, generate, embed, search


class SearchEngine:
    """Holds the towers, generator, encoder head and index; :meth:`search` answers one query."""

    def __init__(self, head: DualTowerHead, generator: AttributeGenerator, vocabulary: AttributeVocabulary,
                 index, listings: pl.DataFrame, device: str = "cpu"):
        if index.ntotal != listings.height:
            raise SearchError(f"the index holds {index.ntotal} vectors but its listing table {listings.height} rows")
        self.head, self.generator, self.vocabulary, self.index, self.listings = head.eval(), generator.eval(), vocabulary, index, listings
        self.device = device
        self.image_featurizer = ImageFeaturizer(head.config.image_tower, device=device)
        self.text_featurizer = TextFeaturizer(head.config.text_tower, device=device)
        if generator.image_dim != self.image_featurizer.dim or generator.text_dim != self.text_featurizer.dim:
            raise SearchError(f"the generator reads features of size {generator.image_dim}/{generator.text_dim}, the encoder's "
                              f"towers give {self.image_featurizer.dim}/{self.text_featurizer.dim}: they were trained on other towers")

    @classmethod
    def from_store(cls, store: ObjectStore, encoder: str = DEFAULT_ENCODER, generator: str | None = None, device: str = "cpu") -> SearchEngine:
        """The engine over what the pipeline stored: index and catalog from ``store``, encoder
        from the registry (or a head folder), generator from the pipeline's manifest, a
        registered model URI, or a folder."""
        from .evaluate_command import EvaluationError, resolve_encoder

        for key in (INDEX_MANIFEST, GENERATOR_MANIFEST):
            if not store.exists(key):
                raise SearchError(f"{store.uri(key)} is missing: materialise the pipeline first (make demo)")
        try:
            resolved = resolve_encoder(encoder)
        except EvaluationError as error:
            raise SearchError(str(error)) from error
        if resolved.head is None:
            raise SearchError("search needs a trained encoder, not the zero-shot towers")
        served = _served_indexes(store)
        version = _registered_version(encoder)
        chosen = served[0] if version is None else next((entry for entry in served if entry["encoder_version"] == version), None)
        if chosen is None:
            built = ", ".join(entry["encoder_version"] for entry in served)
            raise SearchError(f"no stored index was built with {encoder} (version {version}); indexes exist for encoder "
                              f"version(s) {built}: rematerialise catalog_embeddings and retrieval_index")
        with tempfile.TemporaryDirectory(prefix="afmrl-search-") as scratch:
            folder = store.download_directory(f"indexes/{chosen['fingerprint']}", Path(scratch) / "index")
            index = load_index(folder / "index.faiss")
            order = pl.read_parquet(folder / "listings.parquet")
            model, vocabulary = _load_generator(store, generator, chosen["generator_prefix"], Path(scratch))
        return cls(resolved.head, model, vocabulary, index, _with_titles(store, order), device)

    def search(self, image: bytes | None = None, text: str | None = None, k: int = 10) -> SearchResult:
        if image is None and not (text or "").strip():
            raise SearchError("give a photo, a text, or both")
        if k < 1:
            raise SearchError(f"k must be >= 1, got {k}")
        seconds = {}
        started = time.perf_counter()
        decoded = [decode_image(image)] if image is not None else [None]
        image_features, image_mask = self.image_featurizer.encode(decoded)
        title = (text or "").strip()
        title_features = self.text_featurizer.encode([title])
        seconds["features"] = time.perf_counter() - started
        started = time.perf_counter()
        raw = generate_attribute_texts(self.generator, self.vocabulary, image_features, image_mask, title_features)[0]
        parsed = parse_attributes(raw, self.vocabulary.keys)
        attributes = parsed.attributes or {}
        seconds["generate"] = time.perf_counter() - started
        started = time.perf_counter()
        query_text = self.text_featurizer.encode([listing_text(title, attributes)])
        embedding = embed_features(self.head, ListingFeatures(["query"], image_features, image_mask, query_text), device=self.device)
        seconds["embed"] = time.perf_counter() - started
        started = time.perf_counter()
        scores, rows = search(self.index, embedding, min(k, self.index.ntotal))
        seconds["search"] = time.perf_counter() - started
        hits = []
        for rank, (score, row) in enumerate(zip(scores[0].tolist(), rows[0].tolist()), start=1):
            if row < 0:
                continue
            listing = self.listings.row(row, named=True)
            hits.append(SearchHit(rank, listing["listing_id"], listing["product_id"], listing["title"] or "", float(score)))
        return SearchResult(raw, attributes, hits, seconds)


def _registered_version(model_uri: str) -> str | None:
    """The version a ``models:/name@alias`` or ``models:/name/version`` URI points at; None otherwise."""
    if not model_uri.startswith("models:/"):
        return None
    import mlflow

    name_part = model_uri.removeprefix("models:/")
    client = mlflow.MlflowClient()
    if "@" in name_part:
        name, alias = name_part.split("@", 1)
        return str(client.get_model_version_by_alias(name, alias).version)
    name, _, version = name_part.partition("/")
    return version or None


def _served_indexes(store: ObjectStore) -> list[dict]:
    """Stored indexes with the encoder version that built them and the folder of the generator
    that wrote their attributes: the pipeline's index first, then the CIT encoder's."""
    index = json.loads(store.get_bytes(INDEX_MANIFEST))
    generator = json.loads(store.get_bytes(GENERATOR_MANIFEST))
    served = [{"fingerprint": index["fingerprint"], "encoder_version": str(index["encoder_version"]),
               "generator_prefix": f"models/attribute_generator/{generator['fingerprint']}"}]
    if store.exists(CIT_MANIFEST):
        cit = json.loads(store.get_bytes(CIT_MANIFEST)).get("index")
        if cit:
            served.append({**cit, "encoder_version": str(cit["encoder_version"])})
    return served


def _load_generator(store: ObjectStore, generator: str | None, default_prefix: str, scratch: Path) -> tuple[AttributeGenerator, AttributeVocabulary]:
    if generator is None:
        return load_stored_generator(store, default_prefix)
    if Path(generator).expanduser().is_dir():
        return load_generator(Path(generator).expanduser())
    from .registry import download_model_artifact

    try:
        return load_generator(download_model_artifact(generator, "generator", scratch / "registry"))
    except Exception as error:  # MLflow raises many types for an unknown name, alias or version
        raise SearchError(f"cannot fetch generator {generator!r}: {error}") from error


def _with_titles(store: ObjectStore, order: pl.DataFrame) -> pl.DataFrame:
    """The index's listing order with each listing's title from the stored catalog tables."""
    keys = [key for key in store.list_keys(CATALOG_TABLES) if key.endswith(".parquet")]
    if not keys:
        return order.with_columns(pl.lit(None, dtype=pl.Utf8).alias("title"))
    catalog = pl.concat([store.read_parquet(key).select("listing_id", "title") for key in keys]).unique("listing_id")
    return order.join(catalog, on="listing_id", how="left", maintain_order="left")


def result_table(result: SearchResult) -> str:
    lines = [f"generated attributes: {result.attributes_text or '(none)'}", "",
             "| rank | score | listing | product | title |", "|---|---|---|---|---|"]
    lines += [f"| {hit.rank} | {hit.score:.3f} | {hit.listing_id} | {hit.product_id} | {hit.title} |" for hit in result.hits]
    timing = ", ".join(f"{name} {value * 1e3:.1f} ms" for name, value in result.seconds.items())
    return "\n".join(lines + ["", f"time: {timing}"])


def result_json(result: SearchResult) -> str:
    return json.dumps({
        "attributes_text": result.attributes_text, "attributes": result.attributes,
        "hits": [hit.__dict__ for hit in result.hits], "seconds": result.seconds,
    }, indent=2)
