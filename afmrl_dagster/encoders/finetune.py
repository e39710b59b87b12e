"""``dual-tower-finetune``: the image and text towers trained end to end with the dual-tower head.

The same towers as ``dual-tower`` (EfficientNet-Lite0 and all-MiniLM-L6-v2 by default, or the
CLIP/SigLIP checkpoint a name gives, loaded by :mod:`.towers`) read raw photos and listing
texts; the last ``image_blocks`` MBConv blocks of the image tower (with its final 1x1
convolution and BatchNorm; the last encoder layers and what follows them for CLIP/SigLIP) and
the last ``text_layers`` transformer layers of the text tower train together with a
:class:`~.dual_tower.DualTowerHead` on top; everything below stays frozen. Partial unfreezing
rather than LoRA: the trained blocks are small (one EfficientNet block is 0.7 M weights, one
MiniLM layer 1.8 M), they need no extra dependency, and the saved folder holds only them.

- The frozen blocks run in eval mode (BatchNorm on its ImageNet statistics, no dropout, no
  stochastic depth), so their output for an input never changes; it is computed once per image
  URI and per text and kept in an LRU cache (``frozen_cache_items``), which makes an epoch cost
  the unfrozen blocks only. BatchNorm of the unfrozen blocks keeps its statistics too unless
  ``train_batchnorm_stats`` (its scale and shift train either way): product batches are small
  and one product line at a time.
- Tower weights learn at ``tower_learning_rate_scale`` times the head's rate
  (``learning_rate_scale``, read by the training loop's optimizer).
- :meth:`FinetunedTowerEncoder.prepare_training` starts the head at the PCA of the zero-shot
  tower features, as the frozen-tower head does, so training starts at zero-shot quality.
- :meth:`FinetunedTowerEncoder.save` writes the head, the trained tower blocks (weights and
  buffers) and ``encoder.json``; :func:`load_finetuned_encoder` rebuilds the pretrained towers
  from their names and loads them over.

Images are preprocessed exactly as the frozen towers read them (:func:`.towers.image_pixels`);
a listing without an image is embedded from its text (the head's image mask).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..local_files import write_folder_atomically
from .dual_tower import DualTowerConfig, DualTowerHead, ListingFeatures
from .listing_encoder import ENCODER_FILE, ListingEncoder, ListingInputs, write_encoder_json
from .towers import (
    DEFAULT_IMAGE_MODEL,
    DEFAULT_TEXT_MODEL,
    EFFICIENTNET_POOLING,
    _pooled,
    image_pixels,
    load_image_tower,
    load_text_tower,
    mean_pooled,
    pool_feature_map,
)

KIND = "dual-tower-finetune"
WEIGHTS_FILE = "finetune.safetensors"
HEAD_PREFIX = "head."


@dataclass
class FinetuneConfig:
    """Towers, how much of them trains, and the head's shape (``head``: :class:`DualTowerConfig` fields)."""

    image_tower: str = DEFAULT_IMAGE_MODEL
    text_tower: str = DEFAULT_TEXT_MODEL
    image_blocks: int = 1  # last MBConv blocks (EfficientNet) or encoder layers (CLIP/SigLIP) trained
    text_layers: int = 1  # last transformer layers of the text tower trained
    tower_learning_rate_scale: float = 0.1  # tower weights learn at this times the head's rate
    train_batchnorm_stats: bool = False
    image_size: int = 224  # EfficientNet's crop; CLIP/SigLIP use their processor's
    max_length: int = 64  # text tokens
    frozen_cache_items: int = 16384  # per tower: frozen-block outputs kept (0 = none)
    pca_rows: int = 2048  # listings whose zero-shot features start the head
    head: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image_blocks < 0 or self.text_layers < 0:
            raise ValueError(f"image_blocks and text_layers must be >= 0, got {self.image_blocks}, {self.text_layers}")
        if not 0.0 < self.tower_learning_rate_scale <= 10.0:
            raise ValueError(f"tower_learning_rate_scale must be in (0, 10], got {self.tower_learning_rate_scale}")
        if self.image_size < 8 or self.max_length < 2 or self.frozen_cache_items < 0 or self.pca_rows < 1:
            raise ValueError("need image_size >= 8, max_length >= 2, frozen_cache_items >= 0, pca_rows >= 1")
        unknown = set(self.head) - set(DualTowerConfig.__dataclass_fields__) | ({"image_dim", "text_dim", "image_tower", "text_tower"} & set(self.head))
        if unknown:
            raise ValueError(f"head settings {sorted(unknown)} cannot be set here (the towers fix dims and names)")


