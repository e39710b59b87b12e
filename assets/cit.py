"""Stage 7: cyclic iterative training (CIT): the RAR generator rewrites the attributes and the
encoder trains another round with AGCL on a share of the training products."""


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
from .publishing import cached_manifest, cached_result, check_results, model_check, model_metadata, publish_model, tag_model_version, weights_finite
from .retrieval import _registered_head, load_encoder_head, parsed_attributes


def _save_index(store, fingerprint_: str, embeddings: np.ndarray, catalog: pl.DataFrame) -> str:
    import json

    from afmrl_dagster.retrieval.index import build_index, save_index

    prefix = f"indexes/{fingerprint_}"
    if not store.is_complete_directory(prefix):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "index"
            folder.mkdir()
            save_index(build_index(embeddings), folder / "index.faiss")
            catalog.select("listing_id", "product_id").write_parquet(folder / "listings.parquet")
            (folder / "manifest.json").write_text(json.dumps({"fingerprint": fingerprint_, "rows": len(embeddings)}))
            store.upload_directory(folder, prefix)
    return fingerprint_


class CITConfig(dg.Config):
    train_fraction: float = Field(default=0.3, description="Share of each line's training products the CIT round trains on (the paper: 30%).")
    epochs: int = Field(default=20, description="Passes over the CIT products.")
    batch_size: int = Field(default=32, description="(anchor, positive) pairs per batch.")
    learning_rate: float = Field(default=3e-4, description="Peak learning rate; lower than stage 1, the head starts trained.")
    promotion_margin: float = Field(default=0.0, description="The CIT encoder must beat the champion's R@1 by more than this.")
    seed: int = Field(default=0, description="Seed of the product choice and of training.")


