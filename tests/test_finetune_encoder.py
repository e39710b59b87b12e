"""dual-tower-finetune: the real pretrained towers with their last blocks trained on real grocery photos."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from afmrl_dagster.encoders.finetune import FinetunedTowerEncoder, load_finetuned_encoder, new_finetuned_encoder
from afmrl_dagster.encoders.listing_encoder import ListingInputs, load_encoder
from afmrl_dagster.encoders.towers import ImageFeaturizer
from afmrl_dagster.training.agcl import AGCLConfig
from afmrl_dagster.training.encoder_training import EncoderTrainingConfig, make_optimizer, train_listing_encoder

PRODUCTS = ("Milk/Arla-Standard-Milk", "Milk/Arla-Medium-Fat-Milk", "Juice/Tropicana-Apple-Juice", "Yoghurt/Arla-Natural-Yoghurt")


@pytest.fixture(scope="module")
def base_encoder() -> FinetunedTowerEncoder:
    torch.manual_seed(0)
    return new_finetuned_encoder(embed_dim=32, unfrozen_blocks=1, head={"hidden_dim": 64})


@pytest.fixture(scope="module")
def grocery(shared_data):
    """Three store photos of each of four packaged products (two near-identical milks among them)."""
    root = shared_data / "grocery_store" / "train" / "Packages"
    uris, products = [], []
    for product in PRODUCTS:
        photos = sorted((root / product).glob("*.jpg"))[:3]
        if len(photos) < 2:
            pytest.skip(f"fewer than 2 photos of {product} in the shared data")
        uris += [str(p) for p in photos]
        products += [product] * len(photos)
    data = {uri: open(uri, "rb").read() for uri in uris}
    titles = [product.split("/")[1].replace("-", " ") for product in products]
    inputs = ListingInputs([f"photo-{i}" for i in range(len(uris))], titles, image_uris=uris, read_bytes=data.__getitem__)
    return inputs, products, [product.split("/")[0] for product in products]


def _config(**overrides) -> EncoderTrainingConfig:
    settings = {"epochs": 4, "batch_size": 4, "learning_rate": 3e-3, "warmup_fraction": 0.0, "head": {}, "pca_init": True,
                "agcl": AGCLConfig(use_weights=False)}
    return EncoderTrainingConfig(**{**settings, **overrides})


def _train(encoder, grocery, **overrides):
    inputs, products, lines = grocery
    return train_listing_encoder(encoder, inputs, products, lines, [""] * len(products), _config(**overrides))


def test_fine_tuning_trains_the_last_blocks_and_the_head_only(base_encoder, grocery, tmp_path):
    inputs, _, _ = grocery
    encoder = copy.deepcopy(base_encoder)
    encoder.embed(inputs)  # fills the frozen-block cache (training reads the same values)
    before = {name: t.clone() for name, t in encoder.state_dict().items()}
    # The untrained towers read images exactly as the frozen featurizer does.
    reference, _ = ImageFeaturizer().encode(inputs.load_images(range(3)))
    with torch.no_grad():
        image, mask, _ = encoder.eval().tower_features(inputs, np.arange(3))
    np.testing.assert_array_equal(image.numpy(), reference)
    assert mask.all()

    result = _train(encoder, grocery)
    losses = [record["loss"] for record in result.history]
    assert losses[-1] < losses[0], losses
    after = result.encoder.state_dict()
    trained = tuple(f"{name}." for name in encoder.trained_modules) + ("head.",)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith(trained) for name in changed), sorted(changed - {n for n in changed if n.startswith(trained)})[:5]
    assert any(name.startswith("image_model._blocks.15.") for name in changed)
    assert any(name.startswith("text_model.encoder.layer.5.") for name in changed)
    assert any(name.startswith("head.") for name in changed)
    # BatchNorm statistics stay the ImageNet ones (train_batchnorm_stats off), frozen or not.
    assert not any("running_" in name for name in changed)

    # Towers learn slower than the head.
    rates = {group["lr"] for group in make_optimizer(encoder, 1e-3, 0.01).param_groups}
    assert rates == {1e-3, 1e-4}

    folder = result.encoder.save(tmp_path / "encoder")
    saved = {p.name for p in folder.iterdir()}
    assert saved == {"encoder.json", "finetune.safetensors"}
    # Only the trained blocks and the head are saved, not the frozen towers.
    assert (folder / "finetune.safetensors").stat().st_size < 25e6
    loaded = load_encoder(folder)
    assert isinstance(loaded, FinetunedTowerEncoder) and loaded.trained_modules == encoder.trained_modules
    np.testing.assert_allclose(loaded.embed(inputs), result.encoder.embed(inputs), atol=1e-6)


def test_fine_tuning_resumes_from_a_checkpoint(base_encoder, grocery, tmp_path):
    # The frozen blocks' outputs are cached per image and text; computed in another batch they may
    # differ in the last bit, so every run starts from the same warm cache to compare bit for bit.
    warm = copy.deepcopy(base_encoder)
    warm.embed(grocery[0])
    whole = _train(copy.deepcopy(warm), grocery, epochs=3)
    checkpoints = str(tmp_path / "checkpoints")
    stopped = _train(copy.deepcopy(warm), grocery, epochs=3, checkpoint_dir=checkpoints, max_steps=2)
    assert not stopped.completed and stopped.global_step == 2
    resumed = _train(copy.deepcopy(warm), grocery, epochs=3, checkpoint_dir=checkpoints)
    assert resumed.completed and resumed.global_step == whole.global_step
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]
    for name, tensor in whole.encoder.trained_state().items():
        assert torch.equal(tensor, resumed.encoder.trained_state()[name]), name


def test_an_unreadable_image_names_the_listing_and_its_uri(base_encoder):
    inputs = ListingInputs(["good", "broken"], ["milk", "juice"], image_uris=[None, "s3://bucket/broken.jpg"],
                           read_bytes=lambda uri: b"not an image")
    with pytest.raises(ValueError, match=r"listing 'broken': image_uri 's3://bucket/broken.jpg' cannot be read"):
        base_encoder.embed(inputs)


def test_a_listing_without_image_is_embedded_from_its_text(base_encoder):
    inputs = ListingInputs(["a", "b"], ["Arla standard milk", "Tropicana apple juice"])
    embeddings = base_encoder.embed(inputs)
    assert embeddings.shape == (2, 32) and np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_a_saved_folder_of_another_shape_is_refused(base_encoder, tmp_path):
    folder = base_encoder.save(tmp_path / "encoder")
    text = (folder / "encoder.json").read_text().replace('"image_blocks": 1', '"image_blocks": 2')
    (folder / "encoder.json").write_text(text)
    with pytest.raises(ValueError, match="does not fit dual-tower-finetune with 2 image blocks"):
        load_finetuned_encoder(folder)


def test_fine_tuning_the_image_tower_alone_keeps_the_text_tower_frozen_and_cached(grocery):
    """``unfrozen_text_layers=0`` with the GeM-pooled image tower: the untrained encoder reads photos
    exactly as the GeM featurizer does, training moves image blocks and head only, and a text's
    frozen output, once computed, is read from the cache."""
    inputs, _, _ = grocery
    torch.manual_seed(0)
    encoder = new_finetuned_encoder("efficientnet-lite0-gem", embed_dim=32, unfrozen_blocks=1, unfrozen_text_layers=0,
                                    head={"hidden_dim": 64})
    assert not any(name.startswith("text_model.") for name in encoder.trained_modules)
    reference, _ = ImageFeaturizer("efficientnet-lite0-gem").encode(inputs.load_images(range(3)))
    averaged, _ = ImageFeaturizer("efficientnet-lite0").encode(inputs.load_images(range(3)))
    with torch.no_grad():
        image, _, _ = encoder.eval().tower_features(inputs, np.arange(3))
    np.testing.assert_allclose(image.numpy(), reference, rtol=1e-5, atol=1e-5)
    assert not np.allclose(reference, averaged, atol=1e-3)  # GeM is not the average
    before = {name: t.clone() for name, t in encoder.state_dict().items()}
    result = _train(encoder, grocery, epochs=2)
    changed = {name for name, t in result.encoder.state_dict().items() if not torch.equal(before[name], t)}
    assert any(name.startswith("image_model._blocks.15.") for name in changed)
    assert not any(name.startswith("text_model.") for name in changed)
    misses = result.encoder.cache_stats()["text_misses"]
    result.encoder.embed(inputs)
    assert result.encoder.cache_stats()["text_misses"] == misses  # every text's frozen output was cached
