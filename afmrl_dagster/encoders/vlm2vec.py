"""VLM2Vec-style embedder: a vision-language model whose last-token hidden state is the embedding.

This is the embedder of the AFMRL paper (method.md): a Hugging Face image-text-to-text model
(Qwen2-VL / Qwen2.5-VL, LLaVA, Idefics3 families) reads an instruction, the listing image if
any and the listing text (title with its attributes appended, see :func:`listing_prompt_text`);
the final hidden state of the last real token, L2-normalised, is the listing embedding.
Training adds LoRA adapters (peft) and leaves the base weights frozen.

It is the ``vlm2vec`` backend of :class:`~afmrl_dagster.encoders.listing_encoder.ListingEncoder`
(``AFMRL_ENCODER=vlm2vec:<hub id or folder>``): :func:`new_vlm2vec_encoder` builds a fresh one,
:func:`~afmrl_dagster.training.encoder_training.train_listing_encoder` trains it with AGCL like
any other backend (its checkpoints hold the LoRA weights alone), :meth:`VLM2VecEncoder.save`
writes the adapter, its config and ``encoder.json``, and
:func:`~afmrl_dagster.encoders.listing_encoder.load_encoder` reads that folder back
(:func:`load_vlm2vec_encoder`).

The model inputs (the model's own processor, or on machines without torchvision the
project's Qwen-VL processor) come from :mod:`afmrl_dagster.vlm.processors`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

from afmrl_dagster.attributes.format import Attributes, listing_text
from afmrl_dagster.encoders.listing_encoder import ListingEncoder, ListingInputs, write_encoder_json
from afmrl_dagster.local_files import write_folder_atomically
from afmrl_dagster.vlm.lora import add_lora
from afmrl_dagster.vlm.processors import build_processor

DEFAULT_INSTRUCTION = "Represent this product listing for finding the identical product:"
CONFIG_FILE = "vlm2vec_config.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


@dataclass
class VLM2VecTrainingSettings:
    """The pipeline's defaults for training a VLM2Vec encoder (the ``agcl_encoder`` asset's run
    config reads them): LoRA learns at a far lower rate than a head trained from scratch, and
    448 px photos give 256 image tokens to a Qwen2-VL (patch 14, merge 2)."""

    learning_rate: float = 1e-4
    lora_rank: int = 8
    image_size: int = 448


def _last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.to(torch.long) * positions).argmax(dim=1)


class VLM2VecEncoder(ListingEncoder):
    """Listing embedder over an image-text-to-text model: last real token, L2-normalised.

    As a :class:`ListingEncoder` (kind ``vlm2vec``) it reads each row's image
    (``inputs.load_images``) and text (``inputs.texts``: the title with its attributes).
    """

    kind = "vlm2vec"

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

    def embed_rows(self, inputs: ListingInputs, rows: np.ndarray) -> torch.Tensor:
        """Embeddings of ``rows`` of ``inputs``: each row's image (or none) and its listing text."""
        rows = [int(i) for i in rows]
        return self(inputs.load_images(rows), inputs.texts(rows))

    def embedding_batch_size(self) -> int:
        return 8

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The trained weights alone (the LoRA adapters when ``use_lora``): the base model's
        weights and buffers come from ``config.model`` again on resume."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def fingerprint(self) -> dict:
        """The config a training checkpoint may only be resumed with."""
        # As the checkpoint's JSON gives it back (tuples as lists).
        return json.loads(json.dumps({f"vlm2vec.{key}": value for key, value in asdict(self.config).items()}))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the adapter, this config and ``encoder.json`` (kind ``vlm2vec``) into ``directory``,
        atomically; :func:`~afmrl_dagster.encoders.listing_encoder.load_encoder` reads it back."""
        return self.save_adapter(directory)

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
        """Write the LoRA adapter (peft safetensors), this config and ``encoder.json`` into
        ``directory``, atomically."""
        if not self.config.use_lora:
            raise ValueError("only LoRA encoders are saved: this one trains every weight (use_lora=False)")

        def fill(staging: Path) -> None:
            self.model.save_pretrained(str(staging), safe_serialization=True)
            (staging / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2, sort_keys=True))
            write_encoder_json(staging, self.kind, model=self.config.model)

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



def new_vlm2vec_encoder(model: str, device: str = "cpu", **config) -> VLM2VecEncoder:
    """A fresh encoder over ``model`` (hub id or local folder) with new LoRA adapters;
    ``config`` sets other :class:`VLM2VecConfig` fields (``lora_rank``, ``temperature``, ...)."""
    known = {field.name for field in fields(VLM2VecConfig)} - {"model"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown VLM2Vec settings {unknown}; known: {sorted(known)}")
    return VLM2VecEncoder.from_pretrained(VLM2VecConfig(model=model, **config), device=device)


def load_vlm2vec_encoder(directory: str | os.PathLike, device: str = "cpu") -> VLM2VecEncoder:
    """The encoder saved by :meth:`VLM2VecEncoder.save` in ``directory`` (its base model from the
    saved config's ``model``), in eval mode on ``device``; what ``load_encoder`` calls."""
    if not (Path(directory) / CONFIG_FILE).is_file():
        raise ValueError(f"{directory} holds no {CONFIG_FILE}: not a saved VLM2Vec encoder")
    return VLM2VecEncoder.from_adapter(directory, device=device)
