"""Stage 4 and 5: every listing embedded, a FAISS index over them, and the held-out evaluation
that decides whether the new encoder becomes the registry's champion."""


import json
import tempfile
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from afmrl_dagster.fingerprint import fingerprint

from ..resources.compute import GPU_OP_TAGS, GPU_POOL, TorchCompute
from ..resources.models import EvaluationSplit, FeatureTowers
from ..resources.storage import ArtifactStore
from ..resources.tracking import MlflowTracking
from .conditions import FOLLOWS_INPUTS
from .partitions import product_lines
from .publishing import png_metadata, tag_model_version


def load_encoder_head(store, manifest: dict):
    from afmrl_dagster.encoders.dual_tower import load_head

    with tempfile.TemporaryDirectory() as tmp:
        return load_head(store.download_directory(f"models/agcl_encoder/{manifest['fingerprint']}", Path(tmp) / "encoder"))


def parsed_attributes(table: pl.DataFrame, listing_ids: list[str]) -> list[dict | None]:
    from afmrl_dagster.features import align

    return [json.loads(text) if text else None for text in align(table, listing_ids)["attributes_json"].to_list()]


@dg.asset(
    automation_condition=FOLLOWS_INPUTS,
    partitions_def=product_lines,
    group_name="retrieval",
    kinds={"pytorch", "parquet"},
    pool=GPU_POOL, op_tags=GPU_OP_TAGS,
    check_specs=[dg.AssetCheckSpec("embeddings_healthy", asset="catalog_embeddings", blocking=True,
                                   description="One finite, unit-norm embedding per listing (Great Expectations).")],
)
def catalog_embeddings(
    context: dg.AssetExecutionContext,
    raw_catalog: pl.DataFrame,
    generated_attributes: pl.DataFrame,
    listing_features: pl.DataFrame,
    agcl_encoder: dict,
    feature_towers: FeatureTowers,
    torch_compute: TorchCompute,
    artifact_store: ArtifactStore,
):
    """Every listing of the line embedded by the AGCL encoder (title + generated attributes + image)."""
    from afmrl_dagster.encoders.dual_tower import embed_features
    from afmrl_dagster.features import embedding_health, embeddings_table, listing_features as features_of
    from afmrl_dagster.quality import embedding_expectations, validate_frame

    device = torch_compute.torch_device()
    head = load_encoder_head(artifact_store.open(), agcl_encoder)
    ids = raw_catalog["listing_id"].to_list()
    features = features_of(listing_features, ids, feature_towers.text_featurizer(device), raw_catalog["title"].to_list(), parsed_attributes(generated_attributes, ids))
    table = embeddings_table(ids, raw_catalog["product_id"].to_list(), embed_features(head, features, device=device))
    quality = validate_frame(embedding_health(table), "catalog_embeddings", embedding_expectations(raw_catalog.height))
    return dg.MaterializeResult(
        value=table,
        metadata={"dagster/row_count": table.height, "dimension": int(table["embedding"].dtype.size), "encoder_version": agcl_encoder["model_version"]},
        check_results=[dg.AssetCheckResult(check_name="embeddings_healthy", passed=quality.passed, metadata=quality.as_metadata())],
    )


class RetrievalIndexConfig(dg.Config):
    kind: str = Field(default="flat", description="'flat' (exact), 'hnsw' or 'ivf'.")
    min_recall_at_10: float = Field(default=0.95, description="Blocking gate: index recall@10 against exact search on a sample.")


