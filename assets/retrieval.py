"""Stages 4 and 5: every listing embedded, a FAISS index over them, the evaluation on
validation and test products, the one promotion path, and the serving record."""


import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from afmrl_dagster.fingerprint import fingerprint
from afmrl_dagster.promotion import PROMOTION_CONFIDENCE
from afmrl_dagster.retrieval.index_config import IndexConfig

from ..resources.compute import GPU_OP_TAGS, GPU_POOL, TorchCompute
from ..resources.models import EvaluationSplit, FeatureTowers
from ..resources.storage import ArtifactStore
from ..resources.tracking import MlflowTracking
from .conditions import FOLLOWS_EVALUATION, FOLLOWS_INPUTS
from .partitions import product_lines
from .publishing import png_metadata, tag_model_version


class CatalogEmbeddingsConfig(dg.Config):
    chunk_size: int = Field(default=4096, ge=1, description="Listings embedded and stored at a time: a run stopped midway "
                            "resumes from the chunks it stored (rematerialise with the same inputs).")


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
    config: CatalogEmbeddingsConfig,
    raw_catalog: pl.DataFrame,
    generated_attributes: pl.DataFrame,
    listing_features: pl.DataFrame,
    agcl_encoder: dict,
    torch_compute: TorchCompute,
    artifact_store: ArtifactStore,
):
    """Every listing of the line embedded by the AGCL encoder (title + generated attributes + image),
    chunk by chunk: each chunk is kept in the store as it is done, so a run stopped midway
    resumes where it stopped; the chunks are removed once the table is complete."""
    from afmrl_dagster.encoders.embedding_job import embed_resumably
    from afmrl_dagster.encoders.listing_encoder import load_stored_encoder
    from afmrl_dagster.features import embedding_health, embeddings_table, served_listing_inputs
    from afmrl_dagster.quality import embedding_expectations, validate_frame

    device = torch_compute.torch_device()
    store = artifact_store.open()
    encoder = load_stored_encoder(store, agcl_encoder["uri"], device=device)
    inputs = served_listing_inputs(raw_catalog, listing_features, generated_attributes, artifact_store.read_uri)
    key = fingerprint("catalog_embeddings", agcl_encoder["uri"], raw_catalog, generated_attributes, listing_features, config.chunk_size)
    job = f"work/catalog_embeddings/{key}"

    def progress(done: int, total: int, report) -> None:
        context.log.info(f"embedded {done}/{total} listings ({report.chunks_reused} chunks read back, "
                         f"{report.listings_per_second:.1f} listings/s)")

    embeddings, report = embed_resumably(encoder, inputs, store, job, config.chunk_size, progress)
    table = embeddings_table(inputs.listing_ids, raw_catalog["product_id"].to_list(), embeddings)
    quality = validate_frame(embedding_health(table), "catalog_embeddings", embedding_expectations(raw_catalog.height))
    store.delete_prefix(job + "/")
    return dg.MaterializeResult(
        value=table,
        metadata={"dagster/row_count": table.height, "dimension": int(table["embedding"].dtype.size), "encoder_version": agcl_encoder["model_version"],
                  **{f"job_{name}": value for name, value in report.as_metadata().items()}},
        check_results=[dg.AssetCheckResult(check_name="embeddings_healthy", passed=quality.passed, metadata=quality.as_metadata())],
    )


