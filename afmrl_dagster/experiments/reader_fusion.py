"""Claim 2 on photos: the visual reader's attributes fused into the trained encoder's search.

A store photo carries no attributes of its own; the towers see its pixels, not the words on
the pack. The visual reader (:mod:`afmrl_dagster.attributes.visual_reader`) reads them. Here
each query photo's reader attributes are scored against each catalog entry's text (title,
description, seller attributes) by char-trigram BM25 (:mod:`afmrl_dagster.retrieval.text_fusion`),
and the score, min-max scaled per query, is added with a weight ``alpha`` to the cosine of a
trained head's embeddings. ``alpha`` is chosen per seed on the validation photos (the grid
:data:`ALPHAS`, by the mean R@1 of the first task) and test is scored once with it.

Only tasks whose gallery is catalog entries are fused (grocery's ``photo_to_catalog`` and
``packages_to_catalog``): the training photos of the ``identical_product`` gallery have no
entry text.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..attributes.visual_reader import WordCache, attributes_from_words, lexicon_from_catalog
from ..encoders.dual_tower import ListingFeatures, embed_features
from ..evaluation.statistics import ranks_from_scores
from ..retrieval.text_fusion import FUSION_WEIGHTS, TrigramBM25, catalog_entry_texts, reader_text
from ..training.encoder_training import EncoderTrainingConfig, train_encoder
from .quality_ladder import BASELINE_ROW, PARTS, ROWS, LadderDataset, LadderSettings, rank_metrics, rows_of

READER = "visual reader"
READER_ROW = f"plain InfoNCE + {READER} (fused at search)"
# The served fusion's grid. A catalog task's gallery (81 and 31 entries) lies within the served
# top-100 candidates, so scaling the text score over the whole gallery here is what serves.
ALPHAS = FUSION_WEIGHTS
FUSED_TASKS = ("photo_to_catalog", "packages_to_catalog")


def reader_texts(dataset: LadderDataset, cache: str | Path, read_bytes: Callable[[str], bytes] = lambda uri: Path(uri).read_bytes(),
                 progress: Callable[[str], None] = lambda message: None) -> tuple[dict[str, str], dict]:
    """The reader's attribute values (joined) for every validation and test query photo, and the
    OCR cost (``{"photos_read": n, "seconds_per_photo": s}``; cached photos cost nothing)."""
    catalog = dataset.train.filter(dataset.train["listing_id"].is_in(list(_catalog_ids(dataset))))
    lexicon = lexicon_from_catalog(catalog)
    words_cache = WordCache(cache)
    texts = {}
    for part in PARTS:
        plan = dataset.plan(part)
        queries = plan.listings.filter(plan.listings["listing_id"].is_in(plan.query_ids))
        for n, (listing, uri) in enumerate(zip(queries["listing_id"].to_list(), queries["image_uri"].to_list())):
            words, colour = words_cache.words(read_bytes(uri))
            texts[listing] = reader_text(attributes_from_words(words, lexicon, colour))
            if (n + 1) % 50 == 0:
                progress(f"{dataset.name}: read {n + 1}/{queries.height} {part} photos ({words_cache.read} by OCR)")
    return texts, {"photos_read": words_cache.read, "seconds_per_photo": words_cache.seconds / max(words_cache.read, 1)}


def _catalog_ids(dataset: LadderDataset) -> set[str]:
    return {i for part in PARTS for task in dataset.plan(part).tasks if task.name in FUSED_TASKS for i in task.gallery_ids}


def entry_texts(dataset: LadderDataset) -> dict[str, str]:
    """Title, description and seller attributes of every catalog entry a fused task searches."""
    ids = _catalog_ids(dataset)
    entries = dataset.train.filter(dataset.train["listing_id"].is_in(list(ids)))
    return dict(zip(entries["listing_id"].to_list(), catalog_entry_texts(entries)))


class ReaderScores:
    """The reader's char-trigram BM25 of each query photo against each catalog entry, for every
    task of :data:`FUSED_TASKS` in both parts; :meth:`fuse` adds them to any embeddings' cosines."""

    def __init__(self, dataset: LadderDataset, queries_read: dict[str, str], entries: dict[str, str]):
        self.dataset = dataset
        self.tasks = {part: [task for task in dataset.plan(part).tasks if task.name in FUSED_TASKS and task.query_ids] for part in PARTS}
        if not self.tasks["validation"]:
            raise ValueError(f"{dataset.name}: no task searches catalog entries ({', '.join(FUSED_TASKS)}); nothing to fuse")
        self.text_scores = {}
        for part in PARTS:
            for task in self.tasks[part]:
                missing = [i for i in task.gallery_ids if i not in entries] + [i for i in task.query_ids if i not in queries_read]
                if missing:
                    raise ValueError(f"{dataset.name}: no reader or entry text for listing {missing[0]!r} of task {task.name}")
                bm25 = TrigramBM25([entries[i] for i in task.gallery_ids])
                self.text_scores[(part, task.name)] = bm25.matrix([queries_read[i] for i in task.query_ids])

    def fuse(self, embeddings: dict[str, np.ndarray]) -> tuple[float, dict]:
        """``alpha`` chosen on validation (the grid :data:`ALPHAS`, by the first task's mean R@1;
        ties: the smaller) and the fused ranks and metrics of both parts, in the ladder's record
        shape. ``embeddings``: per part, one row per listing of that part's plan, in plan order."""
        cosines, truth = {}, {}
        for part in PARTS:
            plan = self.dataset.plan(part)
            row_of = {listing: i for i, listing in enumerate(plan.listings["listing_id"].to_list())}
            products = plan.listings["product_id"].to_list()
            for task in self.tasks[part]:
                q = [row_of[i] for i in task.query_ids]
                g = [row_of[i] for i in task.gallery_ids]
                cosines[(part, task.name)] = embeddings[part][q] @ embeddings[part][g].T
                truth[(part, task.name)] = ([products[i] for i in q], [products[i] for i in g])

        def ranks(part: str, alpha: float) -> dict[str, list[int]]:
            return {task.name: ranks_from_scores(cosines[(part, task.name)] + alpha * self.text_scores[(part, task.name)],
                                                 *truth[(part, task.name)]).tolist() for task in self.tasks[part]}

        first = self.tasks["validation"][0].name
        alpha = max(ALPHAS, key=lambda a: (float(np.mean(np.asarray(ranks("validation", a)[first]) == 1)), -a))
        outcome = {}
        for part in PARTS:
            part_ranks = ranks(part, alpha)
            outcome[part] = {"ranks": part_ranks, "metrics": {task: rank_metrics(values) for task, values in part_ranks.items()}}
        return alpha, outcome


