"""Tiny random-weight vision-language models, built offline, for tests and smoke runs.

No vision-language model with weights ships on the package registries (stack.md), so the
real VLM code paths are exercised with models built from a config: one or two layers,
hidden size 32-64, a vision tower of a few patches, and a byte-level BPE tokenizer trained
on a few sentences with the special tokens of the model family. Each builder writes a
folder that ``from_pretrained`` loads like a hub checkpoint; the weights are random, so the
embeddings mean nothing, but shapes, padding, LoRA and saving behave as with real models.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Product-title-like sentences, enough for the BPE to learn a few hundred merges.
_CORPUS = [
    "Represent this product listing for finding the identical product:",
    "red v-neck summer dress | colour: red; neckline: v-neck; size: m",
    "blue round-neck cotton t-shirt | colour: blue; neckline: round-neck",
    "Arla standard milk 1 l | brand: arla; fat: 3.5 %",
    "Arla medium fat milk 1 l | brand: arla; fat: 1.5 %",
    "stainless steel water bottle 750 ml | material: steel; volume: 750 ml",
    "wireless earbuds with charging case, black | colour: black; connectivity: bluetooth",
    "organic green tea, 20 bags | brand: pukka; flavour: green tea",
    "leather wallet brown with coin pocket | material: leather; colour: brown",
    "running shoes size 42 white and gray | size: 42; colour: white",
    "the quick brown fox jumps over the lazy dog 0123456789",
]
_VOCAB_SIZE = 384
_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}

QWEN2_VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAVA_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]


def train_tiny_tokenizer(special_tokens: list[str], vocab_size: int = _VOCAB_SIZE, **roles: str):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on a few product sentences.

    ``special_tokens`` get the first ids and are never split; ``roles`` names some of them,
    e.g. ``pad_token="<pad>"``, ``eos_token="</s>"``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    missing = [token for token in roles.values() if token not in special_tokens]
    if missing:
        raise ValueError(f"role tokens {missing} are not among the special tokens")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    named = set(roles.values())
    extra = [token for token in special_tokens if token not in named]
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, extra_special_tokens=extra, **roles)


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id and token != tokenizer.unk_token:
        raise ValueError(f"token {token!r} is not in the tiny tokenizer")
    return int(token_id)


def _llama_text_config(tokenizer) -> dict:
    """The tiny Llama language model of the LLaVA and Idefics3 builders."""
    return {
        "model_type": "llama",
        **_TINY_TEXT,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 1024,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _tiny_vision_config(image_size: int, patch_size: int) -> dict:
    """A one-layer ViT of width 32: the vision tower of the LLaVA and Idefics3 builders."""
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "image_size": image_size, "patch_size": patch_size}


def _seeded(seed: int, build):
    """``build()`` with torch seeded, leaving the caller's random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _save(model, tokenizer, directory: str | os.PathLike, processor=None, image_processor=None) -> Path:
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    if processor is not None:
        processor.save_pretrained(target)
    elif image_processor is not None:
        image_processor.save_pretrained(target)
    return target


def build_tiny_qwen2_vl(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random Qwen2-VL (2 text layers, hidden 32, 1 vision layer, 4-pixel patches).

    The folder holds config, safetensors weights, the tokenizer and the image processor
    config (patch 4, merge 2: a 16x16 image becomes 4 image tokens). The full Qwen2-VL
    processor needs torchvision for its video part and is not saved; see
    :class:`afmrl_dagster.vlm.processors.QwenVLProcessor`.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = train_tiny_tokenizer(QWEN2_VL_SPECIAL_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    head_dim = _TINY_TEXT["hidden_size"] // _TINY_TEXT["num_attention_heads"]
    config = Qwen2VLConfig(
        text_config={
            **_TINY_TEXT,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 1024,
            # M-RoPE splits the rotary half-dimension into temporal, height and width parts.
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": None,
        },
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": _TINY_TEXT["hidden_size"],
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=_token_id(tokenizer, "<|image_pad|>"),
        video_token_id=_token_id(tokenizer, "<|video_pad|>"),
        vision_start_token_id=_token_id(tokenizer, "<|vision_start|>"),
        vision_end_token_id=_token_id(tokenizer, "<|vision_end|>"),
    )
    assert sum(config.text_config.rope_parameters["mrope_section"]) * 2 == head_dim
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=32 * 32
    )
    model = _seeded(seed, lambda: Qwen2VLForConditionalGeneration(config))
    return _save(model, tokenizer, directory, image_processor=image_processor)


def build_tiny_llava(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random LLaVA (CLIP vision tower of 1 layer on 16x16 images, 2-layer Llama).

    The saved ``LlavaProcessor`` builds on this machine, so the folder loads with
    ``AutoProcessor``; a 16x16 image becomes 16 ``<image>`` tokens.
    """
    from transformers import (
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = train_tiny_tokenizer(
        LLAVA_SPECIAL_TOKENS, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    image_size, patch_size = 16, 4
    config = LlavaConfig(
        text_config=_llama_text_config(tokenizer),
        vision_config={"model_type": "clip_vision_model", **_tiny_vision_config(image_size, patch_size), "projection_dim": 32},
        image_token_id=_token_id(tokenizer, "<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )
    model = _seeded(seed, lambda: LlavaForConditionalGeneration(config))
    return _save(model, tokenizer, directory, processor=processor)


IDEFICS3_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]


def build_tiny_idefics3(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random Idefics3 (SigLIP-like tower of 1 layer on 16x16 images, 2-layer Llama).

    Image splitting is off, so each image is one 16x16 tile: 16 patches, pixel-shuffled by
    ``scale_factor`` 2 into 4 ``<image>`` tokens. The saved ``Idefics3Processor`` builds here.
    """
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
    )
    from transformers.models.idefics3 import Idefics3ImageProcessorPil

    tokenizer = train_tiny_tokenizer(
        IDEFICS3_SPECIAL_TOKENS, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    image_size, patch_size, scale_factor = 16, 4, 2
    config = Idefics3Config(
        text_config=_llama_text_config(tokenizer),
        vision_config=_tiny_vision_config(image_size, patch_size),
        image_token_id=_token_id(tokenizer, "<image>"),
        scale_factor=scale_factor,
        pad_token_id=tokenizer.pad_token_id,
    )
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(image_size // patch_size) ** 2 // scale_factor**2,
    )
    model = _seeded(seed, lambda: Idefics3ForConditionalGeneration(config))
    return _save(model, tokenizer, directory, processor=processor)


def build_tiny_causal_lm(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random Qwen2 causal language model (text only), e.g. for a served teacher."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = train_tiny_tokenizer(QWEN2_VL_SPECIAL_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **_TINY_TEXT)
    return _save(_seeded(seed, lambda: Qwen2ForCausalLM(config)), tokenizer, directory)
