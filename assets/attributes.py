"""Stage 2: attributes. A teacher writes them for every listing; a student generator (compact,
or a Hugging Face VLM with LoRA: ``AFMRL_GENERATOR``) is distilled from the teacher (SFT) and
writes them for every listing, as it would for a query at search time."""


import json
import shutil

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from afmrl_dagster.fingerprint import fingerprint
from afmrl_dagster.training.attribute_stages import DistillationSettings
from afmrl_dagster.training.checkpoints import LoopCheckpoint
from afmrl_dagster.training.generator_backends import HFDistillationSettings

from ..resources.compute import GPU_OP_TAGS, GPU_POOL, TorchCompute
from ..resources.models import EvaluationSplit, FeatureTowers, GeneratorBackend
from ..resources.storage import ArtifactStore
from ..resources.teacher import AttributeTeacherBackend
from ..resources.tracking import MlflowTracking, flat_metrics
from .conditions import FOLLOWS_INPUTS
from .partitions import product_lines
from .publishing import (
    check_results,
    model_check,
    model_metadata,
    model_slot,
    publish_model,
    tag_model_version,
    weights_finite,
)

MAX_KEYS_PER_LINE = 40


class AttributeQualityConfig(dg.Config):
    min_valid_share: float = Field(default=0.95, description="Blocking gate: share of listings whose attributes parse.")


def _attribute_checks(asset: str) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec("attribute_parse_rate", asset=asset, blocking=True, description="Share of listings with parseable attributes (Great Expectations)."),
        dg.AssetCheckSpec("attribute_key_vocabulary", asset=asset, description="Keys stay within a small vocabulary per line."),
    ]


def _attribute_check_results(table: pl.DataFrame, min_valid_share: float, vocabulary: set[str] | None) -> list[dg.AssetCheckResult]:
    from afmrl_dagster.quality import attribute_expectations, attribute_key_expectations, validate_frame

    parse = validate_frame(table, "attributes", attribute_expectations(min_valid_share))
    keys = pl.DataFrame(
        {"key": [key for text in table.filter(pl.col("is_valid"))["attributes_json"].to_list() for key in json.loads(text)]},
        schema={"key": pl.Utf8},
    )
    if vocabulary is None:
        vocabulary_ok, details = keys["key"].n_unique() <= MAX_KEYS_PER_LINE, {"distinct_keys": keys["key"].n_unique()}
    else:
        report = validate_frame(keys, "attribute_keys", attribute_key_expectations(vocabulary))
        vocabulary_ok, details = report.passed, report.as_metadata()
    return [
        dg.AssetCheckResult(
            check_name="attribute_parse_rate",
            passed=parse.passed,
            metadata={"valid_share": float(table["is_valid"].mean() or 0.0), **parse.as_metadata()},
        ),
        dg.AssetCheckResult(
            check_name="attribute_key_vocabulary", passed=vocabulary_ok, severity=dg.AssetCheckSeverity.WARN, metadata=details
        ),
    ]


def _table_metadata(table: pl.DataFrame) -> dict:
    return {
        "dagster/row_count": table.height,
        "valid_share": float(table["is_valid"].mean() or 0.0),
        "mean_attributes": float(table["num_attributes"].mean() or 0.0),
        "examples": dg.MetadataValue.md(
            table.select("listing_id", "raw_text").head(5).to_pandas().to_markdown(index=False)
        ),
    }


@dg.asset(automation_condition=FOLLOWS_INPUTS, partitions_def=product_lines, group_name="attributes", kinds={"polars", "parquet"},
          check_specs=_attribute_checks("teacher_attributes"))