def run_reader_fusion(
    dataset: LadderDataset,
    features: ListingFeatures,
    reader: ReaderScores,
    settings: LadderSettings | None = None,
    row: str = BASELINE_ROW,
    progress: Callable[[str], None] = lambda message: None,
) -> list[dict]:
    """One record per seed: the head of ``row`` trained as :func:`~.quality_ladder.run_ladder`
    trains it, its cosine fused with ``reader``'s BM25 on :data:`FUSED_TASKS`, ``alpha`` chosen
    on validation; ranks and metrics of both parts, in the ladder's record shape."""
    settings = settings or LadderSettings()
    spec = ROWS[row]
    train_rows = rows_of(features, dataset.train)
    part_features = {part: features.subset(rows_of(features, dataset.plan(part).listings)) for part in PARTS}
    records = []
    for seed in settings.seeds:
        started = time.perf_counter()
        config = EncoderTrainingConfig(**{**settings.training, **dataset.training, **spec.training}, seed=seed, agcl={**settings.agcl, **spec.agcl})
        head = train_encoder(features.subset(train_rows), dataset.train["product_id"].to_list(), dataset.train["product_line"].to_list(),
                             dataset.attribute_texts, config).head
        alpha, outcome = reader.fuse({part: embed_features(head, part_features[part]) for part in PARTS})
        records.append({"dataset": dataset.name, "row": READER_ROW, "seed": seed, "alpha": alpha,
                        "seconds": time.perf_counter() - started, **outcome})
        first = reader.tasks["validation"][0].name
        progress(f"{dataset.name}: {READER_ROW} seed {seed} alpha {alpha} validation R@1 "
                 f"{outcome['validation']['metrics'][first]['recall@1']:.3f}")
    return records
