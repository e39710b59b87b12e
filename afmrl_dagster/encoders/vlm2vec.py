"""VLM2Vec-style embedder: a vision-language model whose last-token hidden state is the embedding.

This is the embedder of the AFMRL paper (method.md): a Hugging Face image-text-to-text model
(Qwen2-VL / Qwen2.5-VL, LLaVA, Idefics3 families) reads an instruction, the listing image if
any and the listing text (title with its attributes appended, see :func:`listing_prompt_text`);
the final hidden state of the last real token, L2-normalised, is the listing embedding.
Training adds LoRA adapters (peft) and leaves the base weights frozen.

The Qwen2-VL processors need torchvision for their video part and cannot be built without it
(stack.md); :class:`QwenVLProcessor` then does the same work for images: Qwen2-VL's own PIL
image processor, ``<|image_pad|>`` repeated ``prod(grid_thw) / merge_size**2`` times, and the
``mm_token_type_ids`` the model needs for its multimodal rotary positions.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

from afmrl_dagster.attributes.format import Attributes, listing_text
from afmrl_dagster.local_files import write_folder_atomically
from afmrl_dagster.training.encoder_training import pair_loss

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Represent this product listing for finding the identical product:"
CONFIG_FILE = "vlm2vec_config.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")
_warned_fallback = False


@dataclass
class VLM2VecConfig:
    """Base model, prompt, LoRA shape and input limits of a :class:`VLM2VecEncoder`.

    ``max_length`` bounds the tokens of the listing text; the instruction and the image
    tokens come on top. ``image_size`` (pixels), when set, resizes every image to a square
    first, which bounds the image tokens. ``dtype`` "auto" is bfloat16 on CUDA, float32
    elsewhere. ``temperature`` is the fixed contrastive temperature (VLM2Vec uses 0.02).
    """

    model: str
    instruction: str = DEFAULT_INSTRUCTION
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    max_length: int = 256
    image_size: int | None = None
    dtype: str = "auto"
    use_lora: bool = True
    temperature: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        self.model = str(self.model)
        self.lora_target_modules = tuple(self.lora_target_modules)
        if not self.model.strip():
            raise ValueError("model must name a Hugging Face id or a local folder")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ValueError(f"lora_rank must be >= 1 and lora_alpha > 0, got {self.lora_rank}, {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.use_lora and not self.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one module when use_lora is on")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels or None, got {self.image_size}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if not 0.0 < self.temperature <= 1.0:
            raise ValueError(f"temperature must be in (0, 1], got {self.temperature}")

    def torch_dtype(self, device: str | torch.device) -> torch.dtype:
        """The weight dtype on ``device``: "auto" is bfloat16 on CUDA and float32 elsewhere."""
        if self.dtype == "auto":
            return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        return _DTYPES[self.dtype]


def listing_prompt_text(title: str, attributes: Attributes | None = None) -> str:
    """The listing text the embedder reads: the title with its attributes appended."""
    return listing_text(title, attributes)


def _last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.to(torch.long) * positions).argmax(dim=1)


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


def add_lora(model: nn.Module, rank: int, alpha: int, dropout: float, target_modules: Sequence[str], seed: int) -> nn.Module:
    """``model`` wrapped with fresh LoRA adapters (seeded, without touching the caller's random
    state); only the adapter weights require grad afterwards."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, lora)


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


