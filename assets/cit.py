"""Stage 7: cyclic iterative training (CIT): the RAR generator rewrites the attributes and the
encoder trains another round with AGCL on a share of the training products. The result is a
candidate for ``encoder_promotion``, like the AGCL encoder; it never moves ``champion`` itself."""


import dagster as dg
import polars as pl
from pydantic import Field

from afmrl_dagster.fingerprint import fingerprint
from afmrl_dagster.training.attribute_stages import CITSettings

from ..resources.compute import GPU_OP_TAGS, GPU_POOL, TorchCompute
from ..resources.models import EvaluationSplit, FeatureTowers
from ..resources.storage import ArtifactStore
from ..resources.tracking import MlflowTracking
from .publishing import check_results, model_check, model_metadata, model_slot, publish_model, tag_model_version, weights_finite


class CITConfig(dg.Config):
    """Defaults come from the library's CITSettings."""

    train_fraction: float = Field(default=CITSettings.train_fraction,
                                  description="Share of each line's training products the CIT round trains on (the paper: 30%).")
    epochs: int = Field(default=CITSettings.epochs, description="Passes over the CIT products.")
    batch_size: int = Field(default=CITSettings.batch_size, description="(anchor, positive) pairs per batch.")
    learning_rate: float = Field(default=CITSettings.learning_rate, description="Peak learning rate; lower than stage 1, the head starts trained.")
    seed: int = Field(default=CITSettings.seed, description="Seed of the product choice and of training.")
    checkpoint_every_steps: int = Field(default=CITSettings.checkpoint_every_steps, ge=0,
                                        description="Checkpoint every this many optimizer steps (0: after every epoch); a killed run "
                                                    "resumes from the last one. Does not change the model, nor its cache key.")


@dg.asset(
    group_name="rar",
    kinds={"pytorch", "mlflow", "faiss"},
    pool=GPU_POOL, op_tags=GPU_OP_TAGS,
    check_specs=[
        dg.AssetCheckSpec("cit_weights_finite", asset="cit_encoder", blocking=True, description="No NaN or inf in the CIT head."),
        dg.AssetCheckSpec("cit_keeps_recall", asset="cit_encoder",
                          description="Validation R@1 of the CIT encoder is not below the AGCL encoder's (served with its own attributes)."),
    ],
)
def cit_encoder(
    context: dg.AssetExecutionContext,
    config: CITConfig,
    raw_catalog: pl.DataFrame,
    listing_features: pl.DataFrame,
    retrieval_evaluation: pl.DataFrame,
    agcl_encoder: dict,
    rar_generator: dict,
    feature_towers: FeatureTowers,
    evaluation_split: EvaluationSplit,
    torch_compute: TorchCompute,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
):
    """The AGCL encoder trained one more round on attributes the RAR generator writes.

    Starts from the stage-1 encoder (any backend); trains with AGCL on ``train_fraction`` of each line's training
    products, their text and BM25 both from the RAR attributes. The whole catalog, with RAR
    attributes, is then embedded and indexed (the same index code as ``retrieval_index``) and
    scored on validation and test products. Registered as ``afmrl-encoder`` with alias ``cit``;
    ``encoder_promotion`` decides whether it serves. Runs only after the evaluation's blocking
    checks pass.
    """
    from afmrl_dagster.encoders.listing_encoder import load_stored_encoder
    from afmrl_dagster.evaluation.report import REPORTED_METRICS
    from afmrl_dagster.evaluation.scoring import evaluation_set_fingerprint
    from afmrl_dagster.registry import ENCODER_MODEL_NAME
    from afmrl_dagster.retrieval.index import build_index, publish_index
    from afmrl_dagster.training.attribute_stages import run_cit_stage
    from afmrl_dagster.training.generator_backends import load_stored_writer

    store = artifact_store.open()
    split = evaluation_split.split()
    slot = model_slot(store, "cit_encoder", raw_catalog, listing_features, agcl_encoder["fingerprint"], rar_generator["fingerprint"],
                      config.model_dump(exclude={"checkpoint_every_steps"}), split)
    if slot.cached:
        return slot.cached

    device = torch_compute.torch_device()
    stage_one = load_stored_encoder(store, agcl_encoder["uri"], device=device)
    writer = load_stored_writer(store, rar_generator["uri"], device=device)
    with mlflow_tracking.start_run(context, "cit_encoder", params={**config.model_dump(), "stage_one_version": agcl_encoder["model_version"],
                                                                   "rar_version": rar_generator["model_version"]}) as run:
        outcome = run_cit_stage(
            stage_one, writer, listing_features, raw_catalog, split, feature_towers.text_featurizer(device),
            CITSettings(**config.model_dump(), device=device, checkpoint_dir=torch_compute.checkpoint_dir("cit_encoder", slot.key)),
            on_epoch=lambda row: mlflow_tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"]),
            read_image=artifact_store.read_uri,
        )
        scores = outcome.scores
        for part, metrics in scores.items():
            mlflow_tracking.log_metrics({f"{part}_cit_{m}": metrics[m] for m in REPORTED_METRICS})
        index = publish_index(store, f"indexes/cit-{slot.key}", build_index(outcome.gallery),
                              raw_catalog.select("listing_id", "product_id", "title", "image_uri"), {
            "fingerprint": f"cit-{slot.key}", "kind": "flat", "encoder_uri": store.uri(slot.prefix),
            "generator_uri": rar_generator["uri"], "generator_version": rar_generator["model_version"],
            "catalog_snapshot": fingerprint("catalog", raw_catalog),
        })
        agcl = retrieval_evaluation.filter(pl.col("encoder").str.starts_with("AGCL") & (pl.col("products") == "unseen (validation)"))
        stage_one_r1 = float(agcl["recall@1"][0])
        manifest = publish_model(
            context, "encoder", outcome.encoder.save, store, slot.prefix, ENCODER_MODEL_NAME, run,
            {
                "fingerprint": slot.key,
                "validation": scores["validation"],
                "test": scores["test"],
                "evaluation_set": evaluation_set_fingerprint(raw_catalog, split.mask(raw_catalog, "validation")),
                "index": index,
                "cit_listings": len(outcome.rows),
                "checks": {
                    "cit_weights_finite": model_check(weights_finite(outcome.encoder), blocking=True),
                    "cit_keeps_recall": model_check(scores["validation"]["recall@1"] >= stage_one_r1, blocking=False,
                                                    cit_recall_at_1=scores["validation"]["recall@1"], agcl_recall_at_1=stage_one_r1),
                },
            },
        )
    torch_compute.discard_checkpoints("cit_encoder", slot.key)
    tag_model_version(mlflow_tracking, context, manifest, {f"{part}_{m}": scores[part][m] for part in scores for m in REPORTED_METRICS},
                      catalog=raw_catalog)
    mlflow_tracking.client().set_registered_model_alias(ENCODER_MODEL_NAME, "cit", manifest["model_version"])
    return dg.MaterializeResult(
        value=manifest,
        metadata={
            **model_metadata(manifest, mlflow_tracking),
            "cit_listings": len(outcome.rows),
            "validation_cit_recall@1": scores["validation"]["recall@1"],
            "test_cit_recall@1": scores["test"]["recall@1"],
            "index_uri": index["uri"],
        },
        check_results=check_results(manifest),
    )
