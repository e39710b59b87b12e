"""The encoder backend setting and the one interface every backend serves through."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from afmrl_dagster.encoders.backends import EncoderBackend, EncoderSpecError
from afmrl_dagster.encoders.dual_tower import DualTowerConfig, DualTowerHead, ListingFeatures
from afmrl_dagster.encoders.listing_encoder import (
    ENCODER_FILE,
    FrozenTowerEncoder,
    ListingInputs,
    encoder_kind,
    load_encoder,
    write_encoder_json,
)
from afmrl_dagster.settings import Settings
from afmrl_dagster.training.encoder_training import EncoderTrainingConfig, train_backend_encoder, train_encoder


def _features(n: int = 16, seed: int = 0) -> ListingFeatures:
    rng = np.random.default_rng(seed)
    return ListingFeatures([f"l{i}" for i in range(n)], rng.normal(size=(n, 12)), rng.random(n) > 0.2, rng.normal(size=(n, 8)))


@pytest.mark.parametrize("spec, kind, model", [
    ("dual-tower", "dual-tower", None),
    (" dual-tower-finetune ", "dual-tower-finetune", None),
    ("vlm2vec:Qwen/Qwen2-VL-2B-Instruct", "vlm2vec", "Qwen/Qwen2-VL-2B-Instruct"),
    ("vlm2vec:/models/my vlm", "vlm2vec", "/models/my vlm"),
])
def test_backend_setting_parses(spec, kind, model):
    backend = EncoderBackend.parse(spec)
    assert (backend.kind, backend.model) == (kind, model)
    assert backend.reads_raw_inputs == (kind != "dual-tower")
    assert EncoderBackend.parse(backend.spec) == backend


@pytest.mark.parametrize("spec", ["", "clip", "vlm2vec", "vlm2vec: ", "dual_tower"])
def test_a_setting_that_names_no_backend_fails_with_the_choices(spec):
    with pytest.raises(EncoderSpecError, match="dual-tower-finetune"):
        EncoderBackend.parse(spec)


def test_definitions_refuse_an_unknown_encoder_setting():
    from afmrl_dagster.definitions import build_resources

    with pytest.raises(EncoderSpecError, match="'clip-large'"):
        build_resources(Settings.from_env({"AFMRL_ENCODER": "clip-large"}))
    assert build_resources(Settings.from_env({"AFMRL_ENCODER": "vlm2vec:/m"}))["listing_encoder"].backend().model == "/m"


def test_frozen_tower_backend_trains_exactly_as_train_encoder():
    features = _features()
    products = [f"p{i // 2}" for i in range(16)]
    lines = ["a"] * 8 + ["b"] * 8
    texts = [f"colour: c{i // 2}" for i in range(16)]
    config = EncoderTrainingConfig(epochs=2, batch_size=4, head=DualTowerConfig(embed_dim=8, hidden_dim=16))
    direct = train_encoder(features, products, lines, texts, config)
    inputs = ListingInputs(features.listing_ids, [""] * 16, features=features)
    through_backend = train_backend_encoder(EncoderBackend.parse("dual-tower"), inputs, products, lines, texts, config)
    for name, tensor in direct.head.state_dict().items():
        torch.testing.assert_close(tensor, through_backend.encoder.head.state_dict()[name], rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="features is missing"):
        train_backend_encoder(EncoderBackend(), ListingInputs(features.listing_ids, [""] * 16), products, lines, texts, config)


def test_saved_encoders_load_by_their_kind(tmp_path):
    head = DualTowerHead(DualTowerConfig(embed_dim=8, image_dim=12, text_dim=8, hidden_dim=16))
    encoder = FrozenTowerEncoder(head)
    features = _features()
    inputs = ListingInputs(features.listing_ids, ["t"] * 16, features=features)
    encoder.save(tmp_path / "head")
    assert encoder_kind(tmp_path / "head") == "dual-tower"
    np.testing.assert_array_equal(encoder.embed(inputs), load_encoder(tmp_path / "head").embed(inputs))

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no saved encoder"):
        load_encoder(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    write_encoder_json(tmp_path / "odd", "clip")
    with pytest.raises(ValueError, match=f"{ENCODER_FILE} names kind 'clip'"):
        load_encoder(tmp_path / "odd")
    assert json.loads((tmp_path / "odd" / ENCODER_FILE).read_text())["kind"] == "clip"


def test_listing_inputs_name_what_does_not_fit():
    with pytest.raises(ValueError, match="3 listing ids but 2 titles"):
        ListingInputs(["a", "b", "c"], ["x", "y"])
    inputs = ListingInputs(["a", "b"], ["Milk", "Juice"], [{"fat": "3%"}, None], ["mem://a.png", None],
                           read_bytes=lambda uri: b"not an image")
    assert inputs.texts() == ["Milk | fat: 3%", "Juice"]
    assert inputs.load_images([1]) == [None]
    with pytest.raises(ValueError, match=r"listing 'a': image_uri 'mem://a.png' cannot be read"):
        inputs.load_images([0])
    assert inputs.subset([1]).listing_ids == ["b"]
