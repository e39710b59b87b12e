"""One index per product line, searched together, and kept in the artefact store shard by shard.

A line's refresh rebuilds its own shard (from the shared :class:`~afmrl_dagster.retrieval.index_template.IndexTemplate`
where the kind is trained), and leaves every other shard as it is. A search asks every shard
for its top-k and merges them by score, so the result is the top-k of the union (exact when
every shard is exact).

In the store (:func:`publish_line_shards`), each shard is a folder of its own under
``indexes/shards/<key>``, the key a hash of the line's listings and vectors, the index settings
and the template it was filled from: a refresh that leaves a line's vectors as they were finds
its shard already there and does not build it again. A published index names its shards by
these keys, relative to the store (never by absolute URI), so a store copied elsewhere, or an
index copied with the shards it names, still opens. The template of a trained kind lives
under ``indexes/templates/<id>``, named by the pointer ``indexes/templates/<family>.json``
(the family: the encoder and the index settings); it is trained once and reused until the
catalog's vectors drift away from it (:meth:`IndexTemplate.needs_retraining`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from .index import (INDEX_FILE, IndexConfig, as_matrix, build_index, load_index, recall_against_exact, resolve_kind, save_index, search,
                    training_sample)
from .index_template import DRIFT_TOLERANCE, TRAINED_KINDS, IndexTemplate

SHARDS_ROOT = "indexes/shards"
TEMPLATES_ROOT = "indexes/templates"
SHARD_LISTINGS_FILE = "listing_ids.json"  # vector i of the shard's index is this list's listing i
SHARD_FILE = "shard.json"  # the shard's line, size, kind and recall@10 against exact search, measured when it was built
TEMPLATE_FILE = "template.bin"
RECALL_QUERIES = 200  # a shard's vectors sampled as queries when its recall against exact search is measured


class ShardedIndex:
    """Shards by product line; each holds its index and the gallery rows (global ids) of its vectors."""

    def __init__(self) -> None:
        self.shards: dict[str, tuple[faiss.Index, np.ndarray]] = {}

    def put(self, line: str, index: faiss.Index, rows: np.ndarray) -> None:
        """Add or replace ``line``'s shard; ``rows[i]`` is the gallery row of the shard's vector ``i``."""
        rows = np.asarray(rows, dtype=np.int64)
        if index.ntotal != len(rows):
            raise ValueError(f"shard {line!r}: the index holds {index.ntotal} vectors but {len(rows)} rows were given")
        for other, (_, taken) in self.shards.items():
            if other != line and np.intersect1d(taken, rows).size:
                raise ValueError(f"shard {line!r} repeats gallery rows of shard {other!r}")
        self.shards[line] = (index, rows)

    def remove(self, line: str) -> None:
        self.shards.pop(line, None)

    @property
    def ntotal(self) -> int:
        return sum(index.ntotal for index, _ in self.shards.values())

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, gallery rows) per query over every shard; -1 pads where fewer exist."""
        queries = as_matrix(queries)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores, rows = [np.full((len(queries), 0), -np.inf, dtype=np.float32)], [np.zeros((len(queries), 0), dtype=np.int64)]
        for index, global_rows in self.shards.values():
            if index.ntotal == 0:
                continue
            found_scores, found = search(index, queries, k)
            scores.append(np.where(found >= 0, found_scores, -np.inf).astype(np.float32))
            rows.append(np.where(found >= 0, global_rows[np.clip(found, 0, None)], -1))
        scores, rows = np.concatenate(scores, axis=1), np.concatenate(rows, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_scores, top_rows = np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)
        if top_rows.shape[1] < k:
            pad = k - top_rows.shape[1]
            top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            top_rows = np.pad(top_rows, ((0, 0), (0, pad)), constant_values=-1)
        return top_scores, np.where(np.isfinite(top_scores), top_rows, -1)


# ---- shards kept in the artefact store ------------------------------------------------------------


@dataclass
class ShardPlan:
    """What :func:`publish_line_shards` did: the shards (line -> key in the store), which it built and
    which it found already stored, each shard's recall@10 against exact search over its own
    vectors (measured when it was built, kept in its folder), and the template it used (``none``
    for an untrained kind; ``trained``, ``reused`` or ``retrained``, with the catalog's drift from it)."""

    shards: dict[str, str]
    built: list[str]
    reused: list[str]
    template: str
    template_key: str | None = None
    drift: float | None = None
    recall: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def worst_recall(self) -> float:
        """The lowest shard's recall@10 against exact search (1.0 with no shard)."""
        return min(self.recall.values(), default=1.0)

    def as_metadata(self) -> dict:
        return {"shards": len(self.shards), "shards_built": len(self.built), "shards_reused": len(self.reused),
                "template": self.template, **({"template_drift": round(self.drift, 4)} if self.drift is not None else {})}


