"""Frozen-tower features of listings, stored as a table so that they are computed once.

The image tower is the expensive part of every stage on CPU; its features (and those of the
bare title) are computed once per listing and reused by the generator, the encoder and the
evaluation. Text features of title + generated attributes are computed once too, by the
asset that generates the attributes (column ``text_features``), and read downstream with
:func:`served_listing_features`.
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

import numpy as np
import polars as pl

from .attributes.format import Attributes, listing_text
from .encoders.dual_tower import ListingFeatures
from .encoders.listing_encoder import ListingInputs
from .encoders.towers import ImageFeaturizer, TextFeaturizer, decode_image


def compute_listing_features(
    catalog: pl.DataFrame,
    image_featurizer: ImageFeaturizer,
    text_featurizer: TextFeaturizer,
    read_bytes: Callable[[str], bytes],
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> pl.DataFrame:
    """Table ``listing_id, has_image, image_features, title_features`` for every listing of ``catalog``."""
    image_chunks, mask_chunks = [], []
    uris = catalog["image_uri"].to_list()
    for start in range(0, len(uris), batch_size):
        images = [decode_image(read_bytes(uri)) if uri else None for uri in uris[start : start + batch_size]]
        features, mask = image_featurizer.encode(images)
        image_chunks.append(features)
        mask_chunks.append(mask)
        if progress:
            progress(min(start + batch_size, len(uris)), len(uris))
    image = np.concatenate(image_chunks) if image_chunks else np.zeros((0, image_featurizer.dim), np.float32)
    mask = np.concatenate(mask_chunks) if mask_chunks else np.zeros(0, bool)
    title = text_featurizer.encode(catalog["title"].to_list())
    return pl.DataFrame(
        {
            "listing_id": catalog["listing_id"],
            "has_image": pl.Series(mask, dtype=pl.Boolean),
            "image_features": pl.Series(image.astype(np.float32)),
            "title_features": pl.Series(np.asarray(title, dtype=np.float32)),
        }
    )


def align(frame: pl.DataFrame, listing_ids: Sequence[str]) -> pl.DataFrame:
    """Rows of ``frame`` in the order of ``listing_ids``; fails naming the ids it lacks."""
    order = pl.DataFrame({"listing_id": list(listing_ids)})
    aligned = order.join(frame, on="listing_id", how="left", maintain_order="left")
    missing = set(listing_ids) - set(frame["listing_id"].to_list())
    if missing:
        raise KeyError(f"{len(missing)} listing(s) have no row, e.g. {sorted(missing)[:5]}")
    return aligned


def listing_features(
    features_table: pl.DataFrame,
    listing_ids: Sequence[str],
    text_featurizer: TextFeaturizer | None = None,
    titles: Sequence[str] | None = None,
    attributes: Sequence[Attributes | None] | None = None,
) -> ListingFeatures:
    """Features of ``listing_ids`` in that order.

    Without ``text_featurizer`` the text part is the bare title's features; with it, the text
    part is recomputed for ``listing_text(title, attributes)``.
    """
    rows = align(features_table, listing_ids)
    features = ListingFeatures(
        listing_ids=list(listing_ids),
        image=rows["image_features"].to_numpy().astype(np.float32),
        image_mask=rows["has_image"].to_numpy().astype(bool),
        text=rows["title_features"].to_numpy().astype(np.float32),
    )
    return features if text_featurizer is None else with_listing_text(features, text_featurizer, titles, attributes)


def served_listing_features(features_table: pl.DataFrame, attributes_table: pl.DataFrame, listing_ids: Sequence[str]) -> ListingFeatures:
    """Features of ``listing_ids`` as the encoder sees them when serving: image features from
    ``features_table`` and the text features of title + generated attributes stored in the
    ``text_features`` column of ``attributes_table``."""
    if "text_features" not in attributes_table.columns:
        raise KeyError("the attribute table has no text_features column: rematerialise generated_attributes")
    base = listing_features(features_table, listing_ids)
    text = align(attributes_table.select("listing_id", "text_features"), listing_ids)["text_features"].to_numpy().astype(np.float32)
    return ListingFeatures(base.listing_ids, base.image, base.image_mask, text)


def served_listing_inputs(
    catalog: pl.DataFrame, features_table: pl.DataFrame, attributes_table: pl.DataFrame, read_bytes: Callable[[str], bytes] | None = None,
) -> ListingInputs:
    """Every listing of ``catalog`` as any encoder reads it when serving: title, the generated
    attributes of ``attributes_table``, the photo (``image_uri`` read with ``read_bytes``) and
    the cached tower features of title + attributes (which only the frozen-tower head reads)."""
    ids = catalog["listing_id"].to_list()
    texts = align(attributes_table.select("listing_id", "attributes_json"), ids)["attributes_json"].to_list()
    return ListingInputs(
        ids, catalog["title"].to_list(), [json.loads(text) if text else None for text in texts], catalog["image_uri"].to_list(), read_bytes,
        served_listing_features(features_table, attributes_table, ids),
    )


def with_listing_text(
    features: ListingFeatures,
    text_featurizer: TextFeaturizer,
    titles: Sequence[str],
    attributes: Sequence[Attributes | None] | None = None,
) -> ListingFeatures:
    """``features`` with the text part recomputed for ``listing_text(title, attributes)`` (same rows)."""
    if len(titles) != len(features) or (attributes is not None and len(attributes) != len(features)):
        raise ValueError(f"{len(features)} listings but {len(titles)} titles and {len(attributes or titles)} attribute sets")
    texts = [listing_text(title, attrs) for title, attrs in zip(titles, attributes or [None] * len(titles))]
    return ListingFeatures(features.listing_ids, features.image, features.image_mask, text_featurizer.encode(texts))


def embeddings_table(listing_ids: Sequence[str], product_ids: Sequence[str], embeddings: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "listing_id": list(listing_ids),
            "product_id": list(product_ids),
            "embedding": pl.Series(np.asarray(embeddings, dtype=np.float32)),
        }
    )


def embedding_health(table: pl.DataFrame) -> pl.DataFrame:
    """Per-embedding ``norm`` and ``is_finite``, the input of the embedding quality suite."""
    matrix = table["embedding"].to_numpy()
    return pl.DataFrame(
        {
            "listing_id": table["listing_id"],
            "norm": np.linalg.norm(np.nan_to_num(matrix), axis=1),
            "is_finite": np.isfinite(matrix).all(axis=1),
        }
    )
