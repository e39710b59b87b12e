"""Scores of embeddings: the pipeline's parts (validation, test) of a catalog, the tasks of an
evaluation plan, and a registered encoder version re-scored as it serves."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from ..retrieval.metrics import per_query_retrieval
from ..retrieval.text_fusion import FUSION_WEIGHTS, ReaderFusion
from ..retrieval.tasks import clustering_scores, combine_retrieval, cross_set_retrieval, knn_classification_accuracy
from .protocols import EvaluationPlan
from .splits import HeldOutSplit

KNN_K = 5


def evaluate_embeddings(catalog: pl.DataFrame, embeddings: np.ndarray, query_mask: np.ndarray, gallery_mask: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of the queries ``query_mask`` against the listings of ``gallery_mask`` (default:
    every listing of ``catalog``); a query's own listing never counts. Also ``num_queries``
    (scored) and ``queries_without_match`` (no other listing of their product in the gallery)."""
    scores = query_scores(catalog, embeddings, query_mask, gallery_mask)
    return {**scores.metrics, "num_queries": float(len(scores.listing_ids)),
            "queries_without_match": float(int(np.asarray(query_mask).sum()) - len(scores.listing_ids))}


@dataclass(frozen=True)
class QueryScores:
    """Each scored query's metrics (``listing_ids[i]`` has ``values[metric][i]``) and their means."""

    listing_ids: list[str]
    values: dict[str, np.ndarray]

    @property
    def metrics(self) -> dict[str, float]:
        return {name: float(value.mean()) if len(value) else 0.0 for name, value in self.values.items()}


def query_scores(catalog: pl.DataFrame, embeddings: np.ndarray, query_mask: np.ndarray, gallery_mask: np.ndarray | None = None,
                 fusion: tuple[ReaderFusion, dict[str, str], float] | None = None) -> QueryScores:
    """:func:`evaluate_embeddings` query by query, for a paired comparison of two encoders.
    ``fusion``: (a :class:`ReaderFusion` over every listing of ``catalog``, the reader's text by
    query listing id, the weight): the reader's text re-ranks each query's top candidates, as served."""
    listing_ids = catalog["listing_id"].to_list()
    query_index = np.flatnonzero(query_mask)
    gallery_index = np.arange(len(listing_ids)) if gallery_mask is None else np.flatnonzero(gallery_mask)
    rescore = None
    if fusion is not None:
        reader, texts, weight = fusion
        rescore = reader.rescorer([texts.get(listing_ids[i]) for i in query_index], gallery_index)(weight)
    return _query_scores(catalog, embeddings, query_index, gallery_index, rescore)


def _query_scores(catalog: pl.DataFrame, embeddings: np.ndarray, query_index: np.ndarray, gallery_index: np.ndarray, rescore=None) -> QueryScores:
    listing_ids = catalog["listing_id"].to_list()
    product_ids = catalog["product_id"].to_list()
    rows, values = per_query_retrieval(
        embeddings[query_index], embeddings[gallery_index], [product_ids[i] for i in query_index], [product_ids[i] for i in gallery_index],
        query_listing_ids=[listing_ids[i] for i in query_index], gallery_listing_ids=[listing_ids[i] for i in gallery_index], rescore=rescore,
    )
    return QueryScores([listing_ids[query_index[row]] for row in rows], values)


def fusion_weight_on_validation(
    catalog: pl.DataFrame, embeddings: np.ndarray, query_mask: np.ndarray, gallery_mask: np.ndarray,
    reader: ReaderFusion, texts: dict[str, str], metric: str = "recall@1",
) -> tuple[float, dict[float, float]]:
    """The weight of :data:`FUSION_WEIGHTS` whose fused search gives the best mean ``metric`` over
    the (validation) queries ``query_mask`` (ties: the smaller, so 0, no fusion, wins unless the
    reader helps), and the metric at every weight. ``reader`` covers every listing of ``catalog``;
    ``texts``: the reader's text by query listing id."""
    listing_ids = catalog["listing_id"].to_list()
    query_index, gallery_index = np.flatnonzero(query_mask), np.flatnonzero(gallery_mask)
    rescorer = reader.rescorer([texts.get(listing_ids[i]) for i in query_index], gallery_index)
    results = {weight: _query_scores(catalog, embeddings, query_index, gallery_index, rescorer(weight)).metrics[metric]
               for weight in FUSION_WEIGHTS}
    return max(FUSION_WEIGHTS, key=lambda weight: (results[weight], -weight)), results


def evaluation_set_fingerprint(catalog: pl.DataFrame, query_mask: np.ndarray) -> str:
    """Names an evaluation set: the same fingerprint means the same queries against the same catalog."""
    from ..fingerprint import fingerprint

    return fingerprint("evaluation_set", catalog.select("listing_id", "product_id"), list(map(bool, query_mask)))


def evaluate_parts(
    catalog: pl.DataFrame, embeddings: np.ndarray, split: HeldOutSplit, parts: tuple[str, ...] = ("validation", "test")
) -> dict[str, dict[str, float]]:
    """Metrics per part of ``split``, each part's listings querying the gallery :meth:`HeldOutSplit.gallery_mask` gives it."""
    return {part: evaluate_embeddings(catalog, embeddings, split.mask(catalog, part), split.gallery_mask(catalog, part)) for part in parts}