def _digest(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(b"\x00" + (part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode()))
    return digest.hexdigest()[:24]


def current_template(store, family: str, embeddings: np.ndarray, config: IndexConfig,
                     tolerance: float = DRIFT_TOLERANCE) -> tuple[IndexTemplate, str, str, float | None]:
    """The template of ``family`` for the catalog ``embeddings``: the stored one while the catalog
    has not drifted from it (measured on the training sample's rows) and is of the kind the
    catalog's size asks for, else one trained on a sample of ``embeddings`` and stored (the
    pointer moves to it only once it is complete). Returns (template, its id, ``trained``,
    ``reused`` or ``retrained``, the catalog's drift from the stored one or None)."""
    pointer = f"{TEMPLATES_ROOT}/{family}.json"
    status, drift = "trained", None
    sample = training_sample(as_matrix(embeddings))
    if store.exists(pointer):
        template_id = json.loads(store.get_bytes(pointer))["template"]
        stored = IndexTemplate.from_bytes(store.read_directory_file(f"{TEMPLATES_ROOT}/{template_id}", TEMPLATE_FILE))
        if stored.kind == resolve_kind(config, len(embeddings)):
            drift = stored.drift(sample)
            if drift <= tolerance:
                return stored, template_id, "reused", drift
        status = "retrained"
    template = IndexTemplate.train(sample, config, size=len(embeddings))
    data = template.to_bytes()
    template_id = _digest(family, data)
    prefix = f"{TEMPLATES_ROOT}/{template_id}"
    if not store.is_complete_directory(prefix):
        with tempfile.TemporaryDirectory(prefix="afmrl-template-") as scratch:
            folder = Path(scratch) / "template"
            folder.mkdir()
            (folder / TEMPLATE_FILE).write_bytes(data)
            store.upload_directory(folder, prefix)
    store.put_bytes(pointer, json.dumps({"template": template_id, "trained_on": template.trained_on, "kind": template.kind}).encode())
    return template, template_id, status, drift


def publish_line_shards(store, embeddings: np.ndarray, listing_ids: list[str], lines: list[str], config: IndexConfig,
                        family: str) -> ShardPlan:
    """One index a product line over ``embeddings`` (row i: listing ``listing_ids[i]`` of line
    ``lines[i]``), each kept in ``store`` as its own complete folder. The kind is chosen by the
    whole catalog's size; a trained kind fills a copy of ``family``'s template
    (:func:`current_template`). A line whose shard is already stored (same listings, vectors,
    settings and template) is not built again, nor downloaded: only its small ``shard.json``
    (the recall measured when it was built) is read. A refresh's I/O is the changed lines'."""
    matrix = as_matrix(embeddings)
    if not (len(matrix) == len(listing_ids) == len(lines)):
        raise ValueError(f"{len(matrix)} vectors for {len(listing_ids)} listing ids and {len(lines)} lines")
    kind = resolve_kind(config, len(matrix))
    settings = {**dataclasses.asdict(config), "kind": kind, "use_gpu": False}
    template, template_id, status, drift = None, None, "none", None
    if kind in TRAINED_KINDS:
        template, template_id, status, drift = current_template(store, family, matrix, config)
    plan = ShardPlan({}, [], [], status, f"{TEMPLATES_ROOT}/{template_id}" if template_id else None, drift)
    names, inverse = np.unique(np.asarray(lines, dtype=str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # every line's rows together, in catalog order within a line
    for line, rows in zip(names.tolist(), np.split(order, np.cumsum(np.bincount(inverse, minlength=len(names)))[:-1])):
        ids = [listing_ids[i] for i in rows]
        vectors = np.ascontiguousarray(matrix[rows])
        prefix = f"{SHARDS_ROOT}/{_digest('shard', line, settings, template_id, ids, vectors.tobytes())}"
        plan.shards[line] = prefix
        if store.is_complete_directory(prefix):  # its recall was measured when it was built; read back, checksum verified
            plan.recall[line] = float(json.loads(store.read_directory_file(prefix, SHARD_FILE))["recall_at_10_vs_exact"])
            plan.reused.append(line)
            continue
        index = template.filled(vectors) if template is not None else build_index(vectors, IndexConfig(**settings))
        plan.recall[line] = recall_against_exact(index, vectors, sample_size=min(RECALL_QUERIES, len(vectors)), k=min(10, len(vectors)))
        with tempfile.TemporaryDirectory(prefix="afmrl-shard-") as scratch:
            folder = Path(scratch) / "shard"
            folder.mkdir()
            save_index(index, folder / INDEX_FILE)
            (folder / SHARD_LISTINGS_FILE).write_text(json.dumps(ids))
            (folder / SHARD_FILE).write_text(json.dumps({"line": line, "listings": len(ids), "kind": kind,
                                                         "recall_at_10_vs_exact": plan.recall[line]}))
            store.upload_directory(folder, prefix)
        plan.built.append(line)
    return plan


def open_line_shards(store, shards: dict[str, str], listing_ids: list[str], use_gpu: bool = False) -> ShardedIndex:
    """The stored shards (line -> key in ``store``; checksums verified on download) as one :class:`ShardedIndex`
    whose rows are positions in ``listing_ids`` (the published listing table's order)."""
    position = {listing_id: row for row, listing_id in enumerate(listing_ids)}
    sharded = ShardedIndex()
    with tempfile.TemporaryDirectory(prefix="afmrl-shards-") as scratch:
        for number, (line, key) in enumerate(sorted(shards.items())):
            folder = store.download_directory(key, Path(scratch) / str(number))
            ids = json.loads((folder / SHARD_LISTINGS_FILE).read_text())
            missing = [listing_id for listing_id in ids if listing_id not in position]
            if missing:
                raise ValueError(f"shard {line!r} ({store.uri(key)}) holds listings the index's listing table lacks: {missing[:5]}")
            sharded.put(line, load_index(folder / INDEX_FILE, use_gpu=use_gpu), np.array([position[i] for i in ids], dtype=np.int64))
    if sharded.ntotal != len(listing_ids):
        raise ValueError(f"the shards hold {sharded.ntotal} vectors but the listing table {len(listing_ids)} rows")
    return sharded
