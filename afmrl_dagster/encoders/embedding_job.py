"""Embedding a catalog as a resumable batch job: chunk by chunk, each chunk kept in the store.

A line of millions of listings takes hours to embed; a crash, a pre-empted GPU node or a
deployment in the middle must not start it over. :func:`embed_resumably` embeds ``chunk_size``
listings at a time and stores each chunk (its listing ids, its embeddings and their SHA-256)
under ``prefix`` before the next one starts. A rerun reads every chunk that is already stored,
holds the same listing ids and verifies, and embeds the others only; a chunk that does not
verify (cut short, corrupted, of other listings) is embedded again, never trusted.

``prefix`` names the job: the caller derives it from everything the embeddings depend on (the
encoder version and the listings' inputs), so a stored chunk is never reused for other inputs.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .listing_encoder import ListingEncoder, ListingInputs

CHUNK_FILE = "chunk-{:06d}.npz"


@dataclass
class EmbeddingJobReport:
    """What a run did: chunks embedded here and read back from an earlier run, and the throughput
    of the embedding itself (``listings_per_second`` over the listings embedded by this run)."""

    listings: int
    chunks: int
    chunks_reused: int
    listings_embedded: int
    seconds_embedding: float

    @property
    def listings_per_second(self) -> float:
        return self.listings_embedded / self.seconds_embedding if self.seconds_embedding > 0 else 0.0

    def as_metadata(self) -> dict:
        return {"listings": self.listings, "chunks": self.chunks, "chunks_reused": self.chunks_reused,
                "listings_embedded": self.listings_embedded, "listings_per_second": round(self.listings_per_second, 2)}


def _checksum(ids: list[str], embeddings: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update("\n".join(ids).encode())
    digest.update(np.ascontiguousarray(embeddings, dtype=np.float32).tobytes())
    return digest.hexdigest()


def chunk_bytes(ids: list[str], embeddings: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, ids=np.asarray(ids, dtype=str), embeddings=np.asarray(embeddings, dtype=np.float32),
             sha256=np.asarray(_checksum(ids, embeddings)))
    return buffer.getvalue()


def read_chunk(data: bytes, ids: list[str]) -> np.ndarray | None:
    """The embeddings of a stored chunk when it holds exactly ``ids`` and its checksum verifies; else None."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            stored_ids, embeddings, checksum = stored["ids"].tolist(), stored["embeddings"], str(stored["sha256"])
    except Exception:  # a chunk cut short or corrupted is not an error: it is embedded again
        return None
    if stored_ids != ids or embeddings.ndim != 2 or len(embeddings) != len(ids) or _checksum(ids, embeddings) != checksum:
        return None
    return embeddings


def embed_resumably(
    encoder: ListingEncoder,
    inputs: ListingInputs,
    store,
    prefix: str,
    chunk_size: int = 4096,
    progress: Callable[[int, int, EmbeddingJobReport], None] | None = None,
) -> tuple[np.ndarray, EmbeddingJobReport]:
    """Embeddings of every listing of ``inputs`` (in order), chunk by chunk, each chunk stored in
    ``store`` under ``prefix`` before the next; chunks an earlier run stored are read back.
    ``progress(done, total, report)`` after every chunk."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    total = len(inputs)
    starts = list(range(0, total, chunk_size))
    report = EmbeddingJobReport(listings=total, chunks=len(starts), chunks_reused=0, listings_embedded=0, seconds_embedding=0.0)
    stored_keys = set(store.list_keys(prefix.rstrip("/") + "/"))
    parts = []
    for number, start in enumerate(starts):
        rows = np.arange(start, min(start + chunk_size, total))
        ids = [inputs.listing_ids[i] for i in rows]
        key = f"{prefix.rstrip('/')}/{CHUNK_FILE.format(number)}"
        embeddings = read_chunk(store.get_bytes(key), ids) if key in stored_keys else None
        if embeddings is not None:
            report.chunks_reused += 1
        else:
            started = time.perf_counter()
            embeddings = encoder.embed(inputs.subset(rows))
            report.seconds_embedding += time.perf_counter() - started
            report.listings_embedded += len(rows)
            store.put_bytes(key, chunk_bytes(ids, embeddings))
        parts.append(embeddings)
        if progress is not None:
            progress(int(rows[-1]) + 1, total, report)
    if not parts:
        return np.zeros((0, 0), dtype=np.float32), report
    return np.concatenate(parts).astype(np.float32, copy=False), report
