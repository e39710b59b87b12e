"""Stage 6: retrieval-aware attribute reinforcement (RAR): the generator trained with GRPO,
rewarded by how well its attributes make the frozen encoder retrieve the query's product."""



import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from afmrl_dagster.training.attribute_stages import RARSettings
from afmrl_dagster.training.checkpoints import LoopCheckpoint
from afmrl_dagster.training.generator_backends import HFRARSettings
from afmrl_dagster.training.grpo import GRPOConfig

from ..resources.compute import GPU_OP_TAGS, GPU_POOL, TorchCompute
from ..resources.models import EvaluationSplit, FeatureTowers
from ..resources.storage import ArtifactStore
from ..resources.tracking import MlflowTracking
from .publishing import check_results, model_check, model_metadata, model_slot, publish_model, tag_model_version


class RARConfig(dg.Config):
    """Defaults come from the library: GRPOConfig (the schedule) and RARSettings (the reward)."""

    steps: int = Field(default=GRPOConfig.steps, description="GRPO steps.")
    queries_per_step: int = Field(default=GRPOConfig.queries_per_step, description="Training queries per step.")
    group_size: int = Field(default=GRPOConfig.group_size, description="G: attribute outputs sampled per query.")
    learning_rate: float = Field(default=GRPOConfig.learning_rate, description="Policy learning rate.")
    kl_beta: float = Field(default=GRPOConfig.kl_beta, description="Weight of the KL penalty to the SFT generator.")
    clip_epsilon: float = Field(default=GRPOConfig.clip_epsilon, description="Clipping of the importance ratio.")
    temperature: float = Field(default=GRPOConfig.temperature, description="Sampling temperature of the group.")
    reward_k: int = Field(
        default=RARSettings.reward_k,
        description="Reward = Recall@k of the query's true matches. 0 = auto: 50 as in the paper, capped at 1% of the gallery "
        "(at least 5), since on a small catalog Recall@50 is 1 for nearly every output and GRPO would get no signal.",
    )
    invalid_reward: float = Field(default=RARSettings.invalid_reward, description="Reward of output that does not parse.")
    reward: str = Field(
        default=RARSettings.reward,
        description="recall (Recall@reward_k, the paper's), reciprocal_rank (1 / rank of the first true match) or margin "
        "(cosine of the best true match minus the best wrong one): the graded kinds still differ between samples "
        "when every sample of a group finds the product in the top k.",
    )
    seed: int = Field(default=GRPOConfig.seed, description="Seed of query sampling and generation.")
    checkpoint_every: int = Field(default=LoopCheckpoint.every, ge=1, description="Checkpoint every this many GRPO steps; a killed run resumes from the "
                                                            "last one. Does not change the model, nor its cache key.")
    hf_learning_rate: float = Field(default=HFRARSettings.hf_learning_rate,
                                    description="hf-vlm generator: learning rate of its LoRA adapter (learning_rate is the compact one's).")


