"""Ingestion steps that need I/O: storing rendered images and checking that images decode."""

from __future__ import annotations

import io
from typing import Callable

import polars as pl
from PIL import Image

from ..settings import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from ..storage import UriRoots
from .schema import CatalogBatch


def store_batch_images(batch: CatalogBatch, put_bytes: Callable[[str, bytes], str], line: str) -> pl.DataFrame:
    """Write a batch's in-memory images to ``images/<line>/<listing_id>.jpg`` and point ``image_uri`` at them."""
    if not batch.images:
        return batch.listings
    uris = {
        listing_id: put_bytes(f"images/{line}/{listing_id}.jpg", data) for listing_id, data in batch.images.items()
    }
    return batch.listings.with_columns(
        pl.col("listing_id").replace_strict(uris, default=pl.col("image_uri"), return_dtype=pl.Utf8).alias("image_uri")
    )


def image_problem(data: bytes) -> str | None:
    """None when ``data`` is a decodable image, else the reason."""
    if len(data) > MAX_IMAGE_BYTES:
        return f"image is {len(data)} bytes, more than {MAX_IMAGE_BYTES}"
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.size[0] * image.size[1] > MAX_IMAGE_PIXELS:  # from the header, before decoding
                return f"image is {image.size[0]}x{image.size[1]} pixels, more than {MAX_IMAGE_PIXELS}"
            image.load()
            if min(image.size) < 8:
                return f"image too small ({image.size[0]}x{image.size[1]})"
    except Exception as error:  # Pillow raises many types for corrupt data
        return f"image cannot be decoded: {type(error).__name__}: {error}"
    return None


def find_image_problems(frame: pl.DataFrame, read_bytes: Callable[[str], bytes], roots: UriRoots) -> list[dict]:
    """One issue record (row, listing_id, field, problem) per listing whose image is outside
    ``roots``, missing or corrupt.

    Listings without an image reference are fine (text-only offers); a reference outside the
    catalog's roots (never read), or one that cannot be read or decoded, is not.
    """
    issues = []
    for row, (listing_id, uri) in enumerate(frame.select("listing_id", "image_uri").iter_rows()):
        if not uri:
            continue
        try:
            problem = roots.problem(uri) or image_problem(read_bytes(uri))
        except Exception as error:
            problem = f"image cannot be read from {uri}: {type(error).__name__}: {error}"
        if problem:
            issues.append({"row": row, "listing_id": listing_id, "field": "image_uri", "problem": problem})
    return issues
