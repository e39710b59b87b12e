"""The trainable head over frozen tower features: one embedding per listing.

Only this head is trained by AGCL. It projects the (normalised) image and text features
into a shared space and adds a small residual MLP that learns the interaction. The linear
part starts as an orthonormal projection of the zero-shot concatenation, and the residual
starts at zero, so an untrained head ranks almost like the zero-shot embedding: small
catalogs train few steps and must not start from noise.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..local_files import write_folder_atomically
from ..settings import DEFAULT_IMAGE_TOWER, DEFAULT_TEXT_TOWER

MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 1.0
WEIGHTS_FILE = "head.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class ListingFeatures:
    """Frozen-tower features of N listings, row ``i`` belonging to ``listing_ids[i]``."""

    listing_ids: list[str]
    image: np.ndarray
    image_mask: np.ndarray
    text: np.ndarray

    def __post_init__(self) -> None:
        self.listing_ids = list(self.listing_ids)
        self.image = np.asarray(self.image, dtype=np.float32)
        self.image_mask = np.asarray(self.image_mask, dtype=bool)
        self.text = np.asarray(self.text, dtype=np.float32)
        n = len(self.listing_ids)
        if self.image.ndim != 2 or self.text.ndim != 2 or self.image_mask.ndim != 1:
            raise ValueError("image and text must be 2-D, image_mask 1-D")
        if not (len(self.image) == len(self.image_mask) == len(self.text) == n):
            raise ValueError(
                f"row counts differ: {n} ids, {len(self.image)} image, {len(self.image_mask)} mask, {len(self.text)} text"
            )

    def __len__(self) -> int:
        return len(self.listing_ids)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ListingFeatures":
        """The rows ``indices`` (in that order) as new features."""
        indices = np.asarray(indices, dtype=np.int64)
        return ListingFeatures(
            [self.listing_ids[i] for i in indices], self.image[indices], self.image_mask[indices], self.text[indices]
        )


@dataclass
class DualTowerConfig:
    """Shape and start of the head; the tower names are recorded so a head is not fused with others."""

    embed_dim: int = 256
    image_dim: int = 1280
    text_dim: int = 384
    hidden_dim: int = 512
    dropout: float = 0.1
    init_temperature: float = 0.05
    learn_temperature: bool = True
    image_tower: str = DEFAULT_IMAGE_TOWER
    text_tower: str = DEFAULT_TEXT_TOWER

    def __post_init__(self) -> None:
        for name in ("embed_dim", "image_dim", "text_dim", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not MIN_TEMPERATURE <= self.init_temperature <= MAX_TEMPERATURE:
            raise ValueError(f"init_temperature must be in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {self.init_temperature}")


def _zero_shot_parts(image: torch.Tensor, image_mask: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Concatenation of the normalised image (zero when missing) and normalised text features."""
    image = F.normalize(image, dim=-1) * image_mask.to(image.dtype).unsqueeze(-1)
    return torch.cat([image, F.normalize(text, dim=-1)], dim=-1)


