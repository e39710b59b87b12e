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

from ..resources.compute import GPU_POOL, TorchCompute
from ..resources.models import EvaluationSplit, FeatureTowers
from ..resources.storage import ArtifactStore
from ..resources.tracking import MlflowTracking
from .partitions import product_lines
from .publishing import tag_model_version


def load_encoder_head(store, manifest: dict):
    from afmrl_dagster.encoders.dual_tower import load_head

    with tempfile.TemporaryDirectory() as tmp:
        return load_head(store.download_directory(f"models/agcl_encoder/{manifest['fingerprint']}", Path(tmp) / "encoder"))


def parsed_attributes(table: pl.DataFrame, listing_ids: list[str]) -> list[dict | None]:
    from afmrl_dagster.features import align

    return [json.loads(text) if text else None for text in align(table, listing_ids)["attributes_json"].to_list()]


@dg.asset(
    partitions_def=product_lines,
    group_name="retrieval",
    kinds={"pytorch", "parquet"},
    pool=GPU_POOL,
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
    promotion_metric: str = Field(default="recall@1", description="Metric the champion is chosen by.")
    promotion_margin: float = Field(default=0.0, description="The candidate must beat the champion by more than this.")


@dg.asset(
    group_name="retrieval",
    kinds={"mlflow"},
    check_specs=[
        dg.AssetCheckSpec("metrics_in_bounds", asset="retrieval_evaluation", blocking=True, description="Every metric is a probability (Great Expectations)."),
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
):
    """Identical-product retrieval on held-out products: R@1/5/10 and mAP@10 for the zero-shot
    towers and the AGCL encoder. Moves the registry's ``champion`` alias to the new encoder
    only when it beats the current champion on the same evaluation set."""
    from afmrl_dagster.encoders.dual_tower import embed_features, zero_shot_embeddings
    from afmrl_dagster.evaluation import REPORTED_METRICS, evaluate_embeddings, results_markdown
    from afmrl_dagster.features import align, listing_features as features_of
    from afmrl_dagster.quality import metric_expectations, validate_frame
    from afmrl_dagster.registry import ENCODER_MODEL_NAME
    from afmrl_dagster.promotion import PromotionDecision, promotion_decision

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
    evaluation_set = fingerprint("evaluation_set", raw_catalog.select("listing_id", "product_id"), query_mask.tolist())

    with mlflow_tracking.start_run(context, "retrieval_evaluation", params={"encoder_version": agcl_encoder["model_version"], "queries": int(query_mask.sum()), "evaluation_set": evaluation_set}) as run:
        for row in rows:
            prefix = row["encoder"].split(" (")[0].replace(" ", "_").replace("-", "_")
            suffix = "attrs" if "attributes" in row["encoder"] else "title"
            mlflow_tracking.log_metrics({f"{prefix}_{suffix}_{m}": row[m] for m in REPORTED_METRICS})
    # The gate first: metrics that fail it never move the champion.
    quality = validate_frame(results.select(REPORTED_METRICS), "retrieval_metrics", metric_expectations({m: (0.0, 1.0) for m in REPORTED_METRICS}))
    version = agcl_encoder["model_version"]
    tag_model_version(mlflow_tracking, context, agcl_encoder, {**{m: candidate[m] for m in REPORTED_METRICS}})
    mlflow_tracking.client().set_model_version_tag(ENCODER_MODEL_NAME, version, "evaluation_set", evaluation_set)
    champion = mlflow_tracking.champion_version(ENCODER_MODEL_NAME)
    champion_version = str(champion.version) if champion else None
    if not quality.passed:
        decision = PromotionDecision(False, f"metrics failed their quality gate: {quality.as_metadata()['failed']}")
    else:
        champion_metrics = None
        if champion_version is not None and champion_version != version:
            # Re-score the champion on this very evaluation set, so the comparison is like for like.
            champion_head = _registered_head(ENCODER_MODEL_NAME, champion_version)
            champion_metrics = evaluate_embeddings(raw_catalog, embed_features(champion_head, with_attributes, device=device), query_mask)
        decision = promotion_decision(version, candidate, champion_version, champion_metrics, config.promotion_metric, config.promotion_margin)
    if decision.promote:
        mlflow_tracking.promote(ENCODER_MODEL_NAME, version)
    context.log.info(f"promotion: {decision.reason}")

    table = results_markdown(results)
    beats = candidate["recall@1"] > rows[0]["recall@1"]
    return dg.MaterializeResult(
        value=results,
        metadata={
            "results": dg.MetadataValue.md(table),
            "queries": int(query_mask.sum()),
            "gallery": len(ids),
            "recall@1": float(candidate["recall@1"]),
            "map@10": float(candidate["map@10"]),
            "promoted": decision.promote,
            "promotion": decision.reason,
            "champion_before": champion_version or "none",
            "mlflow_run_id": run.info.run_id,
            "mlflow_run": mlflow_tracking.run_url(run.info.run_id),
        },
        check_results=[
            dg.AssetCheckResult(check_name="metrics_in_bounds", passed=quality.passed, metadata=quality.as_metadata()),
            dg.AssetCheckResult(check_name="trained_beats_zero_shot", passed=beats, severity=dg.AssetCheckSeverity.WARN,
                                metadata={"trained_recall@1": candidate["recall@1"], "zero_shot_recall@1": rows[0]["recall@1"]}),
        ],
    )



def _registered_head(model_name: str, version: str):
    """The encoder head of a registered model version, fetched from the MLflow artefact store."""
    from afmrl_dagster.encoders.dual_tower import load_head
    from afmrl_dagster.registry import download_model_artifact

    with tempfile.TemporaryDirectory() as tmp:
        return load_head(download_model_artifact(f"models:/{model_name}/{version}", "head", tmp))
