"""Stage 3: the encoder, trained with attribute-guided contrastive learning (AGCL)."""


import json
import shutil

import dagster as dg
import polars as pl
from pydantic import Field

from afmrl_dagster.encoders.dual_tower import DualTowerConfig
from afmrl_dagster.encoders.finetune import FinetuneConfig
from afmrl_dagster.encoders.vlm2vec import VLM2VecTrainingSettings
from afmrl_dagster.training.agcl import AGCLConfig
from afmrl_dagster.training.encoder_training import EncoderTrainingConfig

from ..resources.compute import GPU_OP_TAGS, GPU_POOL, TorchCompute
from ..resources.models import EvaluationSplit, FeatureTowers, ListingEncoderBackend
from ..resources.storage import ArtifactStore
from ..resources.tracking import MlflowTracking
from .publishing import (
    check_results,
    model_check,
    model_metadata,
    model_slot,
    png_metadata,
    publish_model,
    tag_model_version,
    weights_finite,
)


class EncoderTrainingRunConfig(dg.Config):
    """Defaults come from the library: EncoderTrainingConfig, AGCLConfig and DualTowerConfig."""

    epochs: int = Field(default=EncoderTrainingConfig.epochs, description="Passes over the training products.")
    batch_size: int = Field(default=EncoderTrainingConfig.batch_size, description="(anchor, positive) pairs per batch.")
    learning_rate: float = Field(default=EncoderTrainingConfig.learning_rate, description="Peak learning rate (warmup + cosine).")
    embed_dim: int = Field(default=DualTowerConfig.embed_dim, description="Embedding size.")
    use_attribute_weights: bool = Field(default=AGCLConfig.use_weights,
                                        description="AGCL weights exp(1 + tanh(BM25)) on negatives; off = plain InfoNCE weights.")
    use_false_negative_mask: bool = Field(default=AGCLConfig.use_false_negative_mask, description="Drop negatives with s_ij > s_ii + delta.")
    delta: float = Field(default=AGCLConfig.delta, description="Margin of the false-negative mask.")
    bm25_normalisation: str = Field(default=AGCLConfig.bm25_normalisation,
                                    description="BM25 row scale before tanh: 'raw' (the paper's), 'positive' (B_ij / B_ii) or 'zscore'.")
    bm25_tokenizer: str = Field(default=EncoderTrainingConfig.bm25_tokenizer,
                                description="BM25 terms: 'words' (the paper's) or 'pairs' (one term per key=value fact).")
    pairs_per_product: int = Field(default=EncoderTrainingConfig.pairs_per_product,
                                   description="(anchor, positive) pairs of a product per epoch, side by side in the batches.")
    sampler: str = Field(default=EncoderTrainingConfig.sampler, description="'product_line' (siblings as hard negatives) or 'random'.")
    seed: int = Field(default=EncoderTrainingConfig.seed, description="Seed of initialisation and batching.")
    finetune_image_blocks: int = Field(default=FinetuneConfig.image_blocks,
                                       description="dual-tower-finetune backend: last blocks of the image tower trained with the head.")
    finetune_text_layers: int = Field(default=FinetuneConfig.text_layers,
                                      description="dual-tower-finetune backend: last layers of the text tower trained with the head.")
    finetune_tower_learning_rate_scale: float = Field(default=FinetuneConfig.tower_learning_rate_scale,
                                                      description="dual-tower-finetune backend: the towers learn at this times learning_rate.")
    vlm2vec_learning_rate: float = Field(default=VLM2VecTrainingSettings.learning_rate,
                                         description="vlm2vec backend: peak learning rate of the LoRA adapters (learning_rate is the heads').")
    vlm2vec_lora_rank: int = Field(default=VLM2VecTrainingSettings.lora_rank, description="vlm2vec backend: rank of the LoRA adapters.")
    vlm2vec_image_size: int = Field(default=VLM2VecTrainingSettings.image_size,
                                    description="vlm2vec backend: photos are resized to this square side (bounds image tokens).")
    checkpoint_every_steps: int = Field(default=EncoderTrainingConfig.checkpoint_every_steps, ge=0,
                                        description="Checkpoint every this many optimizer steps (0: after every epoch); a killed run "
                                                    "resumes from the last one. Does not change the model, nor its cache key.")