@dg.asset(
    group_name="rar",
    kinds={"pytorch", "mlflow"},
    pool=GPU_POOL, op_tags=GPU_OP_TAGS,
    deps=["encoder_promotion"],  # the champion it must beat is decided there
    check_specs=[
        dg.AssetCheckSpec("cit_weights_finite", asset="cit_encoder", blocking=True, description="No NaN or inf in the CIT head."),
        dg.AssetCheckSpec("cit_keeps_recall", asset="cit_encoder", description="Held-out R@1 of the CIT encoder is not below the champion's."),
    ],
)
def cit_encoder(
    context: dg.AssetExecutionContext,
    config: CITConfig,
    raw_catalog: pl.DataFrame,
    listing_features: pl.DataFrame,
    generated_attributes: pl.DataFrame,
    agcl_encoder: dict,
    rar_generator: dict,
    feature_towers: FeatureTowers,
    evaluation_split: EvaluationSplit,
    torch_compute: TorchCompute,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
):
    """The AGCL encoder trained one more round on attributes the RAR generator writes.

    Starts from the stage-1 head; trains with AGCL on ``train_fraction`` of each line's training
    products, their text and BM25 both from the RAR attributes. Held-out queries then compare
    it, with RAR attributes on queries and gallery, against the registered champion re-scored
    on the same listings with the distilled generator's attributes. Registered as
    ``afmrl-encoder`` with alias ``cit``; it becomes the ``champion`` only when it is better by
    more than ``promotion_margin``.
    """
    from afmrl_dagster.attributes.format import attributes_to_text
    from afmrl_dagster.attributes.generator import load_stored_generator
    from afmrl_dagster.encoders.dual_tower import embed_features, save_head
    from afmrl_dagster.evaluation import REPORTED_METRICS, evaluate_embeddings
    from afmrl_dagster.features import listing_features as features_of
    from afmrl_dagster.promotion import promotion_decision
    from afmrl_dagster.registry import ENCODER_MODEL_NAME
    from afmrl_dagster.training.attribute_stages import CITSettings, cit_rows, train_cit_round, written_attributes

    store = artifact_store.open()
    split = evaluation_split.split()
    key = fingerprint("cit_encoder", raw_catalog, listing_features, agcl_encoder["fingerprint"], rar_generator["fingerprint"], config.model_dump(), split)
    prefix = f"models/cit_encoder/{key}"
    cached = cached_manifest(store, prefix)
    if cached:
        return cached_result(cached)

    device = torch_compute.torch_device()
    text_featurizer = feature_towers.text_featurizer(device)
    stage_one = load_encoder_head(store, agcl_encoder)
    generator, vocabulary = load_stored_generator(store, f"models/rar_generator/{rar_generator['fingerprint']}")
    ids, titles = raw_catalog["listing_id"].to_list(), raw_catalog["title"].to_list()
    products, lines = raw_catalog["product_id"].to_list(), raw_catalog["product_line"].to_list()
    base = features_of(listing_features, ids)
    rar_attributes = [parsed.attributes or {} for parsed in written_attributes(generator, vocabulary, base)[1]]
    with_rar = features_of(listing_features, ids, text_featurizer, titles, rar_attributes)

    query_mask = split.query_mask(raw_catalog)
    training = [i for i in range(len(ids)) if not query_mask[i]]
    rows = cit_rows(products, lines, training, config.train_fraction, config.seed)
    settings = CITSettings(train_fraction=config.train_fraction, epochs=config.epochs, batch_size=config.batch_size,
                           learning_rate=config.learning_rate, seed=config.seed, device=device)
    with mlflow_tracking.start_run(context, "cit_encoder", params={**config.model_dump(), "cit_listings": len(rows),
                                                                   "cit_products": len({products[i] for i in rows}),
                                                                   "stage_one_version": agcl_encoder["model_version"],
                                                                   "rar_version": rar_generator["model_version"]}) as run:
        result = train_cit_round(
            stage_one, with_rar.subset(rows), [products[i] for i in rows], [lines[i] for i in rows],
            [attributes_to_text(rar_attributes[i]) for i in rows], settings,
            on_epoch=lambda row: mlflow_tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"]),
        )
        gallery = embed_features(result.head, with_rar, device=device)
        candidate = evaluate_embeddings(raw_catalog, gallery, query_mask)
        champion = mlflow_tracking.champion_version(ENCODER_MODEL_NAME)
        champion_version = str(champion.version) if champion else None
        champion_metrics = None
        if champion_version is not None:
            with_sft = features_of(listing_features, ids, text_featurizer, titles, parsed_attributes(generated_attributes, ids))
            champion_head = _registered_head(ENCODER_MODEL_NAME, champion_version)
            champion_metrics = evaluate_embeddings(raw_catalog, embed_features(champion_head, with_sft, device=device), query_mask)
            mlflow_tracking.log_metrics({f"heldout_champion_{m}": champion_metrics[m] for m in REPORTED_METRICS})
        mlflow_tracking.log_metrics({f"heldout_cit_{m}": candidate[m] for m in REPORTED_METRICS})
        keeps = champion_metrics is None or candidate["recall@1"] >= champion_metrics["recall@1"]
        manifest = publish_model(
            context, "encoder", lambda folder: save_head(result.head, folder), store, prefix, ENCODER_MODEL_NAME, run,
            {
                "fingerprint": key,
                "heldout": {"cit": candidate, "champion": champion_metrics},
                "champion_version_compared": champion_version,
                "checks": {
                    "cit_weights_finite": model_check(weights_finite(result.head), blocking=True),
                    "cit_keeps_recall": model_check(keeps, blocking=False, cit_recall_at_1=candidate["recall@1"],
                                                    champion_recall_at_1=None if champion_metrics is None else champion_metrics["recall@1"]),
                },
            },
        )
    tag_model_version(mlflow_tracking, context, manifest, {f"heldout_{m}": candidate[m] for m in REPORTED_METRICS}, catalog=raw_catalog)
    mlflow_tracking.client().set_registered_model_alias(ENCODER_MODEL_NAME, "cit", manifest["model_version"])
    decision = promotion_decision(manifest["model_version"], candidate, champion_version, champion_metrics, "recall@1", config.promotion_margin)
    if decision.promote:
        mlflow_tracking.promote(ENCODER_MODEL_NAME, manifest["model_version"], f"CIT: {decision.reason}")
    context.log.info(f"CIT promotion: {decision.reason}")
    # The CIT encoder's own index (gallery with RAR attributes), so that search can serve it
    # once it is the champion: search picks the index built with the champion's version.
    index = _save_index(store, f"cit-{key}", gallery, raw_catalog)
    manifest = {  # the asset value; the stored model manifest stays as registered
        **manifest, "promoted": decision.promote, "promotion": decision.reason,
        "index": {"fingerprint": index, "encoder_version": manifest["model_version"],
                  "generator_prefix": f"models/rar_generator/{rar_generator['fingerprint']}"},
    }
    return dg.MaterializeResult(
        value=manifest,
        metadata={
            **model_metadata(manifest, mlflow_tracking),
            "cit_listings": len(rows),
            "heldout_cit_recall@1": candidate["recall@1"],
            **({} if champion_metrics is None else {"heldout_champion_recall@1": champion_metrics["recall@1"]}),
            "promoted": decision.promote,
            "promotion": decision.reason,
        },
        check_results=check_results(manifest),
    )