@dg.asset(
    automation_condition=FOLLOWS_INPUTS,
    group_name="retrieval",
    kinds={"faiss"},
    check_specs=[dg.AssetCheckSpec("index_recall", asset="retrieval_index", blocking=True,
                                   description="Recall@10 of the index against exact search on a sample of listings.")],
)
def retrieval_index(
    context: dg.AssetExecutionContext, config: RetrievalIndexConfig, catalog_embeddings: pl.DataFrame, agcl_encoder: dict, artifact_store: ArtifactStore
):
    """A FAISS inner-product index over every listing, saved with its listing order and the
    encoder version that produced the embeddings."""
    from afmrl_dagster.retrieval.index import IndexConfig, build_index, recall_against_exact, save_index

    store = artifact_store.open()
    embeddings = catalog_embeddings["embedding"].to_numpy().astype(np.float32)
    key = fingerprint("retrieval_index", catalog_embeddings, config.kind)
    prefix = f"indexes/{key}"
    index = build_index(embeddings, IndexConfig(kind=config.kind))
    recall = recall_against_exact(index, embeddings, sample_size=min(200, len(embeddings)), k=min(10, len(embeddings)))
    manifest = {"uri": store.uri(prefix), "fingerprint": key, "kind": config.kind, "rows": len(embeddings),
                "encoder_version": agcl_encoder["model_version"], "recall_at_10_vs_exact": recall}
    if not store.is_complete_directory(prefix):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "index"
            folder.mkdir()
            save_index(index, folder / "index.faiss")
            catalog_embeddings.select("listing_id", "product_id").write_parquet(folder / "listings.parquet")
            (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
            store.upload_directory(folder, prefix)
    return dg.MaterializeResult(
        value=manifest,
        metadata={"uri": manifest["uri"], "rows": len(embeddings), "kind": config.kind, "encoder_version": manifest["encoder_version"]},
        check_results=[dg.AssetCheckResult(check_name="index_recall", passed=recall >= config.min_recall_at_10,
                                           metadata={"recall_at_10_vs_exact": recall, "threshold": config.min_recall_at_10})],
    )


class EvaluationConfig(dg.Config):
    example_queries: int = Field(default=6, ge=0, description="Held-out queries drawn with their top-4 results in the metadata picture.")
    gate_metric: str = Field(default="recall@1", description="Metric of the quality floor.")
    min_gate_metric: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Blocking gate: the AGCL encoder's held-out gate_metric must reach this, or promotion is not considered.",
    )


class PromotionConfig(dg.Config):
    promotion_metric: str = Field(default="recall@1", description="Metric the champion is chosen by.")
    promotion_margin: float = Field(default=0.0, description="The candidate must beat the champion by more than this.")


