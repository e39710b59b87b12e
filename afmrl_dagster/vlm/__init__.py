"""Hugging Face vision-language model plumbing shared by the attribute generator
(:mod:`afmrl_dagster.attributes.hf_generator`) and the VLM2Vec embedder
(:mod:`afmrl_dagster.encoders.vlm2vec`): model inputs whatever the model family, LoRA
adapters, and tiny random-weight models built offline for tests. Imports no other package of
the library.

Names are imported from their submodule on first use (:mod:`afmrl_dagster.lazy_exports`).
"""

from ..lazy_exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "lora": ["add_lora"],
    "processors": ["AutoProcessorInputs", "QWEN_VL_TYPES", "QwenVLProcessor", "build_processor"],
    "tiny_models": ["build_tiny_causal_lm", "build_tiny_idefics3", "build_tiny_llava", "build_tiny_qwen2_vl"],
})