NOT_IN_MODEL_KEY = {"checkpoint_every_steps"}  # run-config fields that change how a training runs, never what it learns


@dg.asset(
    group_name="encoder",
    kinds={"pytorch", "mlflow"},
    pool=GPU_POOL, op_tags=GPU_OP_TAGS,
    check_specs=[
        dg.AssetCheckSpec("encoder_weights_finite", asset="agcl_encoder", blocking=True, description="No NaN or inf in the trained head."),
        dg.AssetCheckSpec("encoder_loss_decreased", asset="agcl_encoder", description="The last epoch's loss is below the first's."),
    ],
)
def agcl_encoder(
    context: dg.AssetExecutionContext,
    config: EncoderTrainingRunConfig,
    raw_catalog: pl.DataFrame,
    teacher_attributes: pl.DataFrame,
    listing_features: pl.DataFrame,
    feature_towers: FeatureTowers,
    evaluation_split: EvaluationSplit,
    listing_encoder: ListingEncoderBackend,
    torch_compute: TorchCompute,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
):
    """The retrieval encoder the ``listing_encoder`` resource names (``AFMRL_ENCODER``), trained with AGCL.

    ``dual-tower`` (default): projections over the frozen towers' cached features;
    ``dual-tower-finetune``: the towers' last blocks too, on raw photos and text;
    ``vlm2vec:<model>``: LoRA adapters of a vision-language model. Input text is the title with
    the teacher's attributes appended; BM25 between attribute texts weights hard negatives and
    a similarity margin drops likely false negatives (``use_attribute_weights`` and
    ``use_false_negative_mask`` off give plain InfoNCE through the same code). Trained on
    training products only; logged to MLflow with a loss curve and registered as ``afmrl-encoder``.
    """
    import torch

    from afmrl_dagster.attributes.format import attributes_to_text
    from afmrl_dagster.encoders.listing_encoder import ListingInputs, load_encoder
    from afmrl_dagster.features import align, listing_features as features_of
    from afmrl_dagster.plots import curve_png
    from afmrl_dagster.registry import ENCODER_MODEL_NAME
    from afmrl_dagster.training.checkpoints import checkpoint_step
    from afmrl_dagster.training.encoder_training import TrainingResult, train_backend_encoder
    from afmrl_dagster.training.training_job import EncoderJob, write_encoder_job

    store = artifact_store.open()
    split = evaluation_split.split()
    backend = listing_encoder.backend()
    slot = model_slot(store, "agcl_encoder", raw_catalog, teacher_attributes, listing_features, config.model_dump(exclude=NOT_IN_MODEL_KEY), split,
                      backend.spec, feature_towers.as_json())
    if slot.cached:
        return slot.cached

    device = torch_compute.torch_device()
    train_rows = raw_catalog.filter(~pl.Series(split.query_mask(raw_catalog)))
    ids, titles = train_rows["listing_id"].to_list(), train_rows["title"].to_list()
    teacher = align(teacher_attributes, ids)
    attributes = [json.loads(text) if text else None for text in teacher["attributes_json"].to_list()]
    # The frozen towers' features are cached per listing: the head reads them, a fine-tuned pair
    # of towers starts its head from them; a VLM reads only the photos and texts.
    features = None if backend.kind == "vlm2vec" else features_of(listing_features, ids, feature_towers.text_featurizer(device), titles, attributes)
    inputs = ListingInputs(ids, titles, attributes, train_rows["image_uri"].to_list(), artifact_store.read_uri, features)
    options = {}
    if backend.kind == "dual-tower-finetune":
        options = {"unfrozen_blocks": config.finetune_image_blocks, "unfrozen_text_layers": config.finetune_text_layers,
                   "tower_learning_rate_scale": config.finetune_tower_learning_rate_scale}
    if backend.kind == "vlm2vec":
        options = {"lora_rank": config.vlm2vec_lora_rank, "image_size": config.vlm2vec_image_size}
    training = EncoderTrainingConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.vlm2vec_learning_rate if backend.kind == "vlm2vec" else config.learning_rate,
        sampler=config.sampler,
        pairs_per_product=config.pairs_per_product,
        bm25_tokenizer=config.bm25_tokenizer,
        seed=config.seed,
        device=device,
        checkpoint_dir=torch_compute.checkpoint_dir("agcl_encoder", slot.key),
        checkpoint_every_steps=config.checkpoint_every_steps,
        agcl=AGCLConfig(use_weights=config.use_attribute_weights, use_false_negative_mask=config.use_false_negative_mask, delta=config.delta,
                        bm25_normalisation=config.bm25_normalisation),
        head=DualTowerConfig(
            embed_dim=config.embed_dim,
            image_tower=feature_towers.image_model,
            text_tower=feature_towers.text_model,
        ),
    )
    torch.manual_seed(config.seed)
    resumed_from = checkpoint_step(training.checkpoint_dir)
    if resumed_from is not None:
        context.log.info(f"resuming from the checkpoint in {training.checkpoint_dir} (optimizer step {resumed_from})")
    params = {**config.model_dump(), "train_listings": train_rows.height, "encoder_backend": backend.spec}
    with mlflow_tracking.start_run(context, "agcl_encoder", params=params) as run:
        def on_epoch(row: dict) -> None:
            mlflow_tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
            context.log.info(f"encoder epoch {row['epoch']}: loss {row['loss']:.4f}")

        attribute_texts = [attributes_to_text(a or {}) for a in attributes]
        if torch_compute.world_size > 1:
            # torchrun through Dagster Pipes: every rank reads the job, rank 0 reports each epoch back.
            job = write_encoder_job(training.checkpoint_dir + "-job", EncoderJob(
                backend.spec, options, training, inputs, train_rows["product_id"].to_list(), train_rows["product_line"].to_list(),
                attribute_texts))
            folder, history, reported = torch_compute.train_on_ranks(context, str(job))
            encoder = load_encoder(folder)
            for row in reported:
                mlflow_tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
            result = TrainingResult(head=getattr(encoder, "head", None), history=history, global_step=0, encoder=encoder)
        else:
            result = train_backend_encoder(
                backend,
                inputs,
                train_rows["product_id"].to_list(),
                train_rows["product_line"].to_list(),
                attribute_texts,
                training,
                on_epoch=on_epoch,
                **options,
            )

        curve = curve_png(result.history, ["loss", "temperature", "mean_negative_weight", "masked_fraction"], "epoch", "AGCL training")
        mlflow_tracking.log_png(curve, "training_curve.png")
        manifest = publish_model(
            context, "encoder", result.encoder.save, store, slot.prefix, ENCODER_MODEL_NAME, run,
            {
                "fingerprint": slot.key,
                "final_loss": result.history[-1]["loss"],
                "encoder_backend": backend.spec,
                "loss": "plain InfoNCE" if not (config.use_attribute_weights or config.use_false_negative_mask) else "AGCL",
                "checks": {
                    "encoder_weights_finite": model_check(weights_finite(result.encoder), blocking=True),
                    "encoder_loss_decreased": model_check(
                        result.history[-1]["loss"] < result.history[0]["loss"], blocking=False,
                        first_loss=float(result.history[0]["loss"]), final_loss=float(result.history[-1]["loss"]),
                    ),
                },
            },
        )
    torch_compute.discard_checkpoints("agcl_encoder", slot.key)
    shutil.rmtree(training.checkpoint_dir + "-job", ignore_errors=True)
    tag_model_version(mlflow_tracking, context, manifest, {"final_loss": result.history[-1]["loss"]}, catalog=raw_catalog)
    return dg.MaterializeResult(
        value=manifest,
        metadata={
            **model_metadata(manifest, mlflow_tracking),
            "resumed_from_step": resumed_from if resumed_from is not None else 0,
            "train_listings": train_rows.height,
            "encoder_backend": backend.spec,
            "training_processes": torch_compute.world_size,
            "first_loss": float(result.history[0]["loss"]),
            "final_loss": float(result.history[-1]["loss"]),
            "training_curve": png_metadata(curve, "AGCL training: loss, temperature, mean negative weight, masked share per epoch."),
        },
        check_results=check_results(manifest),
    )