@dg.asset(
    automation_condition=FOLLOWS_INPUTS,
    group_name="retrieval",
    kinds={"mlflow"},
    check_specs=[
        dg.AssetCheckSpec("metrics_in_bounds", asset="retrieval_evaluation", blocking=True, description="Every metric is a probability (Great Expectations)."),
        dg.AssetCheckSpec("meets_quality_floor", asset="retrieval_evaluation", blocking=True,
                          description="The AGCL encoder's held-out gate metric reaches the configured floor; promotion waits on it."),
        dg.AssetCheckSpec("trained_beats_zero_shot", asset="retrieval_evaluation", description="The AGCL encoder's R@1 is above the zero-shot towers'."),
    ],
)
def retrieval_evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    raw_catalog: pl.DataFrame,
    listing_features: pl.DataFrame,
    generated_attributes: pl.DataFrame,
    catalog_embeddings: pl.DataFrame,
    retrieval_index: dict,
    agcl_encoder: dict,
    feature_towers: FeatureTowers,
    evaluation_split: EvaluationSplit,
    torch_compute: TorchCompute,
    mlflow_tracking: MlflowTracking,
    artifact_store: ArtifactStore,
):
    """Identical-product retrieval on held-out products: R@1/5/10 and mAP@10 for the zero-shot
    towers and the AGCL encoder, logged to MLflow and tagged on the encoder's model version,
    with a picture of a few queries and their top results (correct ones framed green).
    Its blocking checks (metrics in bounds, the configured quality floor) gate the promotion."""
    from afmrl_dagster.encoders.dual_tower import zero_shot_embeddings
    from afmrl_dagster.evaluation import REPORTED_METRICS, evaluate_embeddings, results_markdown
    from afmrl_dagster.features import align, listing_features as features_of
    from afmrl_dagster.quality import metric_expectations, validate_frame
    from afmrl_dagster.registry import ENCODER_MODEL_NAME

    device = torch_compute.torch_device()
    ids = raw_catalog["listing_id"].to_list()
    titles = raw_catalog["title"].to_list()
    query_mask = evaluation_split.split().query_mask(raw_catalog)
    text = feature_towers.text_featurizer(device)
    rows = []
    zero_title = zero_shot_embeddings(features_of(listing_features, ids))
    with_attributes = features_of(listing_features, ids, text, titles, parsed_attributes(generated_attributes, ids))
    zero_attrs = zero_shot_embeddings(with_attributes)
    trained = align(catalog_embeddings, ids)["embedding"].to_numpy().astype(np.float32)
    for name, embeddings in [("zero-shot towers (title)", zero_title), ("zero-shot towers (title + attributes)", zero_attrs), ("AGCL encoder (title + attributes)", trained)]:
        rows.append({"encoder": name, **evaluate_embeddings(raw_catalog, embeddings, query_mask)})
    results = pl.DataFrame(rows)
    candidate = rows[-1]
    if config.gate_metric not in candidate:
        raise ValueError(f"gate_metric {config.gate_metric!r} is not a reported metric; choose from {list(REPORTED_METRICS)}")
    evaluation_set = evaluation_set_fingerprint(raw_catalog, query_mask)

    with mlflow_tracking.start_run(context, "retrieval_evaluation", params={"encoder_version": agcl_encoder["model_version"], "queries": int(query_mask.sum()), "evaluation_set": evaluation_set}) as run:
        for row in rows:
            prefix = row["encoder"].split(" (")[0].replace(" ", "_").replace("-", "_")
            suffix = "attrs" if "attributes" in row["encoder"] else "title"
            mlflow_tracking.log_metrics({f"{prefix}_{suffix}_{m}": row[m] for m in REPORTED_METRICS})
        picture = _retrieval_examples_png(raw_catalog, trained, query_mask, artifact_store, config.example_queries)
        mlflow_tracking.log_png(picture, "retrieval_examples.png")
    picture_key = f"reports/retrieval_evaluation/{evaluation_set}/retrieval_examples.png"
    artifact_store.open().put_bytes(picture_key, picture)
    quality = validate_frame(results.select(REPORTED_METRICS), "retrieval_metrics", metric_expectations({m: (0.0, 1.0) for m in REPORTED_METRICS}))
    version = agcl_encoder["model_version"]
    tag_model_version(mlflow_tracking, context, agcl_encoder, {**{m: candidate[m] for m in REPORTED_METRICS}}, catalog=raw_catalog)
    mlflow_tracking.client().set_model_version_tag(ENCODER_MODEL_NAME, version, "evaluation_set", evaluation_set)

    table = results_markdown(results)
    beats = candidate["recall@1"] > rows[0]["recall@1"]
    floor_met = bool(candidate[config.gate_metric] >= config.min_gate_metric)
    return dg.MaterializeResult(
        value=results,
        metadata={
            "results": dg.MetadataValue.md(table),
            "queries": int(query_mask.sum()),
            "gallery": len(ids),
            "recall@1": float(candidate["recall@1"]),
            "map@10": float(candidate["map@10"]),
            "encoder_version": version,
            "evaluation_set": evaluation_set,
            "retrieval_examples": png_metadata(picture, "Held-out queries (grey) and their top results: green = same product, red = another."),
            "retrieval_examples_uri": dg.MetadataValue.path(artifact_store.open().uri(picture_key)),
            "mlflow_run_id": run.info.run_id,
            "mlflow_run": mlflow_tracking.run_link(run.info.run_id),
        },
        check_results=[
            dg.AssetCheckResult(check_name="metrics_in_bounds", passed=quality.passed, metadata=quality.as_metadata()),
            dg.AssetCheckResult(check_name="meets_quality_floor", passed=floor_met,
                                metadata={config.gate_metric: float(candidate[config.gate_metric]), "floor": config.min_gate_metric}),
            dg.AssetCheckResult(check_name="trained_beats_zero_shot", passed=beats, severity=dg.AssetCheckSeverity.WARN,
                                metadata={"trained_recall@1": candidate["recall@1"], "zero_shot_recall@1": rows[0]["recall@1"]}),
        ],
    )


def _retrieval_examples_png(raw_catalog: pl.DataFrame, embeddings: np.ndarray, query_mask, artifact_store: ArtifactStore, count: int) -> bytes:
    from afmrl_dagster.encoders.towers import decode_image
    from afmrl_dagster.plots import retrieval_examples, retrieval_grid_png

    # The first held-out listings by id whose product has another listing: the same pictures every run.
    products = raw_catalog["product_id"].to_list()
    counts = raw_catalog.group_by("product_id").len().rows()
    shared = {product for product, n in counts if n > 1}
    order = np.argsort(np.array(raw_catalog["listing_id"].to_list()), kind="stable")
    rows = [int(i) for i in order if query_mask[i] and products[i] in shared][:count]
    uris, titles = raw_catalog["image_uri"].to_list(), raw_catalog["title"].to_list()

    def image_of(row: int):
        return decode_image(artifact_store.read_uri(uris[row])) if uris[row] else None

    return retrieval_grid_png(retrieval_examples(rows, embeddings, products, k=4), image_of, lambda row: titles[row])


