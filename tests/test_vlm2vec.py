"""VLM2Vec encoder on tiny random-weight Qwen2-VL, LLaVA and Idefics3 models built offline."""

from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from afmrl_dagster.encoders.listing_encoder import ListingEncoder, ListingInputs, encoder_kind, load_encoder
from afmrl_dagster.encoders.vlm2vec import (
    VLM2VecConfig,
    VLM2VecEncoder,
    listing_prompt_text,
    new_vlm2vec_encoder,
)
from afmrl_dagster.training.agcl import AGCLConfig, AGCLLoss
from afmrl_dagster.training.bm25 import BM25Scorer
from afmrl_dagster.training.encoder_training import EncoderTrainingConfig, train_listing_encoder, vlm2vec_batch_loss
from afmrl_dagster.vlm.processors import AutoProcessorInputs, QwenVLProcessor
from afmrl_dagster.vlm.tiny_models import (
    build_tiny_idefics3,
    build_tiny_llava,
    build_tiny_qwen2_vl,
)

HIDDEN = 32  # hidden size of the tiny models


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_vlms")
    return {
        "qwen": str(build_tiny_qwen2_vl(root / "qwen2_vl")),
        "llava": str(build_tiny_llava(root / "llava")),
        "idefics3": str(build_tiny_idefics3(root / "idefics3")),
    }


def _encoder(path: str, **overrides) -> VLM2VecEncoder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Qwen processor fallback warns once per process
        return VLM2VecEncoder.from_pretrained(VLM2VecConfig(model=path, **overrides))


def _image(seed: int, size: tuple[int, int] = (20, 16)) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


# Different lengths and a text-only listing, so that batches are padded.
IMAGES = [_image(0), None, _image(1, (24, 24)), None]
TEXTS = [
    listing_prompt_text("red dress", {"colour": "red", "neckline": "v-neck"}),
    listing_prompt_text("Arla standard milk 1 l", {"brand": "arla", "fat": "3.5 %"}),
    "blue shirt",
    "organic green tea, 20 bags with a rather long title for padding",
]


def test_config_validation():
    with pytest.raises(ValueError, match="lora_rank"):
        VLM2VecConfig(model="x", lora_rank=0)
    with pytest.raises(ValueError, match="dtype"):
        VLM2VecConfig(model="x", dtype="int8")
    assert VLM2VecConfig(model="x").torch_dtype("cpu") == torch.float32
    assert VLM2VecConfig(model="x").torch_dtype("cuda") == torch.bfloat16


def test_listing_prompt_appends_attributes():
    assert TEXTS[0] == "red dress | colour: red; neckline: v-neck"


def test_qwen_mixed_batch_embeddings(tiny_dirs):
    encoder = _encoder(tiny_dirs["qwen"])
    assert isinstance(encoder.inputs, QwenVLProcessor)
    batch = encoder.tokenize(IMAGES, TEXTS)
    image_tokens = batch["mm_token_type_ids"].sum(dim=1)
    # 20x16 rounds to 16x16 pixels -> 4x4 patches -> 4 tokens; 24x24 -> 6x6 patches -> 9 tokens.
    assert image_tokens.tolist() == [4, 0, 9, 0]
    assert (batch["input_ids"][batch["mm_token_type_ids"] == 1] == encoder.model.config.image_token_id).all()
    embeddings = encoder.encode(IMAGES, TEXTS, batch_size=4)
    assert embeddings.shape == (4, HIDDEN) and embeddings.dtype == np.float32
    assert np.isfinite(embeddings).all()
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    # The image is read: the same text with and without it embeds differently.
    with_image, without = encoder.encode([IMAGES[0], None], [TEXTS[0], TEXTS[0]])
    assert float(with_image @ without) < 0.9999