class RetrievalIndexConfig(dg.Config):
    """Defaults come from the library's IndexConfig."""

    kind: str = Field(default=IndexConfig.kind, description="'auto' (by catalog size: exact up to 100k listings, HNSW up to 10M, IVF-PQ "
                      "above), 'flat' (exact), 'hnsw', 'ivf' or 'ivfpq' (IVF-PQ re-ranked by 8-bit codes).")
    nlist: int = Field(default=IndexConfig.nlist, ge=0, description="IVF / IVF-PQ: coarse lists (0: about 4·sqrt(listings)).")
    nprobe: int = Field(default=IndexConfig.nprobe, ge=1, description="IVF / IVF-PQ: lists searched per query.")
    pq_m: int = Field(default=IndexConfig.pq_m, ge=1, description="IVF-PQ: sub-quantizers per vector (must divide the embedding size).")
    pq_nbits: int = Field(default=IndexConfig.pq_nbits, ge=1, description="IVF-PQ: bits per sub-quantizer code.")
    hnsw_m: int = Field(default=IndexConfig.hnsw_m, ge=1, description="HNSW: neighbours per node.")
    min_recall_at_10: float = Field(default=0.95, description="Blocking gate: every shard's recall@10 against exact search over its own "
                                    "vectors (a sample of them as queries, measured when the shard is built).")


@dg.asset(
    automation_condition=FOLLOWS_INPUTS,
    group_name="retrieval",
    kinds={"faiss"},
    check_specs=[dg.AssetCheckSpec("index_recall", asset="retrieval_index", blocking=True,
                                   description="Recall@10 of the worst product-line shard against exact search on a sample of its listings.")],
)
def retrieval_index(
    context: dg.AssetExecutionContext,
    config: RetrievalIndexConfig,
    raw_catalog: pl.DataFrame,
    catalog_embeddings: pl.DataFrame,
    agcl_encoder: dict,
    attribute_generator: dict,
    artifact_store: ArtifactStore,
):
    """A FAISS inner-product index over every listing, one shard per product line, published
    with its listing order and titles, the encoder version that embedded them and the generator
    that wrote their attributes. A refresh rebuilds only the shards of lines whose vectors
    changed; the others are found in the store as they were. IVF and IVF-PQ fill every shard
    from one template (coarse lists and codebooks) trained on a sample of the catalog and reused
    by later refreshes of the same encoder until the catalog drifts from it."""
    from afmrl_dagster.features import align
    from afmrl_dagster.retrieval.index import publish_index, resolve_kind
    from afmrl_dagster.retrieval.shards import publish_line_shards

    store = artifact_store.open()
    embeddings = catalog_embeddings["embedding"].to_numpy().astype(np.float32)
    listing_ids = catalog_embeddings["listing_id"].to_list()
    # What a served query needs of a listing: its ids, title and photo, and the text the visual reader's fusion matches.
    listings = align(raw_catalog.select("listing_id", "product_id", "product_line", "title", "image_uri", "description", "seller_attributes"),
                     listing_ids)
    index_config = IndexConfig(kind=config.kind, nlist=config.nlist, nprobe=config.nprobe, pq_m=config.pq_m, pq_nbits=config.pq_nbits,
                               hnsw_m=config.hnsw_m)
    plan = publish_line_shards(store, embeddings, listing_ids, listings["product_line"].to_list(), index_config,
                               family=fingerprint("index-template", agcl_encoder["uri"], index_config))
    for line in plan.built:
        context.log.info(f"built the shard of product line {line!r}")
    context.log.info(f"{len(plan.built)} shards built, {len(plan.reused)} found unchanged in the store; template: {plan.template}")
    # Each shard's recall@10 against exact search over its own vectors, measured when it was built:
    # the gate takes the worst shard, and an unchanged line's shard is not downloaded to check it again.
    recall = plan.worst_recall
    kind = resolve_kind(index_config, len(embeddings))  # what 'auto' chose for this catalog's size
    key = fingerprint("retrieval_index", catalog_embeddings, index_config, plan.shards)
    manifest = publish_index(store, f"indexes/{key}", plan.shards, listings.drop("product_line"), {
        "fingerprint": key, "kind": kind, "recall_at_10_vs_exact": recall, "shard_recall_at_10": plan.recall,
        "encoder_version": agcl_encoder["model_version"], "encoder_uri": agcl_encoder["uri"],
        "generator_uri": attribute_generator["uri"], "generator_version": attribute_generator["model_version"],
        "catalog_snapshot": fingerprint("catalog", raw_catalog), "template": plan.template_key,
    })
    return dg.MaterializeResult(
        value=manifest,
        metadata={"uri": manifest["uri"], "rows": manifest["rows"], "kind": kind, "encoder_version": manifest["encoder_version"],
                  **plan.as_metadata()},
        check_results=[dg.AssetCheckResult(check_name="index_recall", passed=recall >= config.min_recall_at_10,
                                           metadata={"recall_at_10_vs_exact": recall, "threshold": config.min_recall_at_10,
                                                     "worst_shard": min(plan.recall, key=plan.recall.get) if plan.recall else "none"})],
    )