def teacher_attributes(
    context: dg.AssetExecutionContext,
    config: AttributeQualityConfig,
    raw_catalog: pl.DataFrame,
    artifact_store: ArtifactStore,
    attribute_teacher: AttributeTeacherBackend,
    torch_compute: TorchCompute,
):
    """Key attributes written by the teacher for every listing of the line, as strict JSON.

    Offline, the listing's seller attributes (normalised) stand in for the large MLLM
    teacher; with ``AFMRL_TEACHER=visual-reader`` an OCR reader of the listing photo writes
    them (the line's seller attributes and titles are the values it looks for); with
    ``AFMRL_TEACHER=openai-compatible`` a model served elsewhere writes them, with
    ``AFMRL_TEACHER=hf-vlm:<hub id or folder>`` a Hugging Face VLM in process (photo and text).
    Outputs are cached: the visual reader's, a served and an in-process teacher's per listing by content (image, title,
    description, model revision, prompt version), the seller reader's per line (it reads
    the whole line). Unchanged listings are not annotated again.
    """
    from afmrl_dagster.attributes.annotation_cache import AnnotationCache, annotate_with_cache
    from afmrl_dagster.attributes.teacher import SellerAttributeTeacher, annotate_listings, attribute_table

    teacher = attribute_teacher.build(read_image=artifact_store.read_uri, catalog=raw_catalog, device=torch_compute.torch_device())
    store = artifact_store.open()
    if isinstance(teacher, SellerAttributeTeacher):
        key = fingerprint("teacher_attributes", raw_catalog, teacher.name, teacher.version)
        cache_key = f"cache/teacher_attributes/{context.partition_key}/{key}.parquet"
        if store.exists(cache_key):
            table, status = store.read_parquet(cache_key), "cached"
        else:
            table, status = annotate_listings(teacher, raw_catalog), "computed"
            store.write_parquet(cache_key, table)
        counts = {}
    else:
        raw_texts, stats = annotate_with_cache(
            teacher, raw_catalog, AnnotationCache(store), read_image=artifact_store.read_uri,
            progress=lambda done, total: context.log.info(f"teacher: {done}/{total} listings annotated"),
        )
        table = attribute_table(raw_catalog["listing_id"].to_list(), raw_texts, f"{teacher.name}@{teacher.version}")
        status = "cached" if stats.generated == 0 else "computed"
        counts = {"listings_generated": stats.generated, "listings_cached": stats.cached}
    return dg.MaterializeResult(
        value=table,
        metadata={"status": status, "teacher": f"{teacher.name}@{teacher.version}", **counts, **_table_metadata(table)},
        check_results=_attribute_check_results(table, config.min_valid_share, None),
    )


class AttributeGeneratorConfig(dg.Config):
    """Defaults of the student and its SFT come from the library's DistillationSettings (compact)
    and HFDistillationSettings (hf-vlm)."""

    min_heldout_validity: float = Field(default=0.9, description="Blocking gate: share of parseable outputs on held-out listings.")
    epochs: int = Field(default=DistillationSettings.epochs, description="compact: SFT epochs over the training listings.")
    batch_size: int = Field(default=DistillationSettings.batch_size, description="compact: listings per SFT step.")
    learning_rate: float = Field(default=DistillationSettings.learning_rate, description="compact: peak learning rate (warmup + cosine).")
    d_model: int = Field(default=DistillationSettings.d_model, description="compact: width of the decoder.")
    n_layers: int = Field(default=DistillationSettings.n_layers, description="compact: decoder layers.")
    seed: int = Field(default=DistillationSettings.seed, description="Seed of initialisation and shuffling.")
    constrained_decoding: bool = Field(default=DistillationSettings.constrained_decoding,
                                       description="compact: decode within the attribute grammar, so every output parses.")
    hf_epochs: int = Field(default=HFDistillationSettings.hf_epochs, description="hf-vlm: LoRA SFT epochs over the training listings.")
    hf_batch_size: int = Field(default=HFDistillationSettings.hf_batch_size, description="hf-vlm: listings per SFT step and per generation batch.")
    hf_learning_rate: float = Field(default=HFDistillationSettings.hf_learning_rate, description="hf-vlm: learning rate of the LoRA adapter.")
    lora_rank: int = Field(default=HFDistillationSettings.lora_rank, description="hf-vlm: LoRA rank.")
    lora_alpha: int = Field(default=HFDistillationSettings.lora_alpha, description="hf-vlm: LoRA alpha.")
    hf_max_new_tokens: int = Field(default=HFDistillationSettings.hf_max_new_tokens, description="hf-vlm: longest attribute text in tokens.")
    hf_image_size: int = Field(default=HFDistillationSettings.hf_image_size, description="hf-vlm: photos are resized to a square of this side.")
    checkpoint_every: int = Field(default=LoopCheckpoint.every, ge=1, description="Checkpoint every this many SFT epochs; a killed run resumes from the "
                                                            "last one. Does not change the model, nor its cache key.")


_COMPACT_FIELDS = ("d_model", "n_layers", "constrained_decoding", "epochs", "batch_size", "learning_rate", "seed")
_HF_FIELDS = ("hf_epochs", "hf_batch_size", "hf_learning_rate", "lora_rank", "lora_alpha", "hf_max_new_tokens", "hf_image_size")