class VLM2VecEncoder(nn.Module):
    """Listing embedder over an image-text-to-text model: last real token, L2-normalised."""

    def __init__(self, model: nn.Module, backbone: nn.Module, inputs, config: VLM2VecConfig):
        super().__init__()
        self.config = config
        self.model = model
        # The backbone lives inside ``model``; kept out of the module tree so it is not listed twice.
        self.__dict__["_backbone"] = backbone
        self.inputs = inputs

    @classmethod
    def from_pretrained(cls, config: VLM2VecConfig, device: str = "cpu") -> VLM2VecEncoder:
        """Load the base model and its processor; add fresh LoRA adapters when ``use_lora``.

        With LoRA only the adapter weights require grad; without it every weight does (full
        fine-tuning), and ``encode`` alone gives the zero-shot embedder.
        """
        from transformers import AutoConfig, AutoModelForImageTextToText

        hf_config = AutoConfig.from_pretrained(config.model)
        inputs = build_processor(config.model, hf_config)
        model = AutoModelForImageTextToText.from_pretrained(config.model, dtype=config.torch_dtype(device))
        backbone = getattr(model, "model", None)
        if backbone is None:
            raise ValueError(f"{type(model).__name__} has no .model backbone returning hidden states")
        if config.use_lora:
            model = add_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_target_modules, config.seed)
        encoder = cls(model, backbone, inputs, config)
        return encoder.to(device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def temperature(self) -> torch.Tensor:
        """The fixed contrastive temperature, as AGCL takes it."""
        return torch.tensor(self.config.temperature, device=self.device)

    @property
    def padding_side(self) -> str:
        return self.inputs.padding_side

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        self.inputs.padding_side = side

    def _prepare_images(self, images: Sequence[PIL.Image.Image | None]) -> list[PIL.Image.Image | None]:
        size = self.config.image_size
        prepared = []
        for image in images:
            if image is not None:
                image = image.convert("RGB")
                if size is not None and image.size != (size, size):
                    image = image.resize((size, size), PIL.Image.Resampling.BICUBIC)
            prepared.append(image)
        return prepared

    def tokenize(self, images: Sequence[PIL.Image.Image | None], texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Model inputs of a batch (CPU tensors): ids, attention mask and pixel inputs."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        if not texts:
            raise ValueError("empty batch")
        prefix = f"{self.config.instruction}\n" if self.config.instruction else ""
        eos = self.inputs.tokenizer.eos_token
        return self.inputs(self._prepare_images(images), [prefix] * len(texts), [str(t) for t in texts], self.config.max_length, eos)

    def forward(self, images: Sequence[PIL.Image.Image | None], texts: Sequence[str]) -> torch.Tensor:
        """Embeddings ``[B, hidden]``, L2-normalised, of (image or ``None``, text) pairs."""
        batch = self.tokenize(images, texts)
        device, dtype = self.device, next(self._backbone.parameters()).dtype
        batch = {key: value.to(device, dtype=dtype if value.is_floating_point() else None) for key, value in batch.items()}
        hidden = self._backbone(**batch, use_cache=False).last_hidden_state
        last = _last_token_index(batch["attention_mask"])
        pooled = hidden[torch.arange(hidden.shape[0], device=device), last]
        return F.normalize(pooled.float(), dim=-1)

    def encode(self, images: Sequence[PIL.Image.Image | None], texts: Sequence[str], batch_size: int = 8) -> np.ndarray:
        """Embeddings ``float32 [N, hidden]`` in eval mode, ``batch_size`` listings at a time."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        was_training = self.training
        self.eval()
        chunks = []
        try:
            with torch.inference_mode():
                for start in range(0, len(texts), batch_size):
                    stop = start + batch_size
                    chunks.append(self(list(images[start:stop]), list(texts[start:stop])).cpu().numpy())
        finally:
            self.train(was_training)
        if not chunks:
            return np.zeros((0, self.hidden_size), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)

    @property
    def hidden_size(self) -> int:
        config = self._backbone.config
        return int(getattr(config, "text_config", config).hidden_size)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The weights that training updates (the LoRA adapters when ``use_lora``)."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def save_adapter(self, directory: str | os.PathLike) -> Path:
        """Write the LoRA adapter (peft safetensors) and this config into ``directory``, atomically."""
        if not self.config.use_lora:
            raise ValueError("this encoder has no LoRA adapter (use_lora=False)")
        def fill(staging: Path) -> None:
            self.model.save_pretrained(str(staging), safe_serialization=True)
            (staging / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2, sort_keys=True))

        return write_folder_atomically(directory, fill)

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Load adapter weights written by :meth:`save_adapter` into this encoder (same LoRA shape)."""
        from peft import load_peft_weights, set_peft_model_state_dict

        if not self.config.use_lora:
            raise ValueError("this encoder has no LoRA adapter (use_lora=False)")
        saved = load_saved_config(directory)
        for name in ("lora_rank", "lora_alpha", "lora_target_modules"):
            if getattr(saved, name) != getattr(self.config, name):
                raise ValueError(f"adapter {name}={getattr(saved, name)!r} but this encoder has {getattr(self.config, name)!r}")
        weights = load_peft_weights(str(directory), device=str(self.device))
        result = set_peft_model_state_dict(self.model, weights)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"adapter weights do not fit this model: {unexpected[:5]}")

    @classmethod
    def from_adapter(cls, directory: str | os.PathLike, device: str = "cpu", model: str | None = None) -> VLM2VecEncoder:
        """Rebuild an encoder from a saved adapter folder (``model`` overrides the base model path)."""
        config = load_saved_config(directory)
        if model is not None:
            config = VLM2VecConfig(**{**asdict(config), "model": model})
        encoder = cls.from_pretrained(config, device=device)
        encoder.load_adapter(directory)
        return encoder.eval()


def load_saved_config(directory: str | os.PathLike) -> VLM2VecConfig:
    """The :class:`VLM2VecConfig` stored beside a saved adapter."""
    raw = json.loads((Path(directory) / CONFIG_FILE).read_text())
    known = {field.name for field in fields(VLM2VecConfig)}
    return VLM2VecConfig(**{key: value for key, value in raw.items() if key in known})


def vlm2vec_batch_loss(
    encoder: VLM2VecEncoder,
    loss_fn,
    images: Sequence[PIL.Image.Image | None],
    texts: Sequence[str],
    anchors: np.ndarray,
    positives: np.ndarray,
    product_codes: np.ndarray,
    scorer=None,
) -> dict[str, torch.Tensor]:
    """AGCL loss of one batch of (anchor, positive) listing pairs through the encoder.

    The counterpart of ``training.encoder_training.batch_loss`` for the VLM2Vec encoder:
    ``images``/``texts`` hold all listings, ``anchors``/``positives`` index them, ``scorer``
    is a ``BM25Scorer`` over the listings' attribute texts (needed when AGCL weights are on).
    """
    anchors, positives = np.asarray(anchors, dtype=np.int64), np.asarray(positives, dtype=np.int64)
    both = np.concatenate([anchors, positives])
    embeddings = encoder([images[i] for i in both], [texts[i] for i in both])
    return pair_loss(loss_fn, embeddings, encoder.temperature, anchors, positives, product_codes, scorer)
