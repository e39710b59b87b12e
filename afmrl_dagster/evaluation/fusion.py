"""The visual reader fused into an encoder's search, decided on validation.

A store photo carries no text of its own; the words printed on the pack do, and the towers see
them only as pixels. The visual reader reads them (OCR, :mod:`afmrl_dagster.attributes.visual_reader`)
and :class:`~afmrl_dagster.retrieval.text_fusion.ReaderFusion` adds their match with each catalog
entry's text to the encoder's top candidates. Here every held-out query photo is read (the
outputs cached per listing in the artefact store, shared with the visual-reader teacher's), the
weight is chosen on the validation queries from
:data:`~afmrl_dagster.retrieval.text_fusion.FUSION_WEIGHTS` (0 when the reader does not help:
nothing is fused), and both parts are scored with it, exactly as ``afmrl search`` serves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl

from ..attributes.annotation_cache import AnnotationCache, annotate_with_cache
from ..attributes.visual_reader import VisualReaderTeacher, lexicon_from_catalog
from ..retrieval.text_fusion import ReaderFusion, catalog_entry_texts, reader_output_text
from .scoring import fusion_weight_on_validation, query_scores
from .splits import HeldOutSplit


@dataclass(frozen=True)
class FusedEvaluation:
    """The weight chosen on validation, the validation metric at every weight tried, and the
    fused metrics of each part (as :func:`~.scoring.evaluate_parts` gives them)."""

    weight: float
    validation_by_weight: dict[float, float]
    scores: dict[str, dict[str, float]]
    photos_read: int  # query photos read by OCR this time (the rest came from the cache)
    queries_with_text: int  # held-out queries of which the reader read something


def read_query_texts(catalog: pl.DataFrame, queries: pl.DataFrame, read_image: Callable[[str], bytes], cache: AnnotationCache,
                     progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, str], int]:
    """The visual reader's text of each query listing's photo (its attribute values joined; ''
    without photo), looking for the values ``catalog`` knows; and how many photos OCR read."""
    teacher = VisualReaderTeacher(read_image, lexicon_from_catalog(catalog))
    raw, stats = annotate_with_cache(teacher, queries, cache, read_image=read_image, progress=progress)
    texts = {listing: reader_output_text(text) for listing, text in zip(queries["listing_id"].to_list(), raw)}
    return texts, stats.generated


def evaluate_reader_fusion(
    catalog: pl.DataFrame,
    embeddings: np.ndarray,
    split: HeldOutSplit,
    read_image: Callable[[str], bytes],
    cache: AnnotationCache,
    metric: str = "recall@1",
    progress: Callable[[int, int], None] | None = None,
) -> FusedEvaluation:
    """``embeddings`` (one row per listing of ``catalog``) searched with the reader's text fused,
    the weight chosen on ``split``'s validation queries, both parts scored with it."""
    queries = catalog.filter(pl.Series(split.query_mask(catalog)))
    texts, read = read_query_texts(catalog, queries, read_image, cache, progress)
    reader = ReaderFusion(catalog_entry_texts(catalog))
    weight, by_weight = fusion_weight_on_validation(
        catalog, embeddings, split.mask(catalog, "validation"), split.gallery_mask(catalog, "validation"), reader, texts, metric)
    scores = {}
    for part in ("validation", "test"):
        mask = split.mask(catalog, part)
        fused = query_scores(catalog, embeddings, mask, split.gallery_mask(catalog, part), (reader, texts, weight))
        scores[part] = {**fused.metrics, "num_queries": float(len(fused.listing_ids)),
                        "queries_without_match": float(int(mask.sum()) - len(fused.listing_ids))}
    return FusedEvaluation(weight, by_weight, scores, read, sum(bool(text) for text in texts.values()))