class EvaluationConfig(dg.Config):
    example_queries: int = Field(default=6, ge=0, description="Test queries drawn with their top-4 results in the metadata picture.")
    gate_metric: str = Field(default="recall@1", description="Metric of the quality gates (on validation products).")
    min_gate_metric: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Blocking gate: the AGCL encoder's validation gate_metric must reach this, or promotion is not considered.",
    )
    min_gain_over_zero_shot: float = Field(
        default=0.0, ge=-1.0, le=1.0,
        description="Blocking gate: the AGCL encoder's validation gate_metric must exceed the zero-shot towers' by more than this "
        "(a negative value tolerates a trained encoder that far below the towers, e.g. on a catalog too small to tell them apart).",
    )
    reader_fusion: bool = Field(
        default=True,
        description="Read every held-out query photo with the visual reader (OCR; cached per listing in the store) and fuse its text "
        "into the AGCL encoder's search with the weight that does best on validation (0: the reader does not help, nothing is "
        "fused); the weight is tagged on the model version and served by afmrl search.",
    )


EVALUATED_ENCODERS = ("zero-shot towers (title)", "zero-shot towers (title + attributes)", "AGCL encoder (title + attributes)")
FUSED_ENCODER = "AGCL encoder + visual reader (fused at search)"


@dg.asset(
    automation_condition=FOLLOWS_INPUTS,
    group_name="retrieval",
    kinds={"mlflow"},
    check_specs=[
        dg.AssetCheckSpec("metrics_in_bounds", asset="retrieval_evaluation", blocking=True, description="Every metric is a probability (Great Expectations)."),
        dg.AssetCheckSpec("meets_quality_floor", asset="retrieval_evaluation", blocking=True,
                          description="The AGCL encoder's validation gate metric reaches the configured floor; promotion waits on it."),
        dg.AssetCheckSpec("trained_beats_zero_shot", asset="retrieval_evaluation", blocking=True,
                          description="On validation products the AGCL encoder beats the zero-shot towers by more than the configured gain."),
    ],
)
def retrieval_evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    raw_catalog: pl.DataFrame,
    listing_features: pl.DataFrame,
    generated_attributes: pl.DataFrame,
    catalog_embeddings: pl.DataFrame,
    agcl_encoder: dict,
    evaluation_split: EvaluationSplit,
    mlflow_tracking: MlflowTracking,
    artifact_store: ArtifactStore,
):
    """Identical-product retrieval on products unseen in training: R@1/5/10 and mAP@10 of the
    zero-shot towers and the AGCL encoder, on *validation* products (the gates and the promotion
    read these) and on *test* products (reported, never used to decide). Logged to MLflow and
    tagged on the encoder's model version, with a picture of test queries and their top results.
    With ``reader_fusion``, the visual reader's text of each held-out query photo is fused into
    the AGCL encoder's search with the weight chosen on validation, tagged for serving."""
    from afmrl_dagster.encoders.dual_tower import zero_shot_embeddings
    from afmrl_dagster.encoders.towers import decode_image
    from afmrl_dagster.evaluation.report import REPORTED_METRICS, results_markdown
    from afmrl_dagster.evaluation.scoring import evaluate_parts, evaluation_set_fingerprint
    from afmrl_dagster.features import align, listing_features as features_of, served_listing_features
    from afmrl_dagster.plots import held_out_examples_png
    from afmrl_dagster.quality import metric_expectations, validate_frame
    from afmrl_dagster.registry import ENCODER_MODEL_NAME
    from afmrl_dagster.serving import reader_fusion_tags

    if config.gate_metric not in REPORTED_METRICS:
        raise ValueError(f"gate_metric {config.gate_metric!r} is not a reported metric; choose from {list(REPORTED_METRICS)}")
    split = evaluation_split.split()
    ids = raw_catalog["listing_id"].to_list()
    trained = align(catalog_embeddings, ids)["embedding"].to_numpy().astype(np.float32)
    embeddings = {
        EVALUATED_ENCODERS[0]: zero_shot_embeddings(features_of(listing_features, ids)),
        EVALUATED_ENCODERS[1]: zero_shot_embeddings(served_listing_features(listing_features, generated_attributes, ids)),
        EVALUATED_ENCODERS[2]: trained,
    }
    scores = {name: evaluate_parts(raw_catalog, matrix, split) for name, matrix in embeddings.items()}
    fusion = None
    if config.reader_fusion:
        from afmrl_dagster.attributes.annotation_cache import AnnotationCache
        from afmrl_dagster.evaluation.fusion import evaluate_reader_fusion

        fusion = evaluate_reader_fusion(raw_catalog, trained, split, artifact_store.read_uri, AnnotationCache(artifact_store.open()),
                                        config.gate_metric, progress=lambda done, total: context.log.info(f"visual reader: {done}/{total} query photos"))
        scores[FUSED_ENCODER] = fusion.scores
    results = pl.DataFrame([{"encoder": name, "products": f"unseen ({part})", **scores[name][part]} for part in ("validation", "test") for name in scores])
    validation = {name: scores[name]["validation"] for name in embeddings}
    candidate, zero_shot = validation[EVALUATED_ENCODERS[2]], validation[EVALUATED_ENCODERS[0]]
    validation_mask, test_mask = split.mask(raw_catalog, "validation"), split.mask(raw_catalog, "test")
    evaluation_set = evaluation_set_fingerprint(raw_catalog, validation_mask)

    with mlflow_tracking.start_run(context, "retrieval_evaluation", params={
        "encoder_version": agcl_encoder["model_version"], "validation_queries": int(validation_mask.sum()),
        "test_queries": int(test_mask.sum()), "evaluation_set": evaluation_set,
    }) as run:
        for name in scores:
            prefix = ("agcl_reader_fused" if name == FUSED_ENCODER else
                      name.split(" (")[0].replace(" ", "_").replace("-", "_") + ("_attrs" if "attributes" in name else "_title"))
            for part in ("validation", "test"):
                mlflow_tracking.log_metrics({f"{part}_{prefix}_{m}": scores[name][part][m] for m in REPORTED_METRICS})
        if fusion is not None:
            mlflow_tracking.log_metrics({"reader_fusion_weight": fusion.weight})
        picture = held_out_examples_png(raw_catalog, trained, test_mask, lambda uri: decode_image(artifact_store.read_uri(uri)), config.example_queries)
        mlflow_tracking.log_png(picture, "retrieval_examples.png")
    store = artifact_store.open()
    picture_key = f"reports/retrieval_evaluation/{evaluation_set}/retrieval_examples.png"
    store.put_bytes(picture_key, picture)
    quality = validate_frame(results.select(REPORTED_METRICS), "retrieval_metrics", metric_expectations({m: (0.0, 1.0) for m in REPORTED_METRICS}))
    version = agcl_encoder["model_version"]
    tag_model_version(mlflow_tracking, context, agcl_encoder, {**{f"validation_{m}": candidate[m] for m in REPORTED_METRICS},
                                                              **{f"test_{m}": scores[EVALUATED_ENCODERS[2]]["test"][m] for m in REPORTED_METRICS}},
                      catalog=raw_catalog)
    mlflow_tracking.client().set_model_version_tag(ENCODER_MODEL_NAME, version, "evaluation_set", evaluation_set)
    for name, value in reader_fusion_tags(fusion.weight if fusion is not None else 0.0).items():
        mlflow_tracking.client().set_model_version_tag(ENCODER_MODEL_NAME, version, name, value)

    gain = float(candidate[config.gate_metric] - zero_shot[config.gate_metric])
    test_row = scores[EVALUATED_ENCODERS[2]]["test"]
    return dg.MaterializeResult(
        value=results,
        metadata={
            "results": dg.MetadataValue.md(results_markdown(results, caption="Products unseen in training: validation decides, test is reported.")),
            "validation_queries": int(validation_mask.sum()),
            "test_queries": int(test_mask.sum()),
            "gallery": len(ids),
            "recall@1": float(test_row["recall@1"]),
            "map@10": float(test_row["map@10"]),
            "validation_recall@1": float(candidate["recall@1"]),
            **({} if fusion is None else {
                "reader_fusion_weight": fusion.weight,
                "reader_fusion_validation": dg.MetadataValue.json({f"{weight:.2f}": value for weight, value in fusion.validation_by_weight.items()}),
                "reader_fusion_test_recall@1": float(fusion.scores["test"]["recall@1"]),
                "query_photos_read": fusion.photos_read, "queries_with_reader_text": fusion.queries_with_text,
            }),
            "encoder_version": version,
            "evaluation_set": evaluation_set,
            "retrieval_examples": png_metadata(picture, "Test queries (grey) and their top results: green = same product, red = another."),
            "retrieval_examples_uri": dg.MetadataValue.path(store.uri(picture_key)),
            "mlflow_run_id": run.info.run_id,
            "mlflow_run": mlflow_tracking.run_link(run.info.run_id),
        },
        check_results=[
            dg.AssetCheckResult(check_name="metrics_in_bounds", passed=quality.passed, metadata=quality.as_metadata()),
            dg.AssetCheckResult(check_name="meets_quality_floor", passed=bool(candidate[config.gate_metric] >= config.min_gate_metric),
                                metadata={config.gate_metric: float(candidate[config.gate_metric]), "floor": config.min_gate_metric, "products": "validation"}),
            dg.AssetCheckResult(check_name="trained_beats_zero_shot", passed=gain > config.min_gain_over_zero_shot,
                                metadata={f"trained_{config.gate_metric}": float(candidate[config.gate_metric]),
                                          f"zero_shot_{config.gate_metric}": float(zero_shot[config.gate_metric]),
                                          "gain": gain, "required_gain": config.min_gain_over_zero_shot, "products": "validation"}),
        ],
    )


