"""The index's kind and knobs, and how ``auto`` chooses by gallery size: plain settings, free of
faiss, so that the pipeline's definitions can show their defaults without loading it."""

from __future__ import annotations

from dataclasses import dataclass

INDEX_KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")
REFINE_KINDS = ("none", "sq8", "flat")  # what re-ranks IVF-PQ's candidates: nothing, 8-bit scalar codes, the vectors
EXACT_UP_TO = 100_000  # ``auto``: exact search up to this many vectors (it stays fast enough per query)
HNSW_UP_TO = 10_000_000  # ``auto``: HNSW (full vectors and a graph in memory) up to this many, IVF-PQ (compressed) above
TRAINING_SAMPLE = 100_000  # IVF and IVF-PQ learn their lists and codebooks on at most this many vectors


@dataclass
class IndexConfig:
    """Index type and its knobs; ``use_gpu`` applies only where faiss sees a GPU.

    IVF and IVF-PQ: ``nlist`` coarse lists (0 = about 4·sqrt(N), at most N / 39 so every list
    has training points); IVF-PQ: ``pq_m`` sub-quantizers of ``pq_nbits`` bits per vector, ``nprobe``
    lists searched, and the candidates (``refine_factor`` x k) re-ranked by ``refine``."""

    kind: str = "auto"
    hnsw_m: int = 32
    nlist: int = 0  # 0: about 4·sqrt(N), at least 39 training vectors a list
    nprobe: int = 8
    use_gpu: bool = False
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128
    pq_m: int = 32
    pq_nbits: int = 8
    refine: str = "sq8"
    refine_factor: int = 10

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"kind must be one of {INDEX_KINDS}, got {self.kind!r}")
        if self.refine not in REFINE_KINDS:
            raise ValueError(f"refine must be one of {REFINE_KINDS}, got {self.refine!r}")
        for name in ("hnsw_m", "nprobe", "hnsw_ef_construction", "hnsw_ef_search", "pq_m", "pq_nbits", "refine_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.nlist < 0:
            raise ValueError(f"nlist must be >= 1, or 0 = chosen from the gallery size; got {self.nlist}")


def resolve_kind(config: IndexConfig, size: int) -> str:
    """The index kind ``config`` asks for, ``auto`` resolved by the gallery's ``size``."""
    if config.kind != "auto":
        return config.kind
    return "flat" if size <= EXACT_UP_TO else "hnsw" if size <= HNSW_UP_TO else "ivfpq"