@pytest.mark.parametrize("family", ["qwen", "llava", "idefics3"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_embeddings(tiny_dirs, family, side):
    encoder = _encoder(tiny_dirs[family])
    encoder.padding_side = side
    mask = encoder.tokenize(IMAGES, TEXTS)["attention_mask"]
    assert (mask == 0).any(), "the batch must be padded for this test to mean anything"
    padded_column = 0 if side == "left" else -1
    assert (mask[:, padded_column] == 0).any()
    batched = encoder.encode(IMAGES, TEXTS, batch_size=4)
    singles = np.concatenate([encoder.encode([image], [text]) for image, text in zip(IMAGES, TEXTS)])
    np.testing.assert_allclose(batched, singles, atol=2e-5)


def test_lora_only_adapters_train(tiny_dirs):
    encoder = _encoder(tiny_dirs["qwen"])
    trainable = [name for name, parameter in encoder.named_parameters() if parameter.requires_grad]
    frozen = [name for name, parameter in encoder.named_parameters() if not parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert all("lora_" not in name for name in frozen)
    targets = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj"}
    full = _encoder(tiny_dirs["qwen"], use_lora=False)
    assert all(parameter.requires_grad for parameter in full.parameters())


def test_adapter_round_trip(tiny_dirs, tmp_path):
    encoder = _encoder(tiny_dirs["qwen"])
    base = encoder.encode(IMAGES, TEXTS)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: give the adapter an effect
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    tuned = encoder.encode(IMAGES, TEXTS)
    assert np.abs(tuned - base).max() > 1e-3
    target = tmp_path / "adapter"
    encoder.save_adapter(target)
    encoder.save_adapter(target)  # replacing an existing adapter folder works
    assert {"adapter_model.safetensors", "adapter_config.json", "vlm2vec_config.json"} <= {p.name for p in target.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder left behind"
    fresh = _encoder(tiny_dirs["qwen"])
    np.testing.assert_allclose(fresh.encode(IMAGES, TEXTS), base, atol=1e-6)
    fresh.load_adapter(target)
    np.testing.assert_allclose(fresh.encode(IMAGES, TEXTS), tuned, atol=1e-6)
    rebuilt = VLM2VecEncoder.from_adapter(target)
    np.testing.assert_allclose(rebuilt.encode(IMAGES, TEXTS), tuned, atol=1e-6)
    wrong_rank = _encoder(tiny_dirs["qwen"], lora_rank=4)
    with pytest.raises(ValueError, match="lora_rank"):
        wrong_rank.load_adapter(target)


# LLaVA: 16x16 pixels in 4x4 patches = 16 tokens; Idefics3: 16 patches pixel-shuffled by 2 = 4.
@pytest.mark.parametrize(("family", "tokens_per_image"), [("llava", 16), ("idefics3", 4)])
def test_autoprocessor_families(tiny_dirs, family, tokens_per_image):
    encoder = _encoder(tiny_dirs[family])
    assert isinstance(encoder.inputs, AutoProcessorInputs)
    batch = encoder.tokenize(IMAGES, TEXTS)
    image_tokens = (batch["input_ids"] == encoder.model.config.image_token_id).sum(dim=1)
    assert image_tokens.tolist() == [tokens_per_image, 0, tokens_per_image, 0]
    embeddings = encoder.encode(IMAGES, TEXTS)
    assert embeddings.shape == (4, HIDDEN) and np.isfinite(embeddings).all()
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    trainable = [name for name, parameter in encoder.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_agcl_steps_train_only_lora_and_lower_loss(tiny_dirs):
    torch.manual_seed(0)
    encoder = _encoder(tiny_dirs["qwen"], lora_dropout=0.0, lora_rank=4, temperature=0.1)
    # Four products, each an anchor with an image and a positive listing of the same product.
    titles = ["red dress", "blue shirt", "arla milk", "green tea"]
    attributes = [{"colour": "red"}, {"colour": "blue"}, {"brand": "arla"}, {"flavour": "green tea"}]
    images = [_image(i) for i in range(4)] + [_image(i) for i in range(4)]
    texts = [listing_prompt_text(t, a) for t, a in zip(titles, attributes)] + [f"{t} new" for t in titles]
    attribute_texts = [f"{k}: {v}" for a in attributes for k, v in a.items()] * 2
    anchors, positives = np.arange(4), np.arange(4, 8)
    product_codes = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    loss_fn = AGCLLoss(AGCLConfig())
    scorer = BM25Scorer(attribute_texts)
    before = {name: parameter.detach().clone() for name, parameter in encoder.named_parameters()}
    optimizer = torch.optim.AdamW(encoder.trainable_parameters(), lr=5e-3, weight_decay=0.0)
    encoder.train()
    losses = []
    for _ in range(4):
        out = vlm2vec_batch_loss(encoder, loss_fn, images, texts, anchors, positives, product_codes, scorer)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"].detach()))
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.05, losses
    changed = {name for name, parameter in encoder.named_parameters() if not torch.equal(parameter.detach(), before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_B" in name for name in changed)


@pytest.mark.parametrize("family", ["qwen", "llava"])
def test_max_length_cuts_text_not_image_tokens(tiny_dirs, family):
    encoder = _encoder(tiny_dirs[family], max_length=4)
    full = _encoder(tiny_dirs[family])
    short, long = encoder.tokenize(IMAGES, TEXTS), full.tokenize(IMAGES, TEXTS)
    image_id = encoder.model.config.image_token_id
    assert ((short["input_ids"] == image_id).sum(1) == (long["input_ids"] == image_id).sum(1)).all()
    tokenizer = encoder.inputs.tokenizer
    text_tokens = [len(tokenizer.encode(text, add_special_tokens=False)) for text in TEXTS]
    cut = [max(n - 4, 0) for n in text_tokens]
    assert max(cut) > 0
    lengths, full_lengths = short["attention_mask"].sum(1).tolist(), long["attention_mask"].sum(1).tolist()
    # A decoded-and-re-read cut may merge a token or two differently; it must still be near 4.
    assert all(abs((f - s) - c) <= 1 for s, f, c in zip(lengths, full_lengths, cut))


# --- As a ListingEncoder: the one AGCL loop, save -> load_encoder, resume ---------------------

PRODUCTS = ["red dress", "blue shirt", "arla milk", "green tea", "steel bottle", "leather wallet"]
PRODUCT_ATTRIBUTES = [{"colour": "red"}, {"colour": "blue"}, {"brand": "arla"}, {"flavour": "green tea"},
                      {"material": "steel"}, {"material": "leather"}]


def _listings() -> tuple[ListingInputs, list[str], list[str], list[str]]:
    """Two listings of each of six products (same photo, other words), over two product lines."""
    titles, attributes, images, product_ids, lines = [], [], [], [], []
    for number, (title, attrs) in enumerate(zip(PRODUCTS, PRODUCT_ATTRIBUTES)):
        for variant in (title, f"{title} new"):
            titles.append(variant)
            attributes.append(attrs)
            images.append(_image(number))
            product_ids.append(f"p{number}")
            lines.append(f"line{number % 2}")
    inputs = ListingInputs([f"l{i}" for i in range(len(titles))], titles, attributes, images=images)
    attribute_texts = ["; ".join(f"{k}: {v}" for k, v in a.items()) for a in attributes]
    return inputs, product_ids, lines, attribute_texts


def _training_config(**overrides) -> EncoderTrainingConfig:
    settings = {"epochs": 3, "batch_size": 3, "learning_rate": 5e-3, "weight_decay": 0.0, "warmup_fraction": 0.0, "seed": 0}
    return EncoderTrainingConfig(**{**settings, **overrides})


def _new(path: str, **overrides) -> VLM2VecEncoder:
    settings = {"lora_rank": 4, "lora_dropout": 0.0, "temperature": 0.1, **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return new_vlm2vec_encoder(path, **settings)


def test_is_a_listing_encoder_reading_images_and_listing_texts(tiny_dirs):
    encoder = _new(tiny_dirs["qwen"])
    assert isinstance(encoder, ListingEncoder) and encoder.kind == "vlm2vec"
    inputs, *_ = _listings()
    rows = np.array([0, 3, 5])
    expected = encoder.encode(inputs.load_images(rows), [listing_prompt_text(inputs.titles[i], inputs.attributes[i]) for i in rows])
    np.testing.assert_allclose(encoder.embed(inputs.subset(rows)), expected, atol=1e-6)
    assert encoder.embedding_batch_size() <= 8
    assert float(encoder.temperature) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown VLM2Vec settings"):
        new_vlm2vec_encoder(tiny_dirs["qwen"], lora_rnak=4)


def test_train_listing_encoder_trains_lora_saves_and_loads(tiny_dirs, tmp_path):
    inputs, product_ids, lines, attribute_texts = _listings()
    encoder = _new(tiny_dirs["qwen"])
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    result = train_listing_encoder(encoder, inputs, product_ids, lines, attribute_texts, _training_config(epochs=4))
    losses = [record["loss"] for record in result.history]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.05, losses
    trained = result.encoder
    assert trained is encoder and not trained.training
    changed = {name for name, p in trained.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert set(trained.checkpoint_state()) == {name for name, p in trained.named_parameters() if p.requires_grad}
    embeddings = trained.embed(inputs)
    folder = trained.save(tmp_path / "encoder")
    assert encoder_kind(folder) == "vlm2vec"
    assert {"adapter_model.safetensors", "vlm2vec_config.json", "encoder.json"} <= {p.name for p in folder.iterdir()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_encoder(folder)
    assert isinstance(loaded, VLM2VecEncoder) and not loaded.training
    np.testing.assert_allclose(loaded.embed(inputs), embeddings, atol=1e-6)


def test_resumed_training_ends_like_an_uninterrupted_run(tiny_dirs, tmp_path):
    inputs, product_ids, lines, attribute_texts = _listings()
    # LoRA dropout on: the resumed run must also restore the random generators.
    build = lambda: _new(tiny_dirs["qwen"], lora_dropout=0.1)  # noqa: E731
    whole = train_listing_encoder(build, inputs, product_ids, lines, attribute_texts, _training_config(epochs=2))
    checkpoints = str(tmp_path / "checkpoints")
    first = train_listing_encoder(build, inputs, product_ids, lines, attribute_texts,
                                  _training_config(epochs=2, checkpoint_dir=checkpoints, max_steps=3))
    assert not first.completed and first.global_step == 3
    rest = train_listing_encoder(build, inputs, product_ids, lines, attribute_texts, _training_config(epochs=2, checkpoint_dir=checkpoints))
    assert rest.completed and rest.global_step == whole.global_step
    for name, tensor in whole.encoder.checkpoint_state().items():
        assert torch.equal(tensor, rest.encoder.checkpoint_state()[name]), name
    assert [r["loss"] for r in rest.history] == [r["loss"] for r in whole.history]
    # Another LoRA shape does not resume from those checkpoints.
    with pytest.raises(ValueError, match="lora_rank"):
        train_listing_encoder(lambda: _new(tiny_dirs["qwen"], lora_rank=2), inputs, product_ids, lines, attribute_texts,
                              _training_config(epochs=2, checkpoint_dir=checkpoints))


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_train_listing_encoder_other_families(tiny_dirs, family):
    inputs, product_ids, lines, attribute_texts = _listings()
    encoder = _new(tiny_dirs[family])
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    result = train_listing_encoder(encoder, inputs, product_ids, lines, attribute_texts, _training_config(epochs=2))
    assert all(np.isfinite(record["loss"]) for record in result.history)
    changed = {name for name, p in result.encoder.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed and all("lora_" in name for name in changed)