def score_plan(plan: EvaluationPlan, embeddings: np.ndarray, query_embeddings: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Retrieval metrics per task (and pooled), kNN accuracy of the product line over the
    queries when the catalog has several lines, k-means of the queries' products when they
    name several.

    ``embeddings`` has one row per listing of ``plan.listings``. ``query_embeddings`` (same
    rows) embeds the listings when they act as queries in the retrieval tasks and the
    clustering, e.g. with attributes another generator wrote; by default a query is embedded
    as in the gallery. kNN of the product line reads the gallery embeddings."""
    queries = embeddings if query_embeddings is None else query_embeddings
    if queries.shape != embeddings.shape:
        raise ValueError(f"query embeddings {queries.shape} and gallery embeddings {embeddings.shape} differ in shape")
    ids = plan.listings["listing_id"].to_list()
    row = {listing_id: i for i, listing_id in enumerate(ids)}
    products = plan.listings["product_id"].to_list()
    metrics: dict[str, dict[str, float]] = {}
    for task in plan.tasks:
        q = [row[i] for i in task.query_ids]
        g = [row[i] for i in task.gallery_ids]
        metrics[task.name] = cross_set_retrieval(
            queries[q], [products[i] for i in q], embeddings[g], [products[i] for i in g],
            query_listing_ids=list(task.query_ids), gallery_listing_ids=list(task.gallery_ids),
        )
    for name, parts in plan.pooled.items():
        metrics[name] = combine_retrieval([metrics[part] for part in parts])
    query_rows = np.array([row[i] for i in plan.query_ids])
    lines = plan.listings["product_line"].to_list()
    if len(set(lines)) > 1:
        mask = np.zeros(len(ids), bool)
        mask[query_rows] = True
        accuracy = knn_classification_accuracy(embeddings, lines, k=KNN_K, query_mask=mask)
        metrics["knn_product_line"] = {"accuracy": accuracy, "k": float(KNN_K), "num_classes": float(len(set(lines)))}
    query_products = [products[i] for i in query_rows]
    if len(set(query_products)) > 1:
        metrics["clustering_product_id"] = clustering_scores(queries[query_rows], query_products, seed=0)
    return metrics


def score_registered_version(version, *args, **kwargs) -> QueryScores:
    """:func:`score_served` of a registered encoder version (an MLflow ``ModelVersion``), served as
    its serving tags say (or, without them, its logged head with the current attributes)."""
    return score_served(version.tags or {}, f"version {version.version}", f"models:/{version.name}/{version.version}", *args, **kwargs)


def score_served(
    tags: dict[str, str],
    label: str,
    model_uri: str,
    catalog: pl.DataFrame,
    features_table: pl.DataFrame,
    attributes_table: pl.DataFrame,
    attributes_generator_uri: str,
    query_mask: np.ndarray,
    gallery_mask: np.ndarray,
    store,
    text_featurizer,
    device: str = "cpu",
    log=print,
    read_bytes=None,
    write_attributes=None,
) -> QueryScores:
    """Each query's metrics (``query_mask`` against ``gallery_mask``) for the encoder ``label`` served as
    its serving ``tags`` say: its weights and the generator they name (no ``serving.encoder_uri``:
    the head logged at ``model_uri``). When that
    generator is the one that wrote ``attributes_table`` (``attributes_generator_uri``), its stored
    text features are reused; otherwise ``write_attributes(generator_uri)`` (the generator of any
    kind loaded and run over the catalog: training's ``catalog_attributes``) writes them again.
    ``read_bytes`` reads the photos of an encoder that reads them (any backend but the frozen-tower head)."""
    from ..encoders.listing_encoder import ListingInputs, load_encoder, load_stored_encoder
    from ..features import listing_features, served_listing_inputs
    from ..serving import SERVING_TAG_PREFIX

    encoder_uri, generator_uri = tags.get(f"{SERVING_TAG_PREFIX}encoder_uri"), tags.get(f"{SERVING_TAG_PREFIX}generator_uri")
    ids = catalog["listing_id"].to_list()
    if encoder_uri:
        encoder = load_stored_encoder(store, encoder_uri, device=device)
    else:
        import tempfile

        from ..registry import download_model_artifact

        with tempfile.TemporaryDirectory() as scratch:
            encoder = load_encoder(download_model_artifact(model_uri, "head", scratch), device=device)
    if generator_uri is None or generator_uri == attributes_generator_uri:
        if generator_uri is None:
            log(f"{label} carries no serving tags: re-scored with the current generated attributes")
        inputs = served_listing_inputs(catalog, features_table, attributes_table, read_bytes)
    else:
        from ..features import with_listing_text

        if write_attributes is None:
            raise ValueError(f"{label} serves with the generator at {generator_uri}, and no write_attributes was given to run it")
        log(f"{label} serves with the generator at {generator_uri}: writing the catalog's attributes with it")
        attributes = write_attributes(generator_uri)
        base = listing_features(features_table, ids)
        titles = catalog["title"].to_list()
        inputs = ListingInputs(ids, titles, attributes, catalog["image_uri"].to_list(), read_bytes,
                               with_listing_text(base, text_featurizer, titles, attributes))
    return query_scores(catalog, encoder.embed(inputs), query_mask, gallery_mask)
