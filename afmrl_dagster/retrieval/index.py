"""Gallery nearest-neighbour index (faiss, inner product on L2-normalised embeddings).

Row order is listing order: result index ``i`` is the i-th gallery embedding, so no id map
is stored. ``flat`` is exact; ``hnsw`` and ``ivf`` are approximate and their quality is
checked against exact search with :func:`recall_against_exact`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

INDEX_KINDS = ("flat", "hnsw", "ivf")


@dataclass
class IndexConfig:
    """Index type and its knobs; ``use_gpu`` applies only where faiss sees a GPU."""

    kind: str = "flat"
    hnsw_m: int = 32
    nlist: int = 64
    nprobe: int = 8
    use_gpu: bool = False
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"kind must be one of {INDEX_KINDS}, got {self.kind!r}")
        for name in ("hnsw_m", "nlist", "nprobe", "hnsw_ef_construction", "hnsw_ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def _as_matrix(embeddings: np.ndarray) -> np.ndarray:
    matrix = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    if matrix.ndim != 2:
        raise ValueError(f"embeddings must be 2-D, got shape {matrix.shape}")
    return matrix


def build_index(embeddings: np.ndarray, config: IndexConfig | None = None) -> faiss.Index:
    """An inner-product index over ``embeddings`` [N, D] (rows in order)."""
    config = config or IndexConfig()
    matrix = _as_matrix(embeddings)
    dim = matrix.shape[1]
    if config.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif config.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.hnsw_ef_construction
        index.hnsw.efSearch = config.hnsw_ef_search
    else:
        # faiss needs at least one training point per list; small galleries get fewer lists.
        nlist = max(1, min(config.nlist, len(matrix)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(matrix)
        index.nprobe = min(config.nprobe, nlist)
    # HNSW has no GPU implementation; flat and IVF do.
    if config.use_gpu and gpu_available() and config.kind != "hnsw":
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(matrix)
    return index


def _is_gpu_index(index: faiss.Index) -> bool:
    return hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex)


def save_index(index: faiss.Index, path: str | os.PathLike) -> Path:
    """Write ``index`` to ``path`` atomically (GPU indexes are copied to CPU first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu_index = faiss.index_gpu_to_cpu(index) if _is_gpu_index(index) else index
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        faiss.write_index(cpu_index, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_index(path: str | os.PathLike, use_gpu: bool = False) -> faiss.Index:
    """Read an index written by :func:`save_index`, onto the GPU if asked and present."""
    index = faiss.read_index(str(path))
    if use_gpu and gpu_available() and not isinstance(index, faiss.IndexHNSW):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, row indices) per query; ``k`` is capped at the index size."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, index.ntotal)
    if k == 0:
        empty = np.zeros((len(queries), 0))
        return empty.astype(np.float32), empty.astype(np.int64)
    return index.search(_as_matrix(queries), k)


def recall_against_exact(index: faiss.Index, embeddings: np.ndarray, sample_size: int = 200, k: int = 10, seed: int = 0) -> float:
    """Recall@k of ``index`` against exact search, on a random sample of ``embeddings`` used as queries."""
    matrix = _as_matrix(embeddings)
    if len(matrix) == 0:
        raise ValueError("no embeddings to sample queries from")
    rows = np.random.default_rng(seed).choice(len(matrix), size=min(sample_size, len(matrix)), replace=False)
    queries = matrix[rows]
    k = min(k, len(matrix))
    exact = faiss.IndexFlatIP(matrix.shape[1])
    exact.add(matrix)
    _, truth = exact.search(queries, k)
    _, found = search(index, queries, k)
    overlap = sum(len(set(t.tolist()) & set(f.tolist()) - {-1}) for t, f in zip(truth, found))
    return overlap / (len(queries) * k)


# ---- indexes kept in the artefact store ----------------------------------------------------------

INDEX_FILE = "index.faiss"
LISTINGS_FILE = "listings.parquet"  # row i of the index is row i of this table (listing_id, product_id, title, image_uri)


def publish_index(store, prefix: str, index: faiss.Index, listings, manifest: dict) -> dict:
    """Keep ``index`` with its listing table and ``manifest`` under ``prefix`` of ``store``
    (complete-or-absent; an already complete folder is left as it is). Returns the manifest
    with the folder's ``uri``; every index the pipeline serves is written here."""
    if index.ntotal != listings.height:
        raise ValueError(f"the index holds {index.ntotal} vectors but its listing table {listings.height} rows")
    manifest = {**manifest, "uri": store.uri(prefix), "rows": int(index.ntotal)}
    if not store.is_complete_directory(prefix):
        import json

        with tempfile.TemporaryDirectory(prefix="afmrl-index-") as scratch:
            folder = Path(scratch) / "index"
            folder.mkdir()
            save_index(index, folder / INDEX_FILE)
            listings.write_parquet(folder / LISTINGS_FILE)
            (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
            store.upload_directory(folder, prefix)
    return manifest


def open_published_index(store, uri: str, use_gpu: bool = False):
    """The index and its listing table published at ``uri`` (checksums verified on download)."""
    import polars as pl

    with tempfile.TemporaryDirectory(prefix="afmrl-index-") as scratch:
        folder = store.download_directory(store.key_of(uri), Path(scratch) / "index")
        return load_index(folder / INDEX_FILE, use_gpu=use_gpu), pl.read_parquet(folder / LISTINGS_FILE)
