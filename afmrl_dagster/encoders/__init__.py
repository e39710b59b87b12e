"""Listing encoders: the frozen image and text towers, the trainable dual-tower head over their
features, and the VLM2Vec embedder over a vision-language model. Above
:mod:`afmrl_dagster.attributes` (listing texts) and :mod:`afmrl_dagster.vlm`; their training
is in :mod:`afmrl_dagster.training`.

Names are imported from their submodule on first use (:mod:`afmrl_dagster.lazy_exports`).
"""

from ..lazy_exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "dual_tower": ["CONFIG_FILE", "DualTowerConfig", "DualTowerHead", "ListingFeatures", "WEIGHTS_FILE", "embed_features", "load_head",
                   "save_head", "zero_shot_embeddings"],
    "towers": ["DEFAULT_IMAGE_MODEL", "DEFAULT_TEXT_MODEL", "ImageFeaturizer", "TextFeaturizer", "decode_image"],
    "vlm2vec": ["VLM2VecConfig", "VLM2VecEncoder", "listing_prompt_text", "load_vlm2vec_encoder", "new_vlm2vec_encoder"],
})