class _LRU:
    """Frozen-block outputs by key (image URI or text), at most ``size`` of them."""

    def __init__(self, size: int):
        self.size, self.items, self.hits, self.misses = size, OrderedDict(), 0, 0

    def get(self, key):
        if key is None or key not in self.items:
            self.misses += key is not None
            return None
        self.hits += 1
        self.items.move_to_end(key)
        return self.items[key]

    def put(self, key, value: torch.Tensor) -> None:
        if key is None or self.size == 0:
            return
        if value.is_inference():  # computed under inference_mode (embed): training must be able to read it
            with torch.inference_mode(False):
                value = value.clone()
        self.items[key] = value.detach()
        if len(self.items) > self.size:
            self.items.popitem(last=False)


def _layer_list(model: nn.Module, root: str) -> tuple[str, nn.ModuleList]:
    """The longest ModuleList named ``...layer``/``...layers`` under ``root`` (a transformer's blocks)."""
    base = model.get_submodule(root) if root else model
    found = [(name, module) for name, module in base.named_modules()
             if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers")]
    if not found:
        raise ValueError(f"{type(model).__name__} has no transformer layer list under {root or 'the model'!r} to unfreeze")
    name, layers = max(found, key=lambda item: len(item[1]))
    return (f"{root}.{name}" if root else name), layers


def _modules_after(model: nn.Module, root: str, names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` (relative to ``root``) that exist: the norms and projections after the layers."""
    found = []
    for name in names:
        path = f"{root}.{name}" if root else name
        try:
            model.get_submodule(path)
        except AttributeError:
            continue
        found.append(path)
    return found


class FinetunedTowerEncoder(ListingEncoder):
    """``dual-tower-finetune``: image and text towers with their last blocks trained, and the head."""

    kind = KIND

    def __init__(self, config: FinetuneConfig, image_model: nn.Module, image_processor, image_dim: int, text_tower):
        super().__init__()
        self.config = config
        self.image_model = image_model
        self.image_processor = image_processor
        self.text_model = text_tower.model
        self._text = text_tower
        self.head = DualTowerHead(DualTowerConfig(**{**config.head, "image_dim": image_dim, "text_dim": text_tower.dim,
                                                     "image_tower": config.image_tower, "text_tower": config.text_tower}))
        self._efficientnet = image_processor is None
        self._pooling = EFFICIENTNET_POOLING.get(config.image_tower, "mean")
        # A text tower whose frozen part can run alone (BERT-style: ``encoder.layer``) is split and cached.
        self._split_text = not text_tower.dual and isinstance(getattr(getattr(self.text_model, "encoder", None), "layer", None), nn.ModuleList)
        self.trained_modules = self._choose_trained_modules()
        for p in self.image_model.parameters():
            p.requires_grad_(False)
        for p in self.text_model.parameters():
            p.requires_grad_(False)
        for name in self.trained_modules:
            for p in self.get_submodule(name).parameters():
                p.requires_grad_(True)
        self._image_cache = _LRU(config.frozen_cache_items)
        self._text_cache = _LRU(config.frozen_cache_items)
        self.train(False)

    # ---- which blocks train -------------------------------------------------------------------

    def _choose_trained_modules(self) -> list[str]:
        c, names = self.config, []
        if self._efficientnet:
            blocks = len(self.image_model._blocks)
            if c.image_blocks > blocks:
                raise ValueError(f"image_blocks={c.image_blocks} but {c.image_tower} has {blocks} blocks")
            self._image_split = blocks - c.image_blocks
            if c.image_blocks:
                names += [f"image_model._blocks.{i}" for i in range(self._image_split, blocks)]
                names += ["image_model._conv_head", "image_model._bn1"]
        elif c.image_blocks:
            path, layers = _layer_list(self.image_model, "vision_model")
            if c.image_blocks > len(layers):
                raise ValueError(f"image_blocks={c.image_blocks} but {c.image_tower} has {len(layers)} layers")
            names += [f"image_model.{path}.{i}" for i in range(len(layers) - c.image_blocks, len(layers))]
            names += [f"image_model.{p}" for p in _modules_after(self.image_model, "", (
                "vision_model.post_layernorm", "vision_model.head", "visual_projection"))]
        if self._split_text:  # the frozen layers' output is cached, also when no text layer trains
            self._text_split = len(self.text_model.encoder.layer) - min(c.text_layers, len(self.text_model.encoder.layer))
        if c.text_layers:
            root = "text_model" if self._text.dual and hasattr(self.text_model, "text_model") else ""
            path, layers = _layer_list(self.text_model, root)
            if c.text_layers > len(layers):
                raise ValueError(f"text_layers={c.text_layers} but {c.text_tower} has {len(layers)} layers")
            self._text_split = len(layers) - c.text_layers
            names += [f"text_model.{path}.{i}" for i in range(self._text_split, len(layers))]
            if self._text.dual:
                names += [f"text_model.{p}" for p in _modules_after(self.text_model, "", (
                    "text_model.final_layer_norm", "text_model.head", "text_projection"))]
        return names

    def train(self, mode: bool = True) -> FinetunedTowerEncoder:
        """Only the head and the trained blocks follow ``mode``; frozen blocks stay in eval mode,
        and so does BatchNorm everywhere unless ``train_batchnorm_stats``."""
        super().train(mode)
        self.image_model.eval()
        self.text_model.eval()
        for name in self.trained_modules:
            module = self.get_submodule(name)
            module.train(mode)
            if not self.config.train_batchnorm_stats:
                for sub in module.modules():
                    if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                        sub.eval()
        return self

    def learning_rate_scale(self, name: str) -> float:
        """The training loop's optimizer reads this: the head at the full rate, the towers slower."""
        return 1.0 if name.startswith(HEAD_PREFIX) else self.config.tower_learning_rate_scale

    @property
    def temperature(self) -> torch.Tensor:
        return self.head.temperature

    def embedding_batch_size(self) -> int:
        return 64

    # ---- towers -------------------------------------------------------------------------------

    def _image_frozen(self, pixels: torch.Tensor) -> torch.Tensor:
        m = self.image_model
        with torch.no_grad():
            x = m._swish(m._bn0(m._conv_stem(pixels)))
            for block in m._blocks[: self._image_split]:
                x = block(x)  # eval mode: no stochastic depth
        return x

    def _image_trained(self, x: torch.Tensor) -> torch.Tensor:
        m = self.image_model
        rate = m._global_params.drop_connect_rate
        for idx in range(self._image_split, len(m._blocks)):
            x = m._blocks[idx](x, drop_connect_rate=rate * float(idx) / len(m._blocks) if rate else rate)
        return pool_feature_map(m._swish(m._bn1(m._conv_head(x))), self._pooling)

    def image_features(self, inputs: ListingInputs, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled image features ``[n, dim]`` of ``rows`` (zeros where a listing has no image) and the mask."""
        device = self.device
        rows = [int(i) for i in rows]
        keys = [None] * len(rows)
        if inputs.images is None and inputs.image_uris is not None:
            keys = [inputs.image_uris[i] or None for i in rows]
        cached = [self._image_cache.get(key) if self._efficientnet else None for key in keys]
        needed = [j for j, value in enumerate(cached) if value is None]
        loaded = dict(zip(needed, inputs.load_images([rows[j] for j in needed]))) if needed else {}
        present = [j for j in range(len(rows)) if cached[j] is not None or loaded.get(j) is not None]
        mask = torch.zeros(len(rows), dtype=torch.bool, device=device)
        mask[present] = True
        if not present:
            return torch.zeros(len(rows), self.head.config.image_dim, device=device), mask
        to_compute = [j for j in present if cached[j] is None]
        if to_compute:
            pixels = image_pixels([loaded[j] for j in to_compute], self.image_processor, self.config.image_size).to(device)
            if self._efficientnet:
                frozen = self._image_frozen(pixels)
                for j, value in zip(to_compute, frozen):
                    self._image_cache.put(keys[j], value)
                    cached[j] = value
            else:
                computed = _pooled(self.image_model.get_image_features(pixel_values=pixels))
        if self._efficientnet:
            features = self._image_trained(torch.stack([cached[j].to(device) for j in present]))
        else:
            features = computed
        out = torch.zeros(len(rows), features.shape[1], dtype=features.dtype, device=device)
        out[present] = features
        return out, mask

    def _text_frozen(self, texts: list[str]) -> list[torch.Tensor]:
        """Per text, the hidden states ``[tokens, d]`` entering the first trained layer."""
        encoded = self._text.tokenize(texts, self.device)
        with torch.no_grad():
            hidden = self.text_model(**encoded, output_hidden_states=True).hidden_states[self._text_split]
        lengths = encoded["attention_mask"].sum(1).tolist()
        return [hidden[i, : int(n)] for i, n in enumerate(lengths)]

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Sentence features ``[n, dim]`` of ``texts`` (mean-pooled, or CLIP/SigLIP's projected feature)."""
        device = self.device
        if not self._split_text:
            encoded = self._text.tokenize(texts, device)
            if self._text.dual:
                return _pooled(self.text_model.get_text_features(**encoded))
            return mean_pooled(self.text_model(**encoded).last_hidden_state, encoded["attention_mask"])
        cached = [self._text_cache.get(text) for text in texts]
        missing = sorted({text for text, value in zip(texts, cached) if value is None})
        if missing:
            fresh = dict(zip(missing, self._text_frozen(missing)))
            for text in missing:
                self._text_cache.put(text, fresh[text])
            cached = [value if value is not None else fresh[text] for text, value in zip(texts, cached)]
        hidden = nn.utils.rnn.pad_sequence([value.to(device) for value in cached], batch_first=True)
        lengths = torch.tensor([len(value) for value in cached], device=device)
        mask = (torch.arange(hidden.shape[1], device=device)[None, :] < lengths[:, None]).to(hidden.dtype)
        additive = (1.0 - mask[:, None, None, :]) * torch.finfo(hidden.dtype).min
        for layer in self.text_model.encoder.layer[self._text_split :]:
            out = layer(hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
        return mean_pooled(hidden, mask)

    def tower_features(self, inputs: ListingInputs, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, mask = self.image_features(inputs, rows)
        return image, mask, self.text_features(inputs.texts(rows))

    def embed_rows(self, inputs: ListingInputs, rows: np.ndarray) -> torch.Tensor:
        image, mask, text = self.tower_features(inputs, rows)
        return self.head(image, mask, text)

    def frozen_image_outputs(self) -> dict[str, torch.Tensor]:
        """The cached frozen-block outputs by image URI (to keep them on disk between runs)."""
        return dict(self._image_cache.items)

    def load_frozen_image_outputs(self, outputs: dict[str, torch.Tensor]) -> None:
        """Fill the cache with outputs an earlier :meth:`frozen_image_outputs` gave (same tower and image size)."""
        for key, value in outputs.items():
            self._image_cache.put(key, value)

    def cache_stats(self) -> dict[str, int]:
        return {"image_hits": self._image_cache.hits, "image_misses": self._image_cache.misses,
                "text_hits": self._text_cache.hits, "text_misses": self._text_cache.misses}

    # ---- training start, saving ---------------------------------------------------------------

    def prepare_training(self, inputs: ListingInputs, seed: int) -> None:
        """The head's PCA start from the zero-shot features of up to ``pca_rows`` listings (the
        cached tower features when ``inputs`` carries them for the same towers)."""
        features = inputs.features
        if features is None or features.image.shape[1] != self.head.config.image_dim or features.text.shape[1] != self.head.config.text_dim:
            rows = np.sort(np.random.default_rng(seed).permutation(len(inputs))[: self.config.pca_rows])
            was_training = self.training
            self.eval()
            chunks = []
            with torch.inference_mode():
                for start in range(0, len(rows), self.embedding_batch_size()):
                    chunk = rows[start : start + self.embedding_batch_size()]
                    chunks.append([t.float().cpu().numpy() for t in self.tower_features(inputs, chunk)])
            self.train(was_training)
            if not chunks:
                return
            image, mask, text = (np.concatenate(parts) for parts in zip(*chunks))
            features = ListingFeatures([inputs.listing_ids[i] for i in rows], image, mask, text)
        self.head.init_from_features(features, seed=seed)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What :meth:`save` keeps: the head and the trained blocks (weights and buffers), not the frozen towers."""
        prefixes = tuple(f"{name}." for name in self.trained_modules) + (HEAD_PREFIX,)
        return {name: t.detach() for name, t in self.state_dict().items() if name.startswith(prefixes)}

    def save(self, directory: str | os.PathLike) -> Path:
        def fill(staging: Path) -> None:
            save_file({name: t.cpu().contiguous() for name, t in self.trained_state().items()}, str(staging / WEIGHTS_FILE))
            write_encoder_json(staging, KIND, image_tower=self.config.image_tower, text_tower=self.config.text_tower,
                               unfrozen_image_blocks=self.config.image_blocks, unfrozen_text_layers=self.config.text_layers,
                               trained_modules=self.trained_modules, config=asdict(self.config), head=asdict(self.head.config))

        return write_folder_atomically(directory, fill)


def new_finetuned_encoder(
    image_tower: str = DEFAULT_IMAGE_MODEL,
    text_tower: str = DEFAULT_TEXT_MODEL,
    embed_dim: int = 256,
    unfrozen_blocks: int = 1,
    unfrozen_text_layers: int | None = None,
    tower_learning_rate_scale: float = 0.1,
    head: dict | None = None,
    device: str = "cpu",
    **settings,
) -> FinetunedTowerEncoder:
    """A fresh encoder over the pretrained towers: the last ``unfrozen_blocks`` image blocks and the
    last ``unfrozen_text_layers`` (default: ``unfrozen_blocks``) text layers train. ``head``:
    :class:`DualTowerConfig` overrides (hidden_dim, dropout, init_temperature, ...); ``settings``:
    the other :class:`FinetuneConfig` fields."""
    config = FinetuneConfig(
        image_tower=image_tower, text_tower=text_tower, image_blocks=unfrozen_blocks,
        text_layers=unfrozen_blocks if unfrozen_text_layers is None else unfrozen_text_layers,
        tower_learning_rate_scale=tower_learning_rate_scale, head={**(head or {}), "embed_dim": embed_dim}, **settings,
    )
    return encoder_from_config(config, device)


def encoder_from_config(config: FinetuneConfig, device: str = "cpu") -> FinetunedTowerEncoder:
    image_model, processor, image_dim = load_image_tower(config.image_tower, config.image_size)
    text = load_text_tower(config.text_tower, config.max_length)
    return FinetunedTowerEncoder(config, image_model, processor, image_dim, text).to(device)


def load_finetuned_encoder(directory: str | os.PathLike, device: str = "cpu") -> FinetunedTowerEncoder:
    """The encoder :meth:`FinetunedTowerEncoder.save` wrote: the pretrained towers rebuilt from
    their names, the trained blocks and the head loaded over them; eval mode, on ``device``."""
    folder = Path(directory)
    if not (folder / ENCODER_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(f"{folder} holds no {KIND} encoder (needs {ENCODER_FILE} and {WEIGHTS_FILE})")
    described = json.loads((folder / ENCODER_FILE).read_text())
    if described.get("kind") != KIND:
        raise ValueError(f"{folder / ENCODER_FILE} is of kind {described.get('kind')!r}, not {KIND!r}")
    config = FinetuneConfig(**described["config"])
    encoder = encoder_from_config(config, "cpu")
    state = load_file(str(folder / WEIGHTS_FILE))
    expected = set(encoder.trained_state())
    if set(state) != expected:
        raise ValueError(f"{folder / WEIGHTS_FILE} does not fit {KIND} with {config.image_blocks} image blocks and "
                         f"{config.text_layers} text layers: missing {sorted(expected - set(state))[:5]}, "
                         f"unknown {sorted(set(state) - expected)[:5]}")
    encoder.load_state_dict(state, strict=False)
    return encoder.to(device).eval()


__all__ = ["FinetuneConfig", "FinetunedTowerEncoder", "encoder_from_config", "load_finetuned_encoder", "new_finetuned_encoder"]