class PromotionConfig(dg.Config):
    promotion_metric: str = Field(default="recall@1", description="Metric the champion is chosen by (on validation products).")
    promotion_margin: float = Field(default=0.0, ge=0.0, description="The best candidate must beat the champion by more than this.")
    promotion_confidence: float = Field(
        default=PROMOTION_CONFIDENCE, ge=0.5, lt=1.0,
        description="The gain over the champion must stay above the margin at this one-sided confidence (paired bootstrap over the "
                    "validation queries), so a difference of a few queries never moves the champion.",
    )


@dg.asset(
    automation_condition=FOLLOWS_EVALUATION,
    group_name="retrieval",
    kinds={"mlflow"},
    pool=GPU_POOL, op_tags=GPU_OP_TAGS,  # re-scoring a champion from an earlier run runs the towers
)
def encoder_promotion(
    context: dg.AssetExecutionContext,
    config: PromotionConfig,
    raw_catalog: pl.DataFrame,
    listing_features: pl.DataFrame,
    generated_attributes: pl.DataFrame,
    retrieval_evaluation: pl.DataFrame,
    retrieval_index: dict,
    agcl_encoder: dict,
    cit_encoder: dict,
    feature_towers: FeatureTowers,
    evaluation_split: EvaluationSplit,
    torch_compute: TorchCompute,
    mlflow_tracking: MlflowTracking,
    artifact_store: ArtifactStore,
):
    """The one promotion path: the only writer of the ``champion`` aliases.

    Candidates are the AGCL encoder (served with the distilled generator's attributes and its
    index) and the CIT encoder (served with the RAR generator's attributes and its own index),
    each scored on the validation products. The best one becomes ``champion`` of
    ``afmrl-encoder``, and its generator ``champion`` of ``afmrl-attribute-generator``, only when
    it beats the current champion, re-scored on the same validation queries with the generator
    it serves with, by more than the margin. Runs only after the evaluation's blocking checks
    pass. The replaced champion stays under ``previous_champion`` (``afmrl rollback``).
    """
    from afmrl_dagster.evaluation.scoring import evaluation_set_fingerprint, score_registered_version, score_served
    from afmrl_dagster.promotion import (Candidate, best_candidate, failed_blocking_checks, move_champion, paired_difference,
                                         promotion_decision)
    from afmrl_dagster.registry import ENCODER_MODEL_NAME, GENERATOR_MODEL_NAME
    from afmrl_dagster.serving import serving_tags
    from afmrl_dagster.training.generator_backends import catalog_attributes

    metric = config.promotion_metric
    split = evaluation_split.split()
    validation_mask = split.mask(raw_catalog, "validation")
    evaluation_set = evaluation_set_fingerprint(raw_catalog, validation_mask)
    agcl_row = retrieval_evaluation.filter((pl.col("encoder") == EVALUATED_ENCODERS[2]) & (pl.col("products") == "unseen (validation)")).row(0, named=True)
    candidates = [
        Candidate("AGCL encoder", agcl_encoder["model_version"], agcl_row, evaluation_set,
                  serving_tags(agcl_encoder["uri"], retrieval_index, retrieval_index["generator_uri"], retrieval_index["generator_version"], evaluation_set),
                  failed_blocking_checks(agcl_encoder)),
        Candidate("CIT encoder", cit_encoder["model_version"], cit_encoder["validation"], cit_encoder["evaluation_set"],
                  serving_tags(cit_encoder["uri"], cit_encoder["index"], cit_encoder["index"]["generator_uri"],
                               cit_encoder["index"]["generator_version"], cit_encoder["evaluation_set"]),
                  failed_blocking_checks(cit_encoder)),
    ]
    best, notes = best_candidate(candidates, metric, evaluation_set)
    for note in notes:
        context.log.info(note)
    if best is None:
        raise dg.Failure("no candidate encoder was scored on the current validation set", metadata={"notes": "\n".join(notes)})

    client = mlflow_tracking.client()
    champion = mlflow_tracking.champion_version(ENCODER_MODEL_NAME)
    champion_version = str(champion.version) if champion else None
    candidate_metrics, champion_metrics, paired = best.metrics, None, None
    if champion_version is not None and champion_version != best.version:
        # Both scored here, query by query, as each is served (weights and the generator it serves with),
        # on the same validation queries: the paired comparison decides whether the gain is real.
        device = torch_compute.torch_device()
        served = dict(
            catalog=raw_catalog, features_table=listing_features, attributes_table=generated_attributes,
            attributes_generator_uri=retrieval_index["generator_uri"], query_mask=validation_mask,
            gallery_mask=split.gallery_mask(raw_catalog, "validation"), store=artifact_store.open(),
            text_featurizer=feature_towers.text_featurizer(device), device=device, log=context.log.info, read_bytes=artifact_store.read_uri,
            write_attributes=lambda uri: catalog_attributes(artifact_store.open(), uri, raw_catalog, listing_features, artifact_store.read_uri, device),
        )
        champion_scores = score_registered_version(champion, **served)
        best_scores = score_served(best.serving_tags, f"{best.name} version {best.version}", f"models:/{ENCODER_MODEL_NAME}/{best.version}", **served)
        candidate_metrics, champion_metrics = best_scores.metrics, champion_scores.metrics
        if metric not in best_scores.values:
            raise dg.Failure(f"promotion metric {metric!r} has no per-query values (choose one of {sorted(best_scores.values)})")
        paired = paired_difference(dict(zip(best_scores.listing_ids, best_scores.values[metric])),
                                   dict(zip(champion_scores.listing_ids, champion_scores.values[metric])), config.promotion_confidence)
    decision = promotion_decision(best.version, candidate_metrics, champion_version, champion_metrics, metric, config.promotion_margin, paired)
    reason = f"{best.name}: {decision.reason}"
    if decision.promote:
        for key, value in best.serving_tags.items():  # servable before it becomes champion
            client.set_model_version_tag(ENCODER_MODEL_NAME, best.version, key, value)
        move_champion(client, ENCODER_MODEL_NAME, best.version, reason)
        generator_version = best.serving_tags["serving.generator_version"]
        if generator_version:
            move_champion(client, GENERATOR_MODEL_NAME, generator_version, f"serves with {ENCODER_MODEL_NAME} version {best.version}")
    for candidate in candidates:
        client.set_model_version_tag(ENCODER_MODEL_NAME, candidate.version, "promotion_decision", (reason if candidate is best else
                                     next((n for n in notes if n.startswith(f"{candidate.name} ")), reason))[:5000])
    context.log.info(f"promotion: {reason}")
    champion_after = best.version if decision.promote else champion_version
    value = {
        "candidate_version": best.version, "candidate_name": best.name, "champion_before": champion_version, "champion_after": champion_after,
        "promoted": decision.promote, "reason": reason, "notes": notes, "metric": metric,
        "candidate": float(candidate_metrics[metric]),
        "paired": None if paired is None else paired.__dict__,
        "champion": None if champion_metrics is None else float(champion_metrics[metric]),
        "candidates": {c.name: {"version": c.version, metric: float(c.metrics[metric]), "evaluation_set": c.evaluation_set} for c in candidates},
        "evaluation_set": evaluation_set,
    }
    return dg.MaterializeResult(
        value=value,
        metadata={
            "promoted": decision.promote,
            "promotion": reason,
            "champion_before": champion_version or "none",
            "champion_after": champion_after or "none",
            f"candidate_{metric}": value["candidate"],
            **{f"{name.split()[0].lower()}_{metric}": entry[metric] for name, entry in value["candidates"].items()},
            **({} if value["champion"] is None else {f"champion_{metric}": value["champion"]}),
        },
    )


@dg.asset(automation_condition=FOLLOWS_INPUTS, group_name="retrieval", kinds={"json"})
def serving_record(context: dg.AssetExecutionContext, encoder_promotion: dict, mlflow_tracking: MlflowTracking, artifact_store: ArtifactStore):
    """What answers queries: the champion encoder version and its weights, the index built with
    it, the generator that writes query attributes, the catalog snapshot and the validation
    set the promotion compared on. Published atomically to ``serving/record.json`` of the
    artefact store; ``afmrl search``, ``afmrl evaluate --encoder champion`` and the
    benchmarks read only this record."""
    from afmrl_dagster.registry import ENCODER_MODEL_NAME
    from afmrl_dagster.serving import publish_champion_record

    record, uri = publish_champion_record(mlflow_tracking.client(), artifact_store.open(), ENCODER_MODEL_NAME)
    return dg.MaterializeResult(
        value=record.__dict__,
        metadata={"uri": dg.MetadataValue.path(uri), "encoder_version": record.encoder_version, "index_uri": record.index_uri,
                  "index_rows": record.index_rows, "generator_uri": record.generator_uri, "catalog_snapshot": record.catalog_snapshot},
    )
