"""Gallery nearest-neighbour index (faiss, inner product on L2-normalised embeddings).

Row order is listing order: result index ``i`` is the i-th gallery embedding, so no id map
is stored. ``flat`` is exact; ``hnsw``, ``ivf`` and ``ivfpq`` are approximate and their quality
is checked against exact search with :func:`recall_against_exact`. ``auto`` chooses by gallery
size (:func:`resolve_kind`): exact up to :data:`EXACT_UP_TO` vectors, HNSW up to
:data:`HNSW_UP_TO`, IVF-PQ above (``benchmarks/ann.py`` measures all three on 1 M vectors).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

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


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def _as_matrix(embeddings: np.ndarray) -> np.ndarray:
    matrix = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    if matrix.ndim != 2:
        raise ValueError(f"embeddings must be 2-D, got shape {matrix.shape}")
    return matrix


def ivfpq_lists(config: IndexConfig, size: int, sample: int) -> int:
    """IVF-PQ's coarse lists (IVF's when ``nlist`` is 0) for a gallery of ``size`` vectors trained on ``sample`` of them:
    ``nlist``, or about 4·sqrt(size), and never fewer than 39 training points a list."""
    wanted = config.nlist or int(4 * np.sqrt(max(size, 1)))
    return max(1, min(wanted, sample // 39 or 1))


def empty_index(dim: int, kind: str, config: IndexConfig, training: np.ndarray | None = None, size: int | None = None) -> faiss.Index:
    """An index of ``kind`` ready to take vectors: trained on ``training`` where the kind needs it
    (IVF's coarse lists, IVF-PQ's lists, codebooks and refinement codes) for a gallery of
    ``size`` vectors (default: as many as ``training``)."""
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.hnsw_ef_construction
        index.hnsw.efSearch = config.hnsw_ef_search
        return index
    if training is None or len(training) == 0:
        raise ValueError(f"a {kind!r} index needs training vectors")
    if kind == "ivf":
        # faiss needs at least one training point per list; small galleries get fewer lists.
        nlist = max(1, min(config.nlist or ivfpq_lists(config, size or len(training), len(training)), len(training)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(training)
        index.nprobe = min(config.nprobe, nlist)
        return index
    if dim % config.pq_m:
        raise ValueError(f"pq_m={config.pq_m} must divide the embedding dimension {dim}")
    nlist = ivfpq_lists(config, size or len(training), len(training))
    base = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, config.pq_m, config.pq_nbits, faiss.METRIC_INNER_PRODUCT)
    base.nprobe = min(config.nprobe, nlist)
    if config.refine == "none":
        index = base
    else:
        refine = faiss.IndexFlatIP(dim) if config.refine == "flat" else faiss.IndexScalarQuantizer(
            dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexRefine(base, refine)
        index.k_factor = config.refine_factor
    index.train(training)
    return index


def build_index(embeddings: np.ndarray, config: IndexConfig | None = None) -> faiss.Index:
    """An inner-product index over ``embeddings`` [N, D] (rows in order)."""
    config = config or IndexConfig()
    matrix = _as_matrix(embeddings)
    kind = resolve_kind(config, len(matrix))
    training = None
    if kind in ("ivf", "ivfpq"):
        training = matrix if len(matrix) <= TRAINING_SAMPLE else matrix[np.sort(
            np.random.default_rng(0).choice(len(matrix), TRAINING_SAMPLE, replace=False))]
    index = empty_index(matrix.shape[1], kind, config, training, len(matrix))
    # HNSW has no GPU implementation; flat and IVF do.
    if config.use_gpu and gpu_available() and kind in ("flat", "ivf"):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(matrix)
    return index


def index_bytes(index: faiss.Index) -> int:
    """The size of ``index`` serialised (vectors or codes, graph, lists and codebooks)."""
    return int(faiss.serialize_index(faiss.index_gpu_to_cpu(index) if _is_gpu_index(index) else index).nbytes)


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
