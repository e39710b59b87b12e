"""Model inputs for Hugging Face image-text-to-text models (Qwen2-VL / Qwen2.5-VL, LLaVA,
Idefics3 / SmolVLM families), shared by the attribute generator and the VLM2Vec embedder.

:func:`build_processor` gives one callable, ``inputs(images, prefixes, texts, max_length, eos)``,
whatever the family: the model's own ``AutoProcessor`` when it builds
(:class:`AutoProcessorInputs`), else for Qwen-VL :class:`QwenVLProcessor`. The Qwen2-VL
processors need torchvision for their video part and cannot be built without it (stack.md);
:class:`QwenVLProcessor` then does the same work for images: Qwen2-VL's own PIL image
processor, ``<|image_pad|>`` repeated ``prod(grid_thw) / merge_size**2`` times, and the
``mm_token_type_ids`` the model needs for its multimodal rotary positions.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import PIL.Image
import torch

logger = logging.getLogger(__name__)

QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")
_warned_fallback = False


def _pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to one length on ``side``: (ids, attention mask)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


class QwenVLProcessor:
    """Qwen2-VL / Qwen2.5-VL inputs built without the official processor (which needs torchvision).

    Each sequence is ``instruction \\n [<|vision_start|> <|image_pad|>*n <|vision_end|>] text <eos>``
    with n = prod(grid_thw) / merge_size**2 for its image; ``mm_token_type_ids`` is 1 on the
    image tokens.
    """

    def __init__(self, tokenizer, image_processor, config):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.merge_size = int(image_processor.merge_size)
        self.padding_side = "right"
        ids = {name: tokenizer.convert_tokens_to_ids(name) for name in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")}
        for token, value in ids.items():
            if value is None or value == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no {token} token; is this a Qwen2-VL checkpoint?")
        for name, token_id in (("image_token_id", "<|image_pad|>"), ("vision_start_token_id", "<|vision_start|>")):
            if getattr(config, name, ids[token_id]) != ids[token_id]:
                raise ValueError(f"model {name}={getattr(config, name)} but the tokenizer has {token_id}={ids[token_id]}")
        self.vision_start, self.image_pad, self.vision_end = ids["<|vision_start|>"], ids["<|image_pad|>"], ids["<|vision_end|>"]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("tokenizer has neither a pad nor an eos token")
        self.pad_id = int(pad)

    def __call__(self, images: Sequence[PIL.Image.Image | None], prefixes: Sequence[str], texts: Sequence[str], max_length: int, eos: str | None):
        present = [image for image in images if image is not None]
        pixel_inputs: dict[str, torch.Tensor] = {}
        tokens_per_image: list[int] = []
        if present:
            pixel_inputs = dict(self.image_processor(images=present, return_tensors="pt"))
            grids = pixel_inputs["image_grid_thw"]
            tokens_per_image = (grids.prod(-1) // self.merge_size**2).tolist()
        eos_ids = self.tokenizer.encode(eos, add_special_tokens=False) if eos else []
        rows, kinds, next_image = [], [], 0
        for image, prefix, text in zip(images, prefixes, texts):
            head = self.tokenizer.encode(prefix, add_special_tokens=False)
            body = self.tokenizer.encode(text, add_special_tokens=False)[:max_length]
            vision: list[int] = []
            if image is not None:
                vision = [self.vision_start] + [self.image_pad] * tokens_per_image[next_image] + [self.vision_end]
                next_image += 1
            row = head + vision + body + eos_ids
            rows.append(row)
            kinds.append([1 if token == self.image_pad else 0 for token in row])
        input_ids, attention_mask = _pad(rows, self.pad_id, self.padding_side)
        mm_token_type_ids, _ = _pad(kinds, 0, self.padding_side)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids, **pixel_inputs}


class AutoProcessorInputs:
    """Inputs from the model's own ``AutoProcessor`` (LLaVA, Idefics3, Qwen-VL with torchvision)."""

    def __init__(self, processor, model_type: str):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        if model_type in QWEN_VL_TYPES:
            # Qwen's chat template frames the placeholder; the plain prompt must do the same.
            self.image_token = f"<|vision_start|>{self.image_token}<|vision_end|>"
        # Idefics3-style processors take one list of images per sample.
        self.nested_images = model_type in ("idefics3", "smolvlm", "idefics2")
        self.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def __call__(self, images: Sequence[PIL.Image.Image | None], prefixes: Sequence[str], texts: Sequence[str], max_length: int, eos: str | None):
        prompts = []
        for image, prefix, text in zip(images, prefixes, texts):
            # Cut the listing text, never the image tokens the processor will expand.
            body_ids = self.tokenizer.encode(text, add_special_tokens=False)
            body = self.tokenizer.decode(body_ids[:max_length]) if len(body_ids) > max_length else text
            prompts.append(prefix + (self.image_token if image is not None else "") + body + (eos or ""))
        present = [image for image in images if image is not None]
        image_arg = None
        if present:
            image_arg = [[image] if image is not None else [] for image in images] if self.nested_images else present
        self.tokenizer.padding_side = self.padding_side
        encoded = self.processor(images=image_arg, text=prompts, padding=True, return_tensors="pt")
        return {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}


def build_processor(path: str, hf_config):
    """The model's AutoProcessor when it builds; for Qwen-VL without torchvision, :class:`QwenVLProcessor`."""
    global _warned_fallback
    from transformers import AutoProcessor, AutoTokenizer

    model_type = getattr(hf_config, "model_type", "")
    try:
        processor = AutoProcessor.from_pretrained(path)
        if not hasattr(processor, "tokenizer"):
            raise ValueError(f"AutoProcessor of {path!r} has no tokenizer")
        return AutoProcessorInputs(processor, model_type)
    except (ImportError, OSError, ValueError, TypeError) as error:
        if model_type not in QWEN_VL_TYPES:
            raise
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(f"AutoProcessor for {path!r} unavailable ({type(error).__name__}); using QwenVLProcessor", stacklevel=3)
        logger.info("AutoProcessor for %s unavailable (%s); using QwenVLProcessor", path, error)
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    return QwenVLProcessor(AutoTokenizer.from_pretrained(path), Qwen2VLImageProcessorPil.from_pretrained(path), hf_config)
