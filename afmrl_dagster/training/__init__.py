"""Training: the encoder with AGCL (dual-tower head and VLM2Vec), the attribute generator by
distillation (SFT) and by RAR (GRPO), for the compact generator and the Hugging Face one, and
the generator-side stages (distil, RAR, CIT) the assets and the ladder share. The top of the
library: it may import every other package.

Names are imported from their submodule on first use (:mod:`afmrl_dagster.lazy_exports`).
"""

from ..lazy_exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "agcl": ["AGCLConfig", "AGCLLoss"],
    "attribute_stages": ["CITSettings", "DistillationSettings", "RARGallery", "RARSettings", "cit_rows", "default_reward_k",
                         "distill_generator", "refine_with_rar", "reward_trend", "train_cit_round", "written_attributes"],
    "bm25": ["BM25Scorer", "pair_tokens", "word_tokens"],
    "checkpoints": ["flatten_tensors", "has_checkpoint", "load_checkpoint", "save_checkpoint", "unflatten_tensors"],
    "encoder_training": ["EncoderTrainingConfig", "FeatureTensors", "ProductBatchSampler", "batch_loss", "make_optimizer", "pair_loss",
                         "train_encoder", "vlm2vec_batch_loss"],
    "generator_sft": ["SFTConfig", "attribute_accuracy", "train_generator_sft"],
    "grpo": ["GRPOConfig", "group_advantages", "k3_kl", "train_grpo"],
    "hf_generator_training": ["hf_grpo_step", "hf_sft_step", "repeat_batch"],
    "optimizers": ["adamw", "can_fuse"],
    "schedules": ["warmup_cosine"],
})
