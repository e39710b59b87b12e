"""Every hyper-parameter default has one source, the library's config dataclasses: the assets'
``dg.Config`` classes read their defaults from there, and the ladders take them too.

Fields are compared generically: every field of a ``dg.Config`` below must either have a
library counterpart with the same default or be declared pipeline-only, so a default that
drifts, or a new field added to one side only, fails here."""

from __future__ import annotations

import dataclasses

import pytest

from afmrl_dagster.assets.attributes import AttributeGeneratorConfig
from afmrl_dagster.assets.cit import CITConfig
from afmrl_dagster.assets.encoder import EncoderTrainingRunConfig
from afmrl_dagster.assets.rar import RARConfig
from afmrl_dagster.encoders.dual_tower import DualTowerConfig
from afmrl_dagster.training.agcl import AGCLConfig
from afmrl_dagster.encoders.finetune import FinetuneConfig
from afmrl_dagster.encoders.vlm2vec import VLM2VecTrainingSettings
from afmrl_dagster.training.attribute_stages import CITSettings, DistillationSettings, RARSettings
from afmrl_dagster.training.checkpoints import LoopCheckpoint
from afmrl_dagster.training.encoder_training import EncoderTrainingConfig
from afmrl_dagster.training.generator_backends import HFDistillationSettings, HFRARSettings
from afmrl_dagster.training.generator_sft import SFTConfig
from afmrl_dagster.training.grpo import GRPOConfig


@dataclasses.dataclass
class Mirror:
    config: type  # a dg.Config of an asset
    sources: tuple[type, ...]  # library dataclasses, searched in order for a field of the same name
    renamed: dict[str, tuple[type, str]] = dataclasses.field(default_factory=dict)  # config field -> (dataclass, its field)
    pipeline_only: frozenset[str] = frozenset()  # gates and choices the library has no notion of (allowed, not required)


MIRRORS = [
    Mirror(AttributeGeneratorConfig, (DistillationSettings, HFDistillationSettings), pipeline_only=frozenset({"min_heldout_validity"}),
           renamed={"checkpoint_every": (LoopCheckpoint, "every")}),
    Mirror(
        EncoderTrainingRunConfig, (EncoderTrainingConfig, AGCLConfig),
        renamed={"embed_dim": (DualTowerConfig, "embed_dim"), "use_attribute_weights": (AGCLConfig, "use_weights"),
                 **{f"finetune_{name}": (FinetuneConfig, name) for name in ("image_blocks", "text_layers", "tower_learning_rate_scale")},
                 **{f"vlm2vec_{name}": (VLM2VecTrainingSettings, name) for name in ("learning_rate", "lora_rank", "image_size")}},
    ),
    Mirror(RARConfig, (GRPOConfig, RARSettings, HFRARSettings), renamed={"checkpoint_every": (LoopCheckpoint, "every")}),
    Mirror(CITConfig, (CITSettings,), pipeline_only=frozenset({"promotion_margin"})),
]


def library_default(cls: type, name: str):
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise AssertionError(f"{cls.__name__}.{name} has no default")


def library_source(mirror: Mirror, name: str) -> tuple[type, str] | None:
    if name in mirror.renamed:
        return mirror.renamed[name]
    for cls in mirror.sources:
        if name in {f.name for f in dataclasses.fields(cls)}:
            return cls, name
    return None


def pairs(mirror: Mirror) -> list[tuple[str, type, str]]:
    """(config field, library dataclass, library field) for every field the two share."""
    found = []
    for name in mirror.config.model_fields:
        source = library_source(mirror, name)
        if source is not None:
            found.append((name, *source))
    return found


@pytest.mark.parametrize("mirror", MIRRORS, ids=lambda mirror: mirror.config.__name__)
def test_asset_config_defaults_are_the_library_defaults(mirror):
    fields = mirror.config.model_fields
    shared = pairs(mirror)
    assert shared, f"{mirror.config.__name__} shares no field with {[cls.__name__ for cls in mirror.sources]}"
    drifted = {
        name: (fields[name].default, f"{cls.__name__}.{library_field}", library_default(cls, library_field))
        for name, cls, library_field in shared
        if fields[name].default != library_default(cls, library_field)
    }
    assert not drifted, f"{mirror.config.__name__} defaults differ from the library's (field: asset, library field, library): {drifted}"
    unmatched = set(fields) - {name for name, _, _ in shared} - mirror.pipeline_only
    assert not unmatched, (f"{mirror.config.__name__} fields {sorted(unmatched)} have no library counterpart: add them to "
                           f"the library dataclass (and read the default from there) or declare them pipeline-only here")


@pytest.mark.parametrize("mirror", MIRRORS, ids=lambda mirror: mirror.config.__name__)
def test_a_default_asset_config_builds_the_default_library_config(mirror):
    """Built from a default ``dg.Config`` field by field, each library dataclass equals its own default."""
    config = mirror.config()
    for cls in {cls for _, cls, _ in pairs(mirror)}:
        values = {library_field: getattr(config, name) for name, source, library_field in pairs(mirror) if source is cls}
        assert cls(**values) == cls(), cls.__name__


def test_distillation_defaults_are_the_generator_and_sft_defaults():
    from afmrl_dagster.attributes.generator import GeneratorConfig

    settings = DistillationSettings()
    assert (settings.d_model, settings.n_layers) == (GeneratorConfig().d_model, GeneratorConfig().n_layers)
    sft = SFTConfig()
    assert (settings.epochs, settings.batch_size, settings.learning_rate, settings.seed) == (sft.epochs, sft.batch_size, sft.learning_rate, sft.seed)


def test_the_ladders_take_the_library_defaults():
    from afmrl_dagster.experiments.attribute_ladder import AttributeChainSettings
    from afmrl_dagster.experiments.quality_ladder import LadderSettings

    chain = AttributeChainSettings()
    assert chain.grpo == GRPOConfig()
    assert chain.distillation == DistillationSettings()
    assert chain.cit == CITSettings()
    assert chain.invalid_reward == RARSettings.invalid_reward
    assert not chain.reward_k  # None or 0: the automatic choice, as RARSettings.reward_k
    assert LadderSettings().training == {}, "the ladder's trained rows run EncoderTrainingConfig's defaults unless a dataset overrides them"
