"""The compact attribute generator: decoding, log-probs, SFT on a learnable toy problem, save/load."""

import json

import numpy as np
import pytest
import torch

from afmrl_dagster.attributes.format import parse_attributes
from afmrl_dagster.attributes.generator import (
    AttributeGenerator,
    GeneratorConfig,
    generate_attribute_texts,
    load_generator,
    repeat_rows,
    save_generator,
)
from afmrl_dagster.attributes.vocabulary import AttributeVocabulary
from afmrl_dagster.training.generator_sft import SFTConfig, attribute_accuracy, train_generator_sft

COLOURS = ["red", "blue", "green", "black"]
SIZES = ["s", "m", "l"]
SMALL = GeneratorConfig(d_model=32, n_layers=1, n_heads=2, prefix_tokens=2, max_new_tokens=16, dropout=0.0)


def toy_problem(count: int, seed: int):
    """Colour is a one-hot in the image features (no image, no colour), size a one-hot in the
    text features, and a pattern is present when a text feature is high."""
    rng = np.random.default_rng(seed)
    colour, size = rng.integers(0, len(COLOURS), count), rng.integers(0, len(SIZES), count)
    has_image = rng.random(count) > 0.15
    striped = rng.random(count) > 0.6
    image = rng.normal(0, 0.1, (count, 8)).astype(np.float32)
    image[np.arange(count), colour] += 1.0
    image[~has_image] = np.nan  # what a missing image may hold: must never leak
    text = rng.normal(0, 0.1, (count, 6)).astype(np.float32)
    text[np.arange(count), size] += 1.0
    text[:, 5] += striped
    targets = []
    for i in range(count):
        attributes = {"size": SIZES[size[i]]}
        if has_image[i]:
            attributes["colour"] = COLOURS[colour[i]]
        if striped[i]:
            attributes["pattern"] = "stripes"
        targets.append(attributes)
    return image, has_image, text, targets


@pytest.fixture(scope="module")
def trained():
    image, mask, text, targets = toy_problem(200, seed=0)
    vocab = AttributeVocabulary.from_attribute_sets(targets)
    torch.manual_seed(0)
    model = AttributeGenerator(len(vocab), image.shape[1], text.shape[1], SMALL)
    history = train_generator_sft(
        model, vocab, image, mask, text, targets, SFTConfig(epochs=40, batch_size=32, learning_rate=5e-3)
    )
    return model, vocab, history


def test_sft_learns_attributes_from_features(trained):
    model, vocab, history = trained
    assert history[-1]["loss"] < 0.2 * history[0]["loss"]
    assert history[-1]["skipped_pairs"] == 0
    image, mask, text, gold = toy_problem(80, seed=1)
    texts = generate_attribute_texts(model, vocab, image, mask, text, batch_size=32)
    scores = attribute_accuracy(texts, gold, vocab.keys)
    assert scores["validity_rate"] >= 0.95
    assert scores["pair_f1"] >= 0.9, scores
    assert scores["key_exact_match"]["colour"] >= 0.9
    # Listings without an image get no colour: the no-image embedding carries that.
    assert all("colour" not in (parse_attributes(t).attributes or {}) for t, m in zip(texts, mask) if not m)


def test_sft_is_reproducible_with_its_seed():
    image, mask, text, targets = toy_problem(40, seed=2)
    vocab = AttributeVocabulary.from_attribute_sets(targets)
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        model = AttributeGenerator(len(vocab), 8, 6, GeneratorConfig(d_model=16, n_layers=1, n_heads=2, prefix_tokens=2, max_new_tokens=16))
        history = train_generator_sft(model, vocab, image, mask, text, targets, SFTConfig(epochs=2, batch_size=16, seed=5))
        states.append((history[-1]["loss"], model.state_dict()))
    assert states[0][0] == states[1][0]
    assert all(torch.equal(states[0][1][name], states[1][1][name]) for name in states[0][1])


