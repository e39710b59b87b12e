"""A Hugging Face image-text-to-text model (Qwen2-VL / Qwen2.5-VL, LLaVA, Idefics3 families,
by hub id or local folder) as the teacher, in process.

Listings are annotated in batches, each with its photo and the versioned teacher prompt
(:data:`~afmrl_dagster.attributes.prompts.TEACHER_PROMPT`), greedy and, unless
``constrained_json=False``, grammar-constrained to an attribute JSON object
(:mod:`.json_constraint`; ``max_new_tokens`` must then be at least 10). The raw text is returned as
it is: strict parsing and recording invalid outputs is the caller's job
(:func:`~afmrl_dagster.attributes.teacher.attribute_table`), and outputs are cached per
listing by content (:mod:`.annotation_cache`) under :attr:`HFVLMTeacher.cache_identity`.
"""

from __future__ import annotations

import io
from typing import Callable

import PIL.Image
import polars as pl

from .hf_generator import HFAttributeGenerator, HFGeneratorConfig
from .prompts import TEACHER_PROMPT, PromptTemplate

HF_VLM_PREFIX = "hf-vlm:"


def hf_vlm_model(spec: str) -> str:
    """The hub id or folder of an ``hf-vlm:<id or folder>`` spec; a clear error otherwise."""
    if not spec.startswith(HF_VLM_PREFIX) or not spec[len(HF_VLM_PREFIX):].strip():
        raise ValueError(f"expected 'hf-vlm:<hub id or local folder>', got {spec!r}")
    return spec[len(HF_VLM_PREFIX):].strip()


def decode_listing_image(data: bytes, listing_id: str) -> PIL.Image.Image:
    """RGB image of a listing's photo bytes; a ValueError naming the listing when they do not decode."""
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"listing {listing_id!r}: its photo cannot be decoded ({error})") from error
    return image.convert("RGB")


class HFVLMTeacher:
    """An :class:`~afmrl_dagster.attributes.teacher.AttributeTeacher` running a Hugging Face VLM in process."""

    name = "hf-vlm"

    def __init__(
        self,
        model: str,
        read_image: Callable[[str], bytes] | None = None,
        revision: str = "",
        batch_size: int = 4,
        max_new_tokens: int = 128,
        image_size: int | None = 448,
        device: str = "cpu",
        prompt: PromptTemplate = TEACHER_PROMPT,
        keys: set[str] | None = None,
        send_images: bool = True,
        constrained_json: bool = True,
    ):
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"need batch_size >= 1 and max_new_tokens >= 1, got {batch_size} and {max_new_tokens}")
        self.model, self.read_image, self.revision = model, read_image, revision
        self.batch_size, self.max_new_tokens, self.image_size, self.device = batch_size, max_new_tokens, image_size, device
        self.prompt, self.keys, self.send_images = prompt, keys, send_images
        self.constrained_json = constrained_json
        self._generator: HFAttributeGenerator | None = None

    @property
    def version(self) -> str:
        return f"{self.model}@{self.revision or 'unversioned'}+{self.prompt.id}"

    @property
    def cache_identity(self) -> str:
        keys = ",".join(sorted(self.keys)) if self.keys else "free-keys"
        images = self.send_images and self.read_image is not None
        identity = f"{self.name}:{self.version}:{keys}:images={images}:size={self.image_size}:tokens={self.max_new_tokens}"
        return f"{identity}:json-constrained" if self.constrained_json else identity

    def generator(self) -> HFAttributeGenerator:
        """The model, loaded on first use."""
        if self._generator is None:
            config = HFGeneratorConfig(model=self.model, use_lora=False, max_new_tokens=self.max_new_tokens, image_size=self.image_size,
                                       constrained_json=self.constrained_json)
            self._generator = HFAttributeGenerator.from_pretrained(config, device=self.device, prompt=self.prompt)
        return self._generator

    def _image(self, row: dict) -> PIL.Image.Image | None:
        uri = row.get("image_uri")
        if not uri or self.read_image is None or not self.send_images:
            return None
        return decode_listing_image(self.read_image(uri), row["listing_id"])

    def annotate(self, listings: pl.DataFrame) -> list[str]:
        """One raw answer per row, in order (greedy, ``batch_size`` listings per forward pass)."""
        rows = listings.to_dicts()
        if not rows:
            return []
        generator = self.generator()
        images = [self._image(row) for row in rows]
        prompts = [self.prompt.render(row.get("title") or "", row.get("description"), self.keys) for row in rows]
        return generator.generate(images, prompts, batch_size=self.batch_size)
