"""Grammar-constrained decoding (afmrl_dagster.attributes.json_constraint): the character
automaton on strings, the token tables of byte-level and SentencePiece-style tokenizers, and
the tiny random-weight Qwen2-VL, LLaVA and Idefics3 writing only parseable attribute objects,
greedy and sampled, at tight and loose budgets, while the same models unconstrained write noise."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import polars as pl
import pytest
import torch

from afmrl_dagster.attributes.format import parse_attributes
from afmrl_dagster.attributes.hf_generator import HFAttributeGenerator, HFGeneratorConfig
from afmrl_dagster.attributes.hf_teacher import HFVLMTeacher
from afmrl_dagster.attributes.json_constraint import (AFTER_VALUE, DONE, IN_KEY, IN_VALUE, MIN_NEW_TOKENS, OBJECT_OPEN, START,
                                                      JSONConstraintError, JSONObjectLogitsProcessor, JSONStateError,
                                                      check_text, simulate, token_tables, tokens_needed)
from afmrl_dagster.training.grpo import GRPOConfig
from afmrl_dagster.training.hf_generator_training import hf_grpo_step
from afmrl_dagster.vlm.tiny_models import (QWEN2_VL_SPECIAL_TOKENS, train_tiny_tokenizer)

TITLES = ["red v-neck summer dress", "Arla standard milk 1 l", "blue round-neck cotton t-shirt", "stainless steel bottle 750 ml",
          "wireless earbuds, black", "organic green tea, 20 bags", "leather wallet brown", "running shoes size 42"]


@pytest.fixture(scope="module")
def tiny(tiny_vlms):
    return tiny_vlms


def _image(seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8))


def _valid_object(text: str, max_pairs: int = 16, max_chars: int = 64) -> bool:
    """The property the constraint promises: parse_attributes accepts it, and it is a JSON object of
    1..max_pairs pairs of non-empty strings of at most max_chars characters."""
    if not parse_attributes(text).is_valid:
        return False
    pairs = json.loads(text, object_pairs_hook=list)
    return 1 <= len(pairs) <= max_pairs and all(isinstance(v, str) and 0 < len(k) <= max_chars and 0 < len(v) <= max_chars
                                                for k, v in pairs)


# ---- the automaton on strings ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ['{"colour": "red"}', '{"a":"b"}', ' {\n  "colour" : "red",\n  "size": "m"\n}',
                                  '{"brand": "arla", "fat": "3.5 %", "note": "{not: json, inside}"}', '{"名前": "ミルク"}'])
def test_the_automaton_accepts_attribute_objects(text):
    row = check_text(text)
    assert row is not None and row.state == DONE and parse_attributes(text).is_valid


@pytest.mark.parametrize("text", ['{}', '{"": "red"}', '{"colour": ""}', '{"colour": "red",}', '{"a": "b"} x', '["a"]', '{"a": 1}',
                                  '{"a": "b\\"c"}', '{"a": "line\nbreak"}', '{"a" "b"}', '{"a": "b" "c": "d"}', '{{"a": "b"}'])
def test_the_automaton_rejects_anything_else(text):
    assert check_text(text) is None


def test_pair_and_length_limits():
    assert check_text('{"a": "b", "c": "d"}', max_pairs=2).state == DONE
    assert check_text('{"a": "b", "c": "d", ', max_pairs=2) is None  # after max_pairs pairs only '}'
    assert check_text('{"abc": "d"}', max_chars=3).state == DONE
    assert check_text('{"abcd": "d"}', max_chars=3) is None
    assert check_text('{"a": "b"', max_chars=3).state == AFTER_VALUE


def test_structural_tokens_are_simulated_per_state():
    assert simulate(START, " {").next_state == OBJECT_OPEN
    assert simulate(START, '{"').next_state == IN_KEY
    key_closed = simulate(IN_KEY, '": "')
    assert key_closed.next_state == IN_VALUE and key_closed.closes_string and not key_closed.completes_pair
    closed = simulate(IN_VALUE, '"},')
    assert closed is None  # nothing after the closed object
    pair = simulate(IN_VALUE, '", "')
    assert pair.next_state == IN_KEY and pair.completes_pair and pair.comma
    assert simulate(OBJECT_OPEN, "}") is None  # at least one pair
    assert simulate(IN_KEY, ' "') is None  # a closing quote comes first in its token
    assert simulate(OBJECT_OPEN, '""') is None  # an opening quote comes last
    assert simulate(DONE, " ") is None
    assert [tokens_needed(START), tokens_needed(IN_KEY), tokens_needed(IN_VALUE, True), tokens_needed(DONE)] == [9, 7, 2, 0]


# ---- token tables -----------------------------------------------------------------------------------------


def _metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace '▁' word marker, as Llama's), trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from afmrl_dagster.vlm.tiny_models import _CORPUS

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=list('{}":, abcdefghijklmnopqrstuvwxyz'))
    tokenizer.train_from_iterator(_CORPUS + ['{"colour": "red", "size": "m"}'], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_sentencepiece_word_markers_read_as_spaces_and_special_tokens_are_never_allowed():
    tokenizer = _metaspace_tokenizer()
    tables = token_tables(tokenizer)
    texts = {tokenizer.convert_ids_to_tokens(i): text for i, text in enumerate(tables.texts)}
    assert texts["▁red"] == " red" and texts["red"] == "red"
    assert all(tables.texts[i] is None for i in tokenizer.all_special_ids)
    assert token_tables(tokenizer) is tables  # cached


def _random_walks(tokenizer, budgets, rows=8, seed=0, **limits):
    """Drive the processor with random scores (no model): every row must end as a valid object."""
    generator = torch.Generator().manual_seed(seed)
    texts = []
    for budget in budgets:
        processor = JSONObjectLogitsProcessor(tokenizer, prompt_length=3, max_new_tokens=budget, **limits)
        ids = torch.zeros((rows, 3), dtype=torch.long)
        for _ in range(budget):
            scores = processor(ids, torch.randn(rows, len(tokenizer) + 5, generator=generator) * 4)
            ids = torch.cat([ids, torch.multinomial(scores.softmax(-1), 1, generator=generator)], dim=1)
        for row in ids[:, 3:].tolist():
            assert tokenizer.eos_token_id in row
            texts.append(tokenizer.decode(row[:row.index(tokenizer.eos_token_id)], skip_special_tokens=True).strip())
    return texts


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_random_scores_through_the_processor_always_close_a_valid_object(kind):
    tokenizer = _metaspace_tokenizer() if kind == "sentencepiece" else train_tiny_tokenizer(QWEN2_VL_SPECIAL_TOKENS, eos_token="<|im_end|>")
    texts = _random_walks(tokenizer, [MIN_NEW_TOKENS, 11, 17, 40], max_pairs=3, max_chars=6)
    assert all(_valid_object(text, max_pairs=3, max_chars=6) for text in texts), [t for t in texts if not _valid_object(t, 3, 6)]


def test_a_budget_too_small_or_a_forbidden_token_fails_clearly():
    tokenizer = train_tiny_tokenizer(QWEN2_VL_SPECIAL_TOKENS, eos_token="<|im_end|>")
    with pytest.raises(JSONConstraintError, match="max_new_tokens=9 is too small"):
        JSONObjectLogitsProcessor(tokenizer, 0, MIN_NEW_TOKENS - 1)
    processor = JSONObjectLogitsProcessor(tokenizer, 0, 20)
    processor(torch.zeros((1, 0), dtype=torch.long), torch.zeros(1, len(tokenizer)))
    with pytest.raises(JSONStateError, match="not allowed in state START"):
        processor(torch.tensor([[tokenizer.convert_tokens_to_ids("a")]]), torch.zeros(1, len(tokenizer)))


def test_a_tokenizer_without_single_character_tokens_is_refused():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "{": 2, "}": 3, "a": 4, ":": 5, ",": 6}  # no '"'
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.Fuse()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>")
    with pytest.raises(JSONConstraintError, match="no single-character token for '\"'"):
        token_tables(wrapped)


# ---- the tiny random-weight VLMs ------------------------------------------------------------------------------


def _generator(path: str, constrained: bool, max_new_tokens: int) -> HFAttributeGenerator:
    config = HFGeneratorConfig(model=path, use_lora=False, max_new_tokens=max_new_tokens, image_size=16, constrained_json=constrained)
    return HFAttributeGenerator.from_pretrained(config)


@pytest.mark.parametrize("family", ["qwen", "llava", "idefics3"])
def test_constrained_random_vlms_always_write_parseable_attributes_and_unconstrained_do_not(tiny, family):
    images = [_image(i) for i in range(len(TITLES))]
    torch.manual_seed(0)
    for max_new_tokens in (MIN_NEW_TOKENS, 14, 32):
        generator = _generator(tiny(family), True, max_new_tokens)
        prompts = generator.prompt_texts(TITLES)
        greedy = generator.generate(images, prompts, batch_size=8)
        batch = generator.encode_prompts(images, prompts)
        completion, mask = generator.generate_ids(batch, num_samples=4, do_sample=True, temperature=1.0)
        sampled = generator.decode(completion, mask)
        assert len(greedy) == 8 and len(sampled) == 32
        assert all(_valid_object(text) for text in greedy + sampled), [t for t in greedy + sampled if not _valid_object(t)]
        assert (mask.sum(dim=1) <= max_new_tokens).all()
        ends = completion[torch.arange(completion.shape[0]), mask.sum(dim=1) - 1]
        assert (ends == generator.tokenizer.eos_token_id).all()  # every row closed its object and ended in time
        assert len(set(sampled)) > 1  # sampling still samples
    free = _generator(tiny(family), False, 32)
    prompts = free.prompt_texts(TITLES)
    unconstrained = free.generate(images, prompts, batch_size=8) + free.generate(images, prompts, batch_size=8, do_sample=True)
    assert sum(parse_attributes(text).is_valid for text in unconstrained) == 0  # the same random model, free: noise


def test_too_small_a_budget_errors_clearly(tiny):
    generator = _generator(tiny("qwen"), True, 8)
    with pytest.raises(JSONConstraintError, match="max_new_tokens=8 is too small"):
        generator.generate([_image(0)], generator.prompt_texts(TITLES[:1]))
    with pytest.raises(JSONConstraintError, match="min_new_tokens"):
        generator.generate_ids(generator.encode_prompts([_image(0)], generator.prompt_texts(TITLES[:1])), max_new_tokens=12, min_new_tokens=12)
    assert isinstance(_generator(tiny("qwen"), False, 8).generate([_image(0)], generator.prompt_texts(TITLES[:1]))[0], str)


def test_the_constrained_teacher_answers_parse_and_are_cached_apart(tiny):
    photos = {f"mem://{i}": i for i in range(3)}
    listings = pl.DataFrame({"listing_id": ["l0", "l1", "l2"], "title": TITLES[:3], "description": [None] * 3, "image_uri": list(photos)})

    def read(uri):
        import io

        buffer = io.BytesIO()
        _image(photos[uri]).save(buffer, format="PNG")
        return buffer.getvalue()

    teacher = HFVLMTeacher(tiny("llava"), read_image=read, batch_size=2, max_new_tokens=16, image_size=16)
    free = HFVLMTeacher(tiny("llava"), read_image=read, batch_size=2, max_new_tokens=16, image_size=16, constrained_json=False)
    assert all(_valid_object(text) for text in teacher.annotate(listings))
    assert teacher.cache_identity != free.cache_identity and teacher.cache_identity.endswith(":json-constrained")


def test_a_grpo_step_samples_only_valid_objects_and_rewards_still_vary(tiny):
    config = HFGeneratorConfig(model=tiny("llava"), max_new_tokens=16, image_size=16, lora_rank=4)
    generator = HFAttributeGenerator.from_pretrained(config)
    optimizer = torch.optim.AdamW(generator.trainable_parameters(), lr=1e-2)
    record = hf_grpo_step(generator, optimizer, [_image(0), _image(1)], generator.prompt_texts(TITLES[:2]),
                          lambda groups: np.array([[len(text) % 5 for text in group] for group in groups], dtype=float),
                          GRPOConfig(group_size=4, kl_beta=0.04, temperature=1.0), sample_seed=0)
    assert record["validity_rate"] == 1.0 and record["reward_std"] > 0 and np.isfinite(record["loss"])
