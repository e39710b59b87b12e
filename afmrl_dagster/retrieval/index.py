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
from pathlib import Path

import faiss
import numpy as np

from .index_config import EXACT_UP_TO, HNSW_UP_TO, INDEX_KINDS, REFINE_KINDS, TRAINING_SAMPLE, IndexConfig, resolve_kind

__all__ = ["EXACT_UP_TO", "HNSW_UP_TO", "INDEX_KINDS", "REFINE_KINDS", "TRAINING_SAMPLE", "IndexConfig", "as_matrix", "build_index",
           "empty_index", "gpu_available", "index_bytes", "load_index", "open_published_index", "publish_index", "recall_against_exact",
           "resolve_kind", "save_index", "search", "training_sample"]


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def as_matrix(embeddings: np.ndarray) -> np.ndarray:
    """``embeddings`` as a C-contiguous float32 matrix (what faiss takes); ValueError unless 2-D."""
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


def training_sample(matrix: np.ndarray, size: int = TRAINING_SAMPLE, seed: int = 0) -> np.ndarray:
    """The rows IVF and IVF-PQ learn from: all of ``matrix`` up to ``size``, else ``size`` of them drawn with ``seed`` (in row order)."""
    if len(matrix) <= size:
        return matrix
    return matrix[np.sort(np.random.default_rng(seed).choice(len(matrix), size, replace=False))]


def build_index(embeddings: np.ndarray, config: IndexConfig | None = None) -> faiss.Index:
    """An inner-product index over ``embeddings`` [N, D] (rows in order)."""
    config = config or IndexConfig()
    matrix = as_matrix(embeddings)
    kind = resolve_kind(config, len(matrix))
    training = None
    if kind in ("ivf", "ivfpq"):
        training = training_sample(matrix)
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
    return index.search(as_matrix(queries), k)


def recall_against_exact(index: faiss.Index, embeddings: np.ndarray, sample_size: int = 200, k: int = 10, seed: int = 0) -> float:
    """Recall@k of ``index`` against exact search, on a random sample of ``embeddings`` used as queries."""
    matrix = as_matrix(embeddings)
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


def publish_index(store, prefix: str, index: faiss.Index | dict[str, str], listings, manifest: dict) -> dict:
    """Keep ``index`` with its listing table and ``manifest`` under ``prefix`` of ``store``
    (complete-or-absent; an already complete folder is left as it is). ``index`` is one faiss
    index (row i: the table's row i) or the product lines' stored shards, line -> key in
    ``store`` (:func:`~afmrl_dagster.retrieval.shards.publish_line_shards`), named in the manifest. Returns
    the manifest with the folder's ``uri``; every index the pipeline serves is written here."""
    sharded = isinstance(index, dict)  # the shards' sizes are checked against the table when they are opened
    if not sharded and index.ntotal != listings.height:
        raise ValueError(f"the index holds {index.ntotal} vectors but its listing table {listings.height} rows")
    manifest = {**manifest, "uri": store.uri(prefix), "rows": listings.height, **({"shards": dict(sorted(index.items()))} if sharded else {})}
    if not store.is_complete_directory(prefix):
        import json

        with tempfile.TemporaryDirectory(prefix="afmrl-index-") as scratch:
            folder = Path(scratch) / "index"
            folder.mkdir()
            if not sharded:
                save_index(index, folder / INDEX_FILE)
            listings.write_parquet(folder / LISTINGS_FILE)
            (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
            store.upload_directory(folder, prefix)
    return manifest


def open_published_index(store, uri: str, use_gpu: bool = False):
    """The index and its listing table published at ``uri`` (checksums verified on download):
    one faiss index, or a :class:`~afmrl_dagster.retrieval.shards.ShardedIndex` over the product
    lines' shards; either answers :func:`search` with rows of the table."""
    import json

    import polars as pl

    with tempfile.TemporaryDirectory(prefix="afmrl-index-") as scratch:
        folder = store.download_directory(store.key_of(uri), Path(scratch) / "index")
        listings = pl.read_parquet(folder / LISTINGS_FILE)
        shards = json.loads((folder / "manifest.json").read_text()).get("shards")
        if shards:
            from .shards import open_line_shards

            return open_line_shards(store, shards, listings["listing_id"].to_list(), use_gpu=use_gpu), listings
        return load_index(folder / INDEX_FILE, use_gpu=use_gpu), listings
