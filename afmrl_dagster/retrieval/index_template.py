"""An index trained once and filled many times: the coarse lists and PQ codebooks of IVF-PQ
(or IVF) learnt on a sample, then reused by every refresh, so a new product line only adds its
vectors. :meth:`IndexTemplate.drift` says when the catalog has moved far enough from the
sample that the template should be trained again.

Drift is the mean squared distance of vectors to their nearest coarse centroid, against the
same figure on the training sample: new products that fall between the learnt lists raise it
(and crowd the lists they fall into), which is when search quality drops.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import faiss
import numpy as np

from .index import IndexConfig, as_matrix, empty_index, resolve_kind

TRAINED_KINDS = ("ivf", "ivfpq")  # the kinds with something to learn; flat and HNSW templates are empty indexes
DRIFT_TOLERANCE = 1.25  # retrain when new vectors lie this much farther (squared) from their lists than the sample did
HEADER_BYTES = 8  # the serialised template: header length, JSON header, then faiss's bytes


def _coarse_quantizer(index: faiss.Index):
    return faiss.extract_index_ivf(index).quantizer


@dataclass
class IndexTemplate:
    """A trained, empty index (``index``) of ``kind`` and the mean squared distance of its training
    sample to the nearest coarse centroid (``residual``; 0 for a kind without lists)."""

    index: faiss.Index
    kind: str
    trained_on: int
    residual: float

    @classmethod
    def train(cls, sample: np.ndarray, config: IndexConfig | None = None, size: int | None = None) -> IndexTemplate:
        """Train on ``sample`` for a gallery of ``size`` vectors (``auto`` resolves by it; default the sample's size)."""
        config = config or IndexConfig()
        matrix = as_matrix(sample)
        if len(matrix) == 0:
            raise ValueError("no vectors to train an index template on")
        size = size if size is not None else len(matrix)
        kind = resolve_kind(config, size)
        index = empty_index(matrix.shape[1], kind, config, matrix if kind in TRAINED_KINDS else None, size)
        template = cls(index, kind, len(matrix), 0.0)
        if kind in TRAINED_KINDS:
            template.residual = template.mean_residual(matrix)
        return template

    def mean_residual(self, vectors: np.ndarray) -> float:
        """Mean squared distance of ``vectors`` to their nearest coarse centroid."""
        if self.kind not in TRAINED_KINDS:
            return 0.0
        matrix = as_matrix(vectors)
        quantizer = _coarse_quantizer(self.index)
        centroids = quantizer.reconstruct_n(0, quantizer.ntotal)
        _, nearest = quantizer.search(matrix, 1)
        return float(np.mean(np.sum((matrix - centroids[nearest[:, 0]]) ** 2, axis=1)))

    def drift(self, vectors: np.ndarray) -> float:
        """``vectors``' mean residual over the training sample's (1.0 = as well covered; 1.0 for untrained kinds)."""
        if self.kind not in TRAINED_KINDS or self.residual <= 0:
            return 1.0
        return self.mean_residual(vectors) / self.residual

    def needs_retraining(self, vectors: np.ndarray, tolerance: float = DRIFT_TOLERANCE) -> bool:
        return self.drift(vectors) > tolerance

    def filled(self, vectors: np.ndarray) -> faiss.Index:
        """A copy of the template holding ``vectors`` (rows in order); the template stays empty."""
        index = faiss.clone_index(self.index)
        index.add(as_matrix(vectors))
        return index

    def to_bytes(self) -> bytes:
        header = json.dumps({"kind": self.kind, "trained_on": self.trained_on, "residual": self.residual}).encode()
        return len(header).to_bytes(HEADER_BYTES, "little") + header + faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> IndexTemplate:
        length = int.from_bytes(data[:HEADER_BYTES], "little")
        try:
            header = json.loads(data[HEADER_BYTES:HEADER_BYTES + length])
            index = faiss.deserialize_index(np.frombuffer(data[HEADER_BYTES + length:], dtype=np.uint8))
        except (ValueError, RuntimeError) as error:
            raise ValueError(f"not an index template: {error}") from error
        if index.ntotal:
            raise ValueError(f"an index template must be empty; this one holds {index.ntotal} vectors")
        return cls(index, header["kind"], int(header["trained_on"]), float(header["residual"]))