class DualTowerHead(nn.Module):
    """Trainable projection and fusion of frozen image and text features, L2-normalised output."""

    def __init__(self, config: DualTowerConfig | None = None):
        super().__init__()
        self.config = config or DualTowerConfig()
        c = self.config
        self.image_proj = nn.Linear(c.image_dim, c.embed_dim, bias=False)
        self.text_proj = nn.Linear(c.text_dim, c.embed_dim, bias=False)
        self.residual = nn.Sequential(
            nn.Linear(c.image_dim + c.text_dim + 1, c.hidden_dim),
            nn.GELU(),
            nn.Dropout(c.dropout),
            nn.Linear(c.hidden_dim, c.embed_dim),
        )
        self.log_temperature = nn.Parameter(
            torch.tensor(math.log(c.init_temperature)), requires_grad=c.learn_temperature
        )
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)
        gaussian = torch.randn(c.image_dim + c.text_dim, c.embed_dim)
        self._set_projection(torch.linalg.qr(gaussian).Q if c.embed_dim <= gaussian.shape[0] else gaussian)

    def _set_projection(self, basis: torch.Tensor) -> None:
        """Use the columns of ``basis`` [image_dim + text_dim, embed_dim] as the linear projection."""
        with torch.no_grad():
            self.image_proj.weight.copy_(basis[: self.config.image_dim].T)
            self.text_proj.weight.copy_(basis[self.config.image_dim :].T)

    @torch.no_grad()
    def init_from_features(self, features: "ListingFeatures", max_rows: int = 4096, seed: int = 0) -> None:
        """Start the projection at the top principal directions of the zero-shot concatenation.

        Uncentred PCA keeps the largest part of the zero-shot inner products that fits in
        ``embed_dim`` dimensions, which a random projection would blur.
        """
        if len(features) == 0:
            return
        rows = np.random.default_rng(seed).permutation(len(features))[:max_rows]
        parts = _zero_shot_parts(
            torch.from_numpy(features.image[rows]), torch.from_numpy(features.image_mask[rows]), torch.from_numpy(features.text[rows])
        ).double()
        if parts.shape[1] != self.config.image_dim + self.config.text_dim:
            raise ValueError(f"features have {parts.shape[1]} dims, the head expects {self.config.image_dim + self.config.text_dim}")
        parts = F.normalize(parts, dim=-1)
        _, vectors = torch.linalg.eigh(parts.T @ parts)
        k = min(self.config.embed_dim, vectors.shape[1])
        basis = torch.zeros(vectors.shape[0], self.config.embed_dim, dtype=torch.float64)
        basis[:, :k] = vectors.flip(-1)[:, :k]
        self._set_projection(basis.float())

    @property
    def temperature(self) -> torch.Tensor:
        """Softmax temperature tau, learnable in log space and clamped to a sane range."""
        return self.log_temperature.clamp(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)).exp()

    def forward(self, image: torch.Tensor, image_mask: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[N, embed_dim]``; a listing without image (mask False) is embedded from its text."""
        parts = _zero_shot_parts(image, image_mask, text)
        image_part, text_part = parts[:, : self.config.image_dim], parts[:, self.config.image_dim :]
        base = self.image_proj(image_part) + self.text_proj(text_part)
        mask = image_mask.to(parts.dtype).unsqueeze(-1)
        return F.normalize(base + self.residual(torch.cat([parts, mask], dim=-1)), dim=-1)


def zero_shot_embeddings(features: ListingFeatures) -> np.ndarray:
    """Embedding of the untrained towers: normalised concat of normalised image and text features."""
    parts = _zero_shot_parts(
        torch.from_numpy(features.image), torch.from_numpy(features.image_mask), torch.from_numpy(features.text)
    )
    return F.normalize(parts, dim=-1).numpy().astype(np.float32)


def _device_of(head: nn.Module) -> torch.device:
    return next(head.parameters()).device


def embed_features(head: DualTowerHead, features: ListingFeatures, batch_size: int = 1024, device: str = "cpu") -> np.ndarray:
    """Head embeddings ``float32 [N, embed_dim]`` of all listings (eval mode, batched)."""
    was_training, home = head.training, _device_of(head)
    head.to(device).eval()
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            stop = start + batch_size
            chunks.append(
                head(
                    torch.from_numpy(features.image[start:stop]).to(device),
                    torch.from_numpy(features.image_mask[start:stop]).to(device),
                    torch.from_numpy(features.text[start:stop]).to(device),
                ).float().cpu().numpy()
            )
    head.to(home).train(was_training)
    if not chunks:
        return np.zeros((0, head.config.embed_dim), dtype=np.float32)
    return np.concatenate(chunks)


def save_head(head: DualTowerHead, directory: str | os.PathLike) -> Path:
    """Write ``head.safetensors`` + ``config.json`` into ``directory``, atomically (all or nothing)."""

    def fill(staging: Path) -> None:
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in head.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_FILE))
        (staging / CONFIG_FILE).write_text(json.dumps(asdict(head.config), indent=2, sort_keys=True))

    return write_folder_atomically(directory, fill)


def load_head(directory: str | os.PathLike, device: str = "cpu") -> DualTowerHead:
    """Load a head written by :func:`save_head`, in eval mode."""
    directory = Path(directory)
    config = DualTowerConfig(**json.loads((directory / CONFIG_FILE).read_text()))
    head = DualTowerHead(config)
    head.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    return head.to(device).eval()


def load_stored_head(store, uri: str, device: str = "cpu") -> DualTowerHead:
    """Load the head folder kept at ``uri`` of an artefact store (a manifest's ``uri``), checksums verified."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="afmrl-head-") as scratch:
        return load_head(store.download_directory(store.key_of(uri), Path(scratch) / "head"), device=device)