@dg.asset(
    group_name="attributes",
    kinds={"pytorch", "mlflow"},
    pool=GPU_POOL, op_tags=GPU_OP_TAGS,
    check_specs=[
        dg.AssetCheckSpec("generator_weights_finite", asset="attribute_generator", blocking=True, description="No NaN or inf in the trained weights."),
        dg.AssetCheckSpec("generator_heldout_validity", asset="attribute_generator", blocking=True,
                          description="Share of parseable outputs on held-out listings is at least min_heldout_validity."),
    ],
)
def attribute_generator(
    context: dg.AssetExecutionContext,
    config: AttributeGeneratorConfig,
    raw_catalog: pl.DataFrame,
    teacher_attributes: pl.DataFrame,
    listing_features: pl.DataFrame,
    feature_towers: FeatureTowers,
    evaluation_split: EvaluationSplit,
    torch_compute: TorchCompute,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
    generator_backend: GeneratorBackend,
):
    """The student generator distilled from the teacher (SFT), of the kind ``AFMRL_GENERATOR`` names.

    ``compact``: image and title features of the frozen towers form the prefix of a small
    transformer decoder that writes attribute JSON. ``hf-vlm:<id or folder>``: a Hugging Face
    VLM reads the photo and the listing text and is fine-tuned with LoRA; the registered folder
    holds the adapter and names the base model. Trained on the listings of training products
    (loss per epoch in MLflow), scored on held-out products against the teacher, registered
    as ``afmrl-attribute-generator``. With ``torch_compute``'s ``world_size`` above 1 the SFT runs
    on that many processes (``torchrun`` through Dagster Pipes, PyTorch DDP), as the encoder's does.
    """
    from afmrl_dagster.features import align
    from afmrl_dagster.registry import GENERATOR_MODEL_NAME
    from afmrl_dagster.training.generator_backends import CompactSFTSettings, distill_writer, listing_inputs, load_writer
    from afmrl_dagster.training.training_job import GeneratorJob, write_generator_job
    from afmrl_dagster.training.generator_sft import attribute_accuracy

    store = artifact_store.open()
    split = evaluation_split.split()
    slot = model_slot(store, "attribute_generator", raw_catalog, teacher_attributes, listing_features, config.model_dump(exclude={"checkpoint_every"}), split,
                      generator_backend.spec)
    if slot.cached:
        return slot.cached

    teacher = align(teacher_attributes, raw_catalog["listing_id"].to_list())
    held_out = split.query_mask(raw_catalog)
    valid = teacher["is_valid"].to_numpy()
    train_ids = [lid for lid, h, v in zip(raw_catalog["listing_id"], held_out, valid) if v and not h]
    test_ids = [lid for lid, h, v in zip(raw_catalog["listing_id"], held_out, valid) if v and h]
    if not train_ids:
        raise ValueError("teacher_attributes has no valid attributes for any training listing: the student has nothing to learn from")
    targets = {lid: json.loads(text) for lid, text in teacher.filter(pl.col("is_valid")).select("listing_id", "attributes_json").iter_rows()}

    settings = config.model_dump()
    compact = CompactSFTSettings(**{name: settings[name] for name in _COMPACT_FIELDS})
    hf = HFDistillationSettings(**{name: settings[name] for name in _HF_FIELDS})
    device = torch_compute.torch_device()
    params = {**settings, "generator": generator_backend.spec, "train_listings": len(train_ids)}
    inputs = listing_inputs(raw_catalog, listing_features, train_ids, artifact_store.read_uri)
    checkpoint = LoopCheckpoint(torch_compute.checkpoint_dir("attribute_generator", slot.key), {"loop": "sft"}, config.checkpoint_every)
    with mlflow_tracking.start_run(context, "attribute_generator_sft", params=params) as run:
        def on_epoch(row: dict) -> None:
            mlflow_tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
            context.log.info(f"SFT epoch {row['epoch']}: {row}")

        if torch_compute.world_size > 1:
            # torchrun through Dagster Pipes: every rank reads the job, rank 0 reports each epoch back.
            job = write_generator_job(checkpoint.directory + "-job", GeneratorJob(
                generator_backend.spec, inputs, [targets[lid] for lid in train_ids], compact, hf, device, checkpoint))
            folder, history, reported = torch_compute.train_on_ranks(context, str(job))
            writer = load_writer(folder, device=device)
            for row in reported:
                mlflow_tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
        else:
            writer, history = distill_writer(generator_backend.spec, inputs, [targets[lid] for lid in train_ids], compact, hf, device,
                                             on_epoch=on_epoch, checkpoint=checkpoint)
        import mlflow

        mlflow.log_params({f"generator_{k}": v for k, v in writer.describe().items()})
        predicted = writer.write(listing_inputs(raw_catalog, listing_features, test_ids, artifact_store.read_uri)) if test_ids else []
        accuracy = attribute_accuracy(predicted, [targets[lid] for lid in test_ids], writer.parse_keys) if test_ids else {"validity_rate": 0.0, "pair_f1": 0.0}
        mlflow_tracking.log_metrics({f"heldout_{k}": v for k, v in accuracy.items()})
        manifest = publish_model(
            context, "generator",
            lambda folder: writer.save(folder, extra_json={"towers.json": feature_towers.as_json()}),
            store, slot.prefix, GENERATOR_MODEL_NAME, run,
            {
                "fingerprint": slot.key,
                "generator": writer.describe(),
                "heldout_accuracy": accuracy,
                "first_loss": history[0]["loss"] if history else None,
                "final_loss": history[-1]["loss"] if history else None,
                "checks": {
                    "generator_weights_finite": model_check(weights_finite(writer.module), blocking=True),
                    "generator_heldout_validity": model_check(
                        accuracy["validity_rate"] >= config.min_heldout_validity, blocking=True,
                        validity_rate=accuracy["validity_rate"], threshold=config.min_heldout_validity,
                    ),
                },
            },
        )
    torch_compute.discard_checkpoints("attribute_generator", slot.key)
    shutil.rmtree(checkpoint.directory + "-job", ignore_errors=True)
    tag_model_version(mlflow_tracking, context, manifest, {"heldout_pair_f1": accuracy["pair_f1"], "heldout_validity_rate": accuracy["validity_rate"]},
                      catalog=raw_catalog)
    mlflow_tracking.client().set_registered_model_alias(GENERATOR_MODEL_NAME, "sft", manifest["model_version"])
    return dg.MaterializeResult(
        value=manifest,
        metadata={
            **model_metadata(manifest, mlflow_tracking),
            "generator": writer.kind,
            "training_processes": torch_compute.world_size,
            "train_listings": len(train_ids),
            "sft_loss_first": manifest["first_loss"],
            "sft_loss_last": manifest["final_loss"],
            **flat_metrics(accuracy, "heldout_"),
        },
        check_results=check_results(manifest),
    )