@dg.asset(
    group_name="rar",
    kinds={"pytorch", "mlflow"},
    pool=GPU_POOL, op_tags=GPU_OP_TAGS,
    check_specs=[
        dg.AssetCheckSpec("rar_validity", asset="rar_generator", description="At least 99% of outputs on validation products parse."),
        dg.AssetCheckSpec("rar_keeps_recall", asset="rar_generator", description="RAR attributes do not lower validation R@1 against SFT attributes."),
    ],
)
def rar_generator(
    context: dg.AssetExecutionContext,
    config: RARConfig,
    raw_catalog: pl.DataFrame,
    listing_features: pl.DataFrame,
    catalog_embeddings: pl.DataFrame,
    attribute_generator: dict,
    agcl_encoder: dict,
    feature_towers: FeatureTowers,
    evaluation_split: EvaluationSplit,
    torch_compute: TorchCompute,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
):
    """The attribute generator refined with GRPO against the frozen AGCL encoder and the catalog.

    Each training query samples a group of attribute outputs; each is appended to the query,
    embedded and searched; its reward is graded by where the query's product comes (``reward``:
    the reciprocal rank of the first true match by default, or Recall@k, or a margin;
    ``invalid_reward`` when it does not parse). Group-normalised advantages, a clipped ratio and a KL penalty to
    the SFT generator. Reward queries and gallery are training listings only. Queries of
    validation products then compare SFT and RAR attributes (test products are reported); the
    new version is registered with alias ``rar``. It serves only through ``encoder_promotion``,
    with the CIT encoder trained on its attributes.
    """

    from afmrl_dagster.encoders.listing_encoder import load_stored_encoder
    from afmrl_dagster.features import align
    from afmrl_dagster.registry import GENERATOR_MODEL_NAME
    from afmrl_dagster.training.attribute_stages import RARGallery, compare_query_attributes, default_reward_k, refine_writer_with_rar, reward_trend
    from afmrl_dagster.training.generator_backends import listing_inputs, load_stored_writer

    store = artifact_store.open()
    split = evaluation_split.split()
    slot = model_slot(store, "rar_generator", attribute_generator["fingerprint"], agcl_encoder["fingerprint"], catalog_embeddings,
                      config.model_dump(exclude={"checkpoint_every"}), split)
    if slot.cached:
        return slot.cached

    device = torch_compute.torch_device()
    # The reward's encoder: the frozen AGCL encoder (any backend), loaded as every stage loads it.
    encoder = feature_towers.share_text_tower(load_stored_encoder(store, agcl_encoder["uri"], device=device), device)
    writer = load_stored_writer(store, attribute_generator["uri"], device=device, trainable=True)

    ids = raw_catalog["listing_id"].to_list()
    gallery_embeddings = align(catalog_embeddings, ids)["embedding"].to_numpy().astype(np.float32)
    product_ids = raw_catalog["product_id"].to_list()
    # Reward queries and the reward gallery are training listings only: no validation or test listing.
    train_rows = np.flatnonzero(split.mask(raw_catalog, "train"))
    reward_gallery = RARGallery(gallery_embeddings[train_rows], [product_ids[i] for i in train_rows], [ids[i] for i in train_rows])
    queries = listing_inputs(raw_catalog, listing_features, [ids[i] for i in train_rows], artifact_store.read_uri)

    reward_k = config.reward_k or default_reward_k(len(train_rows))
    grpo = GRPOConfig(
        steps=config.steps, queries_per_step=config.queries_per_step, group_size=config.group_size, learning_rate=config.learning_rate,
        kl_beta=config.kl_beta, clip_epsilon=config.clip_epsilon, temperature=config.temperature, seed=config.seed, device=device,
    )
    params = {**config.model_dump(), "reward_k_used": reward_k, "train_queries": len(train_rows), "generator_kind": writer.kind,
              "sft_version": attribute_generator["model_version"], "encoder_version": agcl_encoder["model_version"]}
    with mlflow_tracking.start_run(context, "rar_generator", params=params) as run:
        import mlflow

        samples: list[dict] = []

        def on_step(row: dict) -> None:
            mlflow_tracking.log_metrics({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}, step=row["step"])
            samples.extend({"step": row["step"], "query": ids[train_rows[q]], "attributes": text, "reward": float(r)} for q, text, r in row.get("samples", []))
            context.log.info(f"GRPO step {row['step']}: reward {row['reward_mean']:.3f} ± {row['reward_std']:.3f}, "
                             f"valid {row['validity_rate']:.2f}, KL {row['kl']:.4f}")

        outcome = refine_writer_with_rar(
            writer, encoder, queries, [product_ids[i] for i in train_rows], reward_gallery, grpo,
            reward_k=reward_k, invalid_reward=config.invalid_reward, hf=HFRARSettings(hf_learning_rate=config.hf_learning_rate),
            on_step=on_step, reward_kind=RARSettings(reward=config.reward).reward,
            checkpoint=LoopCheckpoint(torch_compute.checkpoint_dir("rar_generator", slot.key), {"loop": "grpo", "steps": grpo.steps},
                                      config.checkpoint_every),
        )
        policy, history = outcome.policy, outcome.history
        reward_first, reward_last = reward_trend(history)
        mlflow.log_table(pl.DataFrame(samples).to_pandas() if samples else {"step": []}, "sampled_generations.json")

        # The same encoder and gallery, queries of unseen products carrying SFT vs RAR attributes:
        # validation decides (the checks), test is reported.
        comparison = compare_query_attributes({"sft": outcome.reference, "rar": policy}, encoder, listing_features,
                                              raw_catalog, gallery_embeddings, split, read_image=artifact_store.read_uri)
        for part, by_generator in comparison.items():
            for name, metrics in by_generator.items():
                mlflow_tracking.log_metrics({f"{part}_{name}_{m}": v for m, v in metrics.items()})
        validation = comparison["validation"]

        manifest = publish_model(
            context, "generator",
            lambda folder: policy.save(folder, extra_json={"towers.json": feature_towers.as_json()}),
            store, slot.prefix, GENERATOR_MODEL_NAME, run,
            {
                "fingerprint": slot.key,
                "reward_first_steps": reward_first,
                "reward_last_steps": reward_last,
                **comparison,
                "reward": config.reward,
                "reward_k": reward_k,
                "generator": policy.describe(),
                "weights": outcome.weights,
                "checks": {
                    "rar_validity": model_check(validation["rar"]["validity_rate"] >= 0.99, blocking=False, validity_rate=validation["rar"]["validity_rate"]),
                    "rar_keeps_recall": model_check(
                        validation["rar"]["recall@1"] >= validation["sft"]["recall@1"], blocking=False,
                        rar_recall_at_1=validation["rar"]["recall@1"], sft_recall_at_1=validation["sft"]["recall@1"],
                    ),
                },
            },
        )
    torch_compute.discard_checkpoints("rar_generator", slot.key)
    rar_scores = {f"{part}_{k}": v for part in comparison for k, v in comparison[part]["rar"].items()}
    tag_model_version(mlflow_tracking, context, manifest, rar_scores, catalog=raw_catalog)
    mlflow_tracking.client().set_registered_model_alias(GENERATOR_MODEL_NAME, "rar", manifest["model_version"])
    return dg.MaterializeResult(
        value=manifest,
        metadata={
            **model_metadata(manifest, mlflow_tracking),
            "reward_first_steps": manifest["reward_first_steps"],
            "reward_last_steps": manifest["reward_last_steps"],
            "validation_sft_recall@1": validation["sft"]["recall@1"],
            "validation_rar_recall@1": validation["rar"]["recall@1"],
            "validation_rar_validity": validation["rar"]["validity_rate"],
            "reward_k": reward_k,
            "generator": policy.kind,
            **{f"weights_{k}": v for k, v in outcome.weights.items()},
        },
        check_results=check_results(manifest),
    )