def evaluation_set_fingerprint(raw_catalog: pl.DataFrame, query_mask) -> str:
    """Names the held-out set: the same fingerprint means the same queries against the same catalog."""
    return fingerprint("evaluation_set", raw_catalog.select("listing_id", "product_id"), list(map(bool, query_mask)))


@dg.asset(automation_condition=FOLLOWS_INPUTS, group_name="retrieval", kinds={"mlflow"}, pool=GPU_POOL, op_tags=GPU_OP_TAGS)  # re-scoring the champion runs the towers
def encoder_promotion(
    context: dg.AssetExecutionContext,
    config: PromotionConfig,
    raw_catalog: pl.DataFrame,
    listing_features: pl.DataFrame,
    generated_attributes: pl.DataFrame,
    retrieval_evaluation: pl.DataFrame,
    agcl_encoder: dict,
    feature_towers: FeatureTowers,
    evaluation_split: EvaluationSplit,
    torch_compute: TorchCompute,
    mlflow_tracking: MlflowTracking,
):
    """The registry decision: the evaluated encoder becomes ``champion`` only when it beats the
    current champion, re-scored on the very same held-out set, by more than the margin.

    Runs only after the evaluation's blocking checks pass. The replaced champion stays under
    ``previous_champion`` (``afmrl rollback`` moves it back); the decision is recorded on the
    candidate's model version and in this asset's value and metadata.
    """
    from afmrl_dagster.encoders.dual_tower import embed_features
    from afmrl_dagster.evaluation import evaluate_embeddings
    from afmrl_dagster.features import listing_features as features_of
    from afmrl_dagster.promotion import promotion_decision
    from afmrl_dagster.registry import ENCODER_MODEL_NAME

    version = agcl_encoder["model_version"]
    candidate = retrieval_evaluation.row(retrieval_evaluation.height - 1, named=True)  # the AGCL encoder's row
    query_mask = evaluation_split.split().query_mask(raw_catalog)
    champion = mlflow_tracking.champion_version(ENCODER_MODEL_NAME)
    champion_version = str(champion.version) if champion else None
    champion_metrics = None
    if champion_version is not None and champion_version != version:
        # Re-score the champion on this very evaluation set, so the comparison is like for like.
        ids = raw_catalog["listing_id"].to_list()
        device = torch_compute.torch_device()
        with_attributes = features_of(listing_features, ids, feature_towers.text_featurizer(device), raw_catalog["title"].to_list(),
                                      parsed_attributes(generated_attributes, ids))
        champion_head = _registered_head(ENCODER_MODEL_NAME, champion_version)
        champion_metrics = evaluate_embeddings(raw_catalog, embed_features(champion_head, with_attributes, device=device), query_mask)
    decision = promotion_decision(version, candidate, champion_version, champion_metrics, config.promotion_metric, config.promotion_margin)
    if decision.promote:
        mlflow_tracking.promote(ENCODER_MODEL_NAME, version, decision.reason)
    client = mlflow_tracking.client()
    client.set_model_version_tag(ENCODER_MODEL_NAME, version, "promotion_decision", decision.reason[:5000])
    context.log.info(f"promotion: {decision.reason}")
    champion_after = version if decision.promote else champion_version
    value = {
        "candidate_version": version, "champion_before": champion_version, "champion_after": champion_after,
        "promoted": decision.promote, "reason": decision.reason, "metric": config.promotion_metric,
        "candidate": float(candidate[config.promotion_metric]),
        "champion": None if champion_metrics is None else float(champion_metrics[config.promotion_metric]),
        "evaluation_set": evaluation_set_fingerprint(raw_catalog, query_mask),
    }
    return dg.MaterializeResult(
        value=value,
        metadata={
            "promoted": decision.promote,
            "promotion": decision.reason,
            "champion_before": champion_version or "none",
            "champion_after": champion_after or "none",
            f"candidate_{config.promotion_metric}": value["candidate"],
            **({} if value["champion"] is None else {f"champion_{config.promotion_metric}": value["champion"]}),
        },
    )


def _registered_head(model_name: str, version: str):
    """The encoder head of a registered model version, fetched from the MLflow artefact store."""
    from afmrl_dagster.encoders.dual_tower import load_head
    from afmrl_dagster.registry import download_model_artifact

    with tempfile.TemporaryDirectory() as tmp:
        return load_head(download_model_artifact(f"models:/{model_name}/{version}", "head", tmp))