@dg.asset(automation_condition=FOLLOWS_INPUTS, partitions_def=product_lines, group_name="attributes", kinds={"pytorch", "parquet"},
          pool=GPU_POOL, op_tags=GPU_OP_TAGS, check_specs=_attribute_checks("generated_attributes"))
def generated_attributes(
    context: dg.AssetExecutionContext,
    config: AttributeQualityConfig,
    raw_catalog: pl.DataFrame,
    attribute_generator: dict,
    listing_features: pl.DataFrame,
    feature_towers: FeatureTowers,
    torch_compute: TorchCompute,
    artifact_store: ArtifactStore,
):
    """Attributes the student generator writes for every listing of the line (greedy decoding),
    with the text-tower features of title + those attributes (``text_features``).

    The generator is opened by its manifest, whatever its kind (compact or hf-vlm, read from
    its folder). These are what the encoder sees at search time, for the gallery and for a
    query alike; the embeddings, the evaluation and the promotion read the features from here.
    Unparseable generations are recorded as invalid with their raw text, never fatal.
    """
    from afmrl_dagster.attributes.teacher import attribute_table
    from afmrl_dagster.features import with_listing_text
    from afmrl_dagster.training.generator_backends import listing_inputs, load_stored_writer

    device = torch_compute.torch_device()
    writer = load_stored_writer(artifact_store.open(), attribute_generator["uri"], device=device)
    ids = listing_features["listing_id"].to_list()
    inputs = listing_inputs(raw_catalog, listing_features, ids, artifact_store.read_uri)
    texts = writer.write(inputs)
    table = attribute_table(ids, texts, f"{attribute_generator['model_name']}@{attribute_generator['model_version']}", writer.parse_keys)
    attributes = [json.loads(text) if text else None for text in table["attributes_json"].to_list()]
    served = with_listing_text(inputs.features, feature_towers.text_featurizer(device), inputs.titles, attributes)
    table = table.with_columns(pl.Series("text_features", served.text.astype(np.float32)))
    return dg.MaterializeResult(
        value=table,
        metadata={"generator_version": attribute_generator["model_version"], "generator": writer.kind, **_table_metadata(table)},
        check_results=_attribute_check_results(table, config.min_valid_share, writer.keys),
    )
