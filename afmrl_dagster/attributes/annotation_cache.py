"""Teacher outputs cached per listing, by content.

The key of one output is a hash of what the teacher saw and who it is: the image bytes, the
title and description, and the teacher's identity (model id and revision, prompt version).
Rematerialising unchanged listings, or backfilling a product line twice, finds every output
in the cache and generates nothing.

The cache lives in the artefact store (a folder or S3) as append-only parquet shards under
one prefix per teacher identity: a run reads the shards once and writes one new shard with
what it generated, so S3 sees a few large objects rather than one per listing.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import polars as pl

from ..storage import ObjectStore, content_hash

SHARD_SCHEMA = {"key": pl.Utf8(), "listing_id": pl.Utf8(), "raw_text": pl.Utf8()}


class CacheableTeacher(Protocol):
    """A teacher whose outputs depend only on the listing's content and ``cache_identity``."""

    cache_identity: str

    def annotate(self, listings: pl.DataFrame) -> list[str]: ...


def listing_content_key(identity: str, title: str | None, description: str | None, image: bytes | None) -> str:
    """The cache key of one listing's output for the teacher ``identity``."""
    return content_hash(identity, title or "", description or "", b"" if image is None else b"\x01" + image)


def _folder(identity: str) -> str:
    slug = re.sub(r"[^a-zA-Z0-9._-]+", "-", identity).strip("-")[:80]
    return f"{slug}-{content_hash(identity)[:12]}"


@dataclass
class CacheStats:
    cached: int = 0
    generated: int = 0


class AnnotationCache:
    """Shards ``{prefix}/{teacher}/{uuid}.parquet`` with columns ``key, listing_id, raw_text``."""

    def __init__(self, store: ObjectStore, prefix: str = "cache/annotations"):
        self.store, self.prefix = store, prefix.strip("/")

    def _shards(self, identity: str) -> str:
        return f"{self.prefix}/{_folder(identity)}/"

    def lookup(self, identity: str) -> dict[str, str]:
        """Every cached output of ``identity``: key -> raw text."""
        found: dict[str, str] = {}
        for key in sorted(self.store.list_keys(self._shards(identity))):
            if key.endswith(".parquet"):
                shard = self.store.read_parquet(key)
                found.update(zip(shard["key"].to_list(), shard["raw_text"].to_list()))
        return found

    def add(self, identity: str, keys: Sequence[str], listing_ids: Sequence[str], raw_texts: Sequence[str]) -> None:
        """Store new outputs as one shard (written whole: a failed write leaves no shard)."""
        if keys:
            frame = pl.DataFrame({"key": list(keys), "listing_id": list(listing_ids), "raw_text": list(raw_texts)}, schema=SHARD_SCHEMA)
            self.store.write_parquet(f"{self._shards(identity)}{uuid.uuid4().hex}.parquet", frame)


def annotate_with_cache(
    teacher: CacheableTeacher,
    listings: pl.DataFrame,
    cache: AnnotationCache,
    read_image: Callable[[str], bytes] | None = None,
    chunk_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[str], CacheStats]:
    """The teacher's raw text for every row of ``listings``, generating only what the cache lacks.

    Outputs are stored after every ``chunk_size`` generated listings, so an interrupted run
    keeps what it paid for and the rerun resumes from there.
    """
    identity = teacher.cache_identity
    uris = listings["image_uri"].to_list() if "image_uri" in listings.columns else [None] * listings.height
    descriptions = listings["description"].to_list() if "description" in listings.columns else [None] * listings.height
    keys = [
        listing_content_key(identity, title, description, read_image(uri) if (uri and read_image) else None)
        for title, description, uri in zip(listings["title"].to_list(), descriptions, uris)
    ]
    known = cache.lookup(identity)
    missing = [i for i, key in enumerate(keys) if key not in known]
    first_of_key: dict[str, int] = {}
    todo = [i for i in missing if first_of_key.setdefault(keys[i], i) == i]  # identical listings generate once
    listing_ids = listings["listing_id"].to_list()
    for start in range(0, len(todo), chunk_size):
        rows = todo[start : start + chunk_size]
        outputs = teacher.annotate(listings[rows])
        if len(outputs) != len(rows):
            raise ValueError(f"teacher {identity} wrote {len(outputs)} outputs for {len(rows)} listings")
        cache.add(identity, [keys[i] for i in rows], [listing_ids[i] for i in rows], outputs)
        known.update(zip((keys[i] for i in rows), outputs))
        if progress:
            progress(min(start + chunk_size, len(todo)), len(todo))
    stats = CacheStats(cached=listings.height - len(missing), generated=len(todo))
    return [known[key] for key in keys], stats