def test_save_load_round_trip_gives_identical_outputs(trained, tmp_path):
    model, vocab, _ = trained
    image, mask, text, _ = toy_problem(30, seed=3)
    directory = tmp_path / "generator"
    save_generator(model, vocab, directory, extra_json={"towers.json": {"image_tower": "toy"}})
    save_generator(model, vocab, directory)  # replacing an existing folder works too
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors", "vocabulary.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["generator"]  # no staging folders left behind
    loaded, loaded_vocab = load_generator(directory)
    assert loaded_vocab == vocab
    for greedy in (True, False):
        original = generate_attribute_texts(model, vocab, image, mask, text, greedy=greedy, seed=7)
        again = generate_attribute_texts(loaded, loaded_vocab, image, mask, text, greedy=greedy, seed=7)
        assert original == again
    assert json.loads((directory / "config.json").read_text())["generator"]["d_model"] == SMALL.d_model


def test_sampling_shape_padding_and_cache_agree():
    vocab = AttributeVocabulary.from_attribute_sets([{"colour": c, "size": s} for c in COLOURS for s in SIZES])
    torch.manual_seed(1)
    model = AttributeGenerator(len(vocab), 8, 6, GeneratorConfig(d_model=16, n_layers=2, n_heads=2, prefix_tokens=4, max_new_tokens=12)).eval()
    image, mask, text, _ = toy_problem(5, seed=4)
    cached = model.sample(image, mask, text, num_samples=3, generator=torch.Generator().manual_seed(0))
    uncached = model.sample(image, mask, text, num_samples=3, generator=torch.Generator().manual_seed(0), use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.shape[0] == 15 and cached.shape[1] <= 12
    for row in cached.tolist():
        assert vocab.pad_id not in row[: row.index(vocab.eos_id) + 1 if vocab.eos_id in row else len(row)]
        assert vocab.bos_id not in row
        if vocab.eos_id in row:
            assert set(row[row.index(vocab.eos_id) + 1 :]) <= {vocab.pad_id}
    # Greedy decoding picks the teacher-forced argmax at every real position.
    greedy = model.sample(image, mask, text, greedy=True)
    bos = torch.full((5, 1), vocab.bos_id)
    logits = model(image, mask, text, torch.cat([bos, greedy[:, :-1]], dim=1))
    real = greedy != vocab.pad_id
    assert torch.equal(logits.argmax(-1)[real], greedy[real])


@pytest.mark.parametrize("max_new_tokens", [3, 7, 12, 40])
def test_grammar_makes_every_output_parse_even_untrained(max_new_tokens):
    vocab = AttributeVocabulary.from_attribute_sets([{"colour": c, "size": s} for c in COLOURS for s in SIZES])
    torch.manual_seed(2)
    config = GeneratorConfig(d_model=16, n_layers=1, n_heads=2, prefix_tokens=2, max_new_tokens=max_new_tokens,
                             grammar_keys=len(vocab.keys))
    model = AttributeGenerator(len(vocab), 8, 6, config).eval()
    image, mask, text, _ = toy_problem(40, seed=5)
    free = AttributeGenerator(len(vocab), 8, 6, GeneratorConfig(**{**config.__dict__, "grammar_keys": 0}))
    free.load_state_dict(model.state_dict())
    for temperature in (0.7, 3.0):
        sampled = model.sample(image, mask, text, num_samples=4, temperature=temperature, generator=torch.Generator().manual_seed(0))
        texts = [vocab.decode(row) for row in sampled.tolist()]
        assert all(parse_attributes(t, vocab.keys).is_valid for t in texts), [t for t in texts if not parse_attributes(t).is_valid][:3]
        # Scoring uses the same constrained distribution: what was drawn has a finite, non-tiny probability.
        log_probs, real = model.token_log_probs(*(repeat_rows(x, 4) for x in (image, mask, text)), sampled, temperature)
        assert torch.isfinite(log_probs).all() and log_probs[real].min() > -50
    unconstrained = [vocab.decode(row) for row in free.eval().sample(image, mask, text, num_samples=4, temperature=3.0,
                                                                      generator=torch.Generator().manual_seed(0)).tolist()]
    assert not all(parse_attributes(t, vocab.keys).is_valid for t in unconstrained)  # the grammar is what makes them valid


def test_grammar_keeps_sft_targets_reachable():
    image, mask, text, targets = toy_problem(60, seed=3)
    vocab = AttributeVocabulary.from_attribute_sets(targets)
    torch.manual_seed(0)
    model = AttributeGenerator(len(vocab), image.shape[1], text.shape[1],
                               GeneratorConfig(**{**SMALL.__dict__, "grammar_keys": len(vocab.keys)}))
    history = train_generator_sft(model, vocab, image, mask, text, targets, SFTConfig(epochs=30, batch_size=32, learning_rate=5e-3))
    assert np.isfinite(history[-1]["loss"]) and history[-1]["loss"] < history[0]["loss"]
    predicted = generate_attribute_texts(model, vocab, image, mask, text)
    assert attribute_accuracy(predicted, targets, vocab.keys)["validity_rate"] == 1.0


def test_log_probs_ignore_padding_and_missing_image_content():
    vocab = AttributeVocabulary.from_attribute_sets([{"colour": c} for c in COLOURS])
    torch.manual_seed(2)
    model = AttributeGenerator(len(vocab), 8, 6, GeneratorConfig(d_model=16, n_layers=1, n_heads=2, prefix_tokens=2, max_new_tokens=10)).eval()
    image, mask, text, _ = toy_problem(4, seed=5)
    sequences = model.sample(image, mask, text, num_samples=2, generator=torch.Generator().manual_seed(3))
    rep = [repeat_rows(x, 2) for x in (image, mask, text)]
    log_probs = model.sequence_log_probs(*rep, sequences)
    padded = torch.cat([sequences, torch.full((8, 3), vocab.pad_id)], dim=1)[:, : model.config.max_new_tokens]
    assert torch.allclose(model.sequence_log_probs(*rep, padded), log_probs, atol=1e-5)
    assert torch.isfinite(log_probs).all() and (log_probs < 0).all()
    per_token, token_mask = model.token_log_probs(*rep, sequences)
    assert torch.allclose(per_token.sum(1), log_probs) and torch.equal(token_mask, sequences != vocab.pad_id)
    other = rep[0].clone()
    other[~rep[1]] = 123.0  # different junk where the image is missing changes nothing
    assert torch.equal(model.sequence_log_probs(other, rep[1], rep[2], sequences), log_probs)


def test_attribute_accuracy_on_hand_made_cases():
    gold = [{"colour": "red", "size": "m"}, {"colour": "Blue"}, {"size": "l"}]
    predicted = ['{"colour": "red", "size": "s"}', '{"color": "blue", "pattern": "dots"}', "{broken"]
    scores = attribute_accuracy(predicted, gold)
    assert scores["validity_rate"] == pytest.approx(2 / 3)
    assert scores["pair_precision"] == pytest.approx(2 / 4)
    assert scores["pair_recall"] == pytest.approx(2 / 4)
    assert scores["pair_f1"] == pytest.approx(0.5)
    assert scores["key_exact_match"] == {"colour": 1.0, "size": 0.0}
    assert attribute_accuracy(predicted, gold, vocabulary={"colour", "size"})["validity_rate"] == pytest.approx(1 / 3)


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="divisible"):
        GeneratorConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="prefix_tokens"):
        GeneratorConfig(prefix_tokens=1)
    with pytest.raises(ValueError, match="warmup_fraction"):
        SFTConfig(warmup_fraction=1.5)


def test_generation_benchmark_reports_batched_and_one_at_a_time(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    readme = tmp_path / "README.md"
    readme.write_text("<!-- generation-throughput:start -->\n<!-- generation-throughput:end -->\n")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "generation.py"
    done = subprocess.run([sys.executable, str(script), "--listings", "8", "--one-at-a-time", "2", "--batch-sizes", "8",
                           "--repeats", "1", "--write-results", str(readme)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in readme.read_text().splitlines() if line.startswith("| one at a time") or line.startswith("| batches of 8")]
    assert len(rows) == 2 and rows[0].endswith("| 1.0x |") and "x** |" in rows[1]
