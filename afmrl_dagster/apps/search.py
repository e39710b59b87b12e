"""The inference path: a query (photo and/or text) -> generated attributes -> encoder ->
index -> the top-k listings, with scores and the attributes the generator wrote.

What serves is what the serving record names (``afmrl_dagster.serving``): the champion
encoder's weights, the index built with it and the generator that wrote that index's
attributes, so a query is embedded exactly as the catalog was. Every artefact is opened by the
URI the record holds; nothing else about the store's layout is read.

When the record carries a reader fusion weight (chosen on validation by the pipeline's
evaluation), a query photo is also read by the visual reader (OCR) and the words it finds re-rank
the encoder's top candidates against each listing's title, description and seller attributes
(:class:`~afmrl_dagster.retrieval.text_fusion.ReaderFusion`), as the evaluation scored it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import polars as pl

from ..attributes.format import parse_attributes
from ..attributes.visual_reader import VisualReaderTeacher, lexicon_from_catalog
from ..encoders.dual_tower import ListingFeatures
from ..encoders.listing_encoder import FrozenTowerEncoder, ListingEncoder, ListingInputs, load_stored_encoder
from ..encoders.towers import ImageFeaturizer, TextFeaturizer, decode_image
from ..retrieval.index import open_published_index, search
from ..retrieval.text_fusion import FUSION_CANDIDATES, ReaderFusion, catalog_entry_texts, reader_output_text
from ..serving import ServingError, ServingRecord, read_serving_record
from ..storage import ObjectStore
from ..settings import DEFAULT_IMAGE_TOWER, DEFAULT_TEXT_TOWER
from ..training.generator_backends import CompactWriter, load_stored_writer


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
    seconds: dict = field(default_factory=dict)  # features, generate, embed, search (and read, with reader fusion)
    reader_text: str | None = None  # what the visual reader read on the query photo, when its fusion serves


class SearchEngine:
    """Holds the encoder (any backend), the generator (a writer of any kind: compact or hf-vlm)
    and the index; :meth:`search` answers one query."""

    def __init__(self, encoder: ListingEncoder, writer, index, listings: pl.DataFrame, device: str = "cpu"):
        if index.ntotal != listings.height:
            raise SearchError(f"the index holds {index.ntotal} vectors but its listing table {listings.height} rows")
        self.encoder, self.writer, self.index, self.listings = encoder.eval(), writer, index, listings
        self.device = device
        self.record: ServingRecord | None = None  # what served this engine, when built from a serving record
        self.fusion: ReaderFusion | None = None  # the visual reader's re-ranking of a query photo's candidates (use_reader_fusion)
        self.reader: VisualReaderTeacher | None = None
        self.image_featurizer = self.text_featurizer = None
        if isinstance(writer, CompactWriter):
            # The compact generator reads the frozen towers' features: those it was trained on.
            head = getattr(encoder, "head", None)
            towers = writer.towers or ({"image_tower": head.config.image_tower, "text_tower": head.config.text_tower} if head is not None
                                       else {"image_tower": DEFAULT_IMAGE_TOWER, "text_tower": DEFAULT_TEXT_TOWER})
            self.image_featurizer = ImageFeaturizer(towers["image_tower"], device=device)
            self.text_featurizer = TextFeaturizer(towers["text_tower"], device=device)
            generator = writer.model
            if generator.image_dim != self.image_featurizer.dim or generator.text_dim != self.text_featurizer.dim:
                raise SearchError(f"the generator reads features of size {generator.image_dim}/{generator.text_dim}, the "
                                  f"towers {towers} give {self.image_featurizer.dim}/{self.text_featurizer.dim}: they were trained on other towers")
            if isinstance(encoder, FrozenTowerEncoder) and encoder.head.config.text_tower == towers["text_tower"]:
                encoder.use_text_featurizer(self.text_featurizer)

    @classmethod
    def from_store(cls, store: ObjectStore, device: str = "cpu") -> SearchEngine:
        """The engine over what the serving record of ``store`` names."""
        try:
            record = read_serving_record(store)
        except ServingError as error:
            raise SearchError(str(error)) from error
        return cls.from_record(store, record, device)

    @classmethod
    def from_record(cls, store: ObjectStore, record: ServingRecord, device: str = "cpu") -> SearchEngine:
        encoder = load_stored_encoder(store, record.encoder_uri, device=device)
        index, listings = open_published_index(store, record.index_uri)
        if index.ntotal != record.index_rows:
            raise SearchError(f"the serving record names an index of {record.index_rows} listings but {record.index_uri} holds {index.ntotal}")
        writer = load_stored_writer(store, record.generator_uri, device=device)
        engine = cls(encoder, writer, index, listings, device)
        engine.record = record
        if record.reader_fusion_weight > 0:
            engine.use_reader_fusion(record.reader_fusion_weight)
        return engine

    def use_reader_fusion(self, weight: float, candidates: int = FUSION_CANDIDATES) -> None:
        """Fuse the visual reader's text of a query photo into its search with ``weight`` (over
        the top ``candidates``); the reader looks for the values the indexed listings know."""
        self.fusion = ReaderFusion(catalog_entry_texts(self.listings), weight, candidates)
        self.reader = VisualReaderTeacher(read_image=_no_uris, lexicon=lexicon_from_catalog(self.listings))

    def search(self, image: bytes | None = None, text: str | None = None, k: int = 10) -> SearchResult:
        if image is None and not (text or "").strip():
            raise SearchError("give a photo, a text, or both")
        if k < 1:
            raise SearchError(f"k must be >= 1, got {k}")
        seconds = {}
        started = time.perf_counter()
        decoded = [decode_image(image)] if image is not None else [None]
        title = (text or "").strip()
        features = None
        if self.image_featurizer is not None:
            image_features, image_mask = self.image_featurizer.encode(decoded)
            features = ListingFeatures(["query"], image_features, image_mask, self.text_featurizer.encode([title]))
        seconds["features"] = time.perf_counter() - started
        started = time.perf_counter()
        query = ListingInputs(["query"], [title], features=features, images=decoded, descriptions=[None])
        raw = self.writer.write(query)[0]
        parsed = parse_attributes(raw, self.writer.parse_keys)
        attributes = parsed.attributes or {}
        seconds["generate"] = time.perf_counter() - started
        started = time.perf_counter()
        # A head over the same towers reuses the query's image features; every encoder reads title + attributes.
        reuse = features if isinstance(self.encoder, FrozenTowerEncoder) and self._same_image_tower() else None
        embedding = self.encoder.embed(query.with_attributes([0], [attributes]) if reuse is not None else
                                       ListingInputs(["query"], [title], [attributes], images=decoded))
        seconds["embed"] = time.perf_counter() - started
        read = None
        if self.fusion is not None and image is not None:
            started = time.perf_counter()
            read = reader_output_text(self.reader.write(image))  # as the evaluation read its query photos
            seconds["read"] = time.perf_counter() - started
        started = time.perf_counter()
        depth = min(max(k, self.fusion.candidates) if read is not None else k, self.index.ntotal)
        scores, rows = search(self.index, embedding, depth)
        scores, rows = scores[0][rows[0] >= 0], rows[0][rows[0] >= 0]
        if read is not None:
            scores, rows = self.fusion.rerank(read, scores, rows)
        seconds["search"] = time.perf_counter() - started
        hits = []
        for rank, (score, row) in enumerate(zip(scores[:k].tolist(), rows[:k].tolist()), start=1):
            listing = self.listings.row(int(row), named=True)
            hits.append(SearchHit(rank, listing["listing_id"], listing["product_id"], listing["title"] or "", float(score)))
        return SearchResult(raw, attributes, hits, seconds, read)

    def _same_image_tower(self) -> bool:
        return self.image_featurizer is not None and self.image_featurizer.name == self.encoder.head.config.image_tower


def _no_uris(uri: str) -> bytes:
    raise ValueError(f"the search reads the query photo's bytes, not {uri}")


def result_table(result: SearchResult) -> str:
    read = [f"read on the photo (fused at search): {result.reader_text or '(nothing)'}"] if result.reader_text is not None else []
    lines = [f"generated attributes: {result.attributes_text or '(none)'}", *read, "",
             "| rank | score | listing | product | title |", "|---|---|---|---|---|"]
    lines += [f"| {hit.rank} | {hit.score:.3f} | {hit.listing_id} | {hit.product_id} | {hit.title} |" for hit in result.hits]
    timing = ", ".join(f"{name} {value * 1e3:.1f} ms" for name, value in result.seconds.items())
    return "\n".join(lines + ["", f"time: {timing}"])


def result_json(result: SearchResult) -> str:
    return json.dumps({
        "attributes_text": result.attributes_text, "attributes": result.attributes,
        "hits": [hit.__dict__ for hit in result.hits], "seconds": result.seconds, "reader_text": result.reader_text,
    }, indent=2)
