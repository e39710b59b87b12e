"""The Hugging Face VLM attribute generator on tiny random-weight models built offline:
batched generation with left padding, scoring, LoRA, and one GRPO step."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from afmrl_dagster.attributes.hf_generator import HFAttributeGenerator, HFGeneratorConfig
from afmrl_dagster.training.grpo import GRPOConfig
from afmrl_dagster.training.hf_generator_training import hf_grpo_step, hf_sft_step, repeat_batch
from afmrl_dagster.vlm.tiny_models import build_tiny_llava, build_tiny_qwen2_vl


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_generators")
    return {"llava": str(build_tiny_llava(root / "llava")), "qwen": str(build_tiny_qwen2_vl(root / "qwen2_vl"))}


def _image(seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8))


TITLES = ["red dress", "Arla standard milk 1 l, a longer title that pads the batch", "blue shirt"]


def _generator(path: str, **overrides) -> HFAttributeGenerator:
    return HFAttributeGenerator.from_pretrained(HFGeneratorConfig(model=path, max_new_tokens=12, image_size=16, **overrides))


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_batched_generation_equals_one_at_a_time(tiny_dirs, family):
    generator = _generator(tiny_dirs[family], use_lora=False)
    prompts = generator.prompt_texts(TITLES, keys={"colour", "brand"})
    assert "Use only these keys: brand, colour." in prompts[0]
    images = [_image(0), None, _image(1)] if family == "qwen" else [None, None, None]
    batched = generator.generate(images, prompts, batch_size=3)
    alone = [generator.generate([image], [prompt])[0] for image, prompt in zip(images, prompts)]
    assert batched == alone and all(isinstance(text, str) for text in batched)


def test_scoring_agrees_with_greedy_generation(tiny_dirs):
    generator = _generator(tiny_dirs["llava"], constrained_json=False)  # free greedy: the argmax of the model's own distribution
    batch = generator.encode_prompts([_image(0), _image(1)], generator.prompt_texts(TITLES[:2]))
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every prompt ends at the last column
    completion, mask = generator.generate_ids(batch)
    with torch.no_grad():
        chosen = generator.completion_log_probs(batch, completion, mask)
        prompt_length = batch["input_ids"].shape[1]
        full = {**batch, "input_ids": torch.cat([batch["input_ids"], completion], 1),
                "attention_mask": torch.cat([batch["attention_mask"], mask.long()], 1)}
        full["position_ids"] = (full["attention_mask"].cumsum(1) - 1).clamp(min=0)
        best = torch.log_softmax(generator.model(**full).logits[:, prompt_length - 1:-1].float(), -1).max(-1).values
    # Greedy picked the most likely token at every real position.
    torch.testing.assert_close(chosen[mask], best[mask], rtol=1e-4, atol=1e-4)


def test_one_grpo_step_updates_only_lora_with_finite_loss_and_kl(tiny_dirs):
    generator = _generator(tiny_dirs["llava"])
    trainable = {name for name, p in generator.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    before = {name: p.detach().clone() for name, p in generator.model.named_parameters()}
    optimizer = torch.optim.AdamW(generator.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    config = GRPOConfig(group_size=4, kl_beta=0.04, temperature=1.0)

    def reward(groups: list[list[str]]) -> np.ndarray:
        return np.array([[len(text) % 5 for text in group] for group in groups], dtype=float)

    record = hf_grpo_step(generator, optimizer, [_image(0), _image(1)], generator.prompt_texts(TITLES[:2]), reward, config, sample_seed=0)
    assert np.isfinite(record["loss"]) and np.isfinite(record["kl"]) and record["kl"] >= 0
    assert len(record["samples"]) == 2 and all(len(group) == 4 for group in record["samples"])
    assert record["reward_std"] > 0  # rewards differ, so advantages are not all zero
    changed = {name for name, p in generator.model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed and changed <= trainable


def test_repeat_batch_handles_one_prompts_image_patches():
    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long), "pixel_values": torch.randn(6, 3), "image_grid_thw": torch.tensor([[1, 2, 3]])}
    repeated = repeat_batch(batch, 3, rows=1)
    assert repeated["input_ids"].shape == (3, 4) and repeated["pixel_values"].shape == (18, 3) and repeated["image_grid_thw"].shape == (3, 3)
    with pytest.raises(ValueError, match="pixel_values"):
        repeat_batch({"input_ids": torch.ones(2, 4), "pixel_values": torch.randn(6, 3)}, 3, rows=2)


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("use_lora", [True, False])
def test_sft_steps_lower_the_loss_on_teacher_attributes(tiny_dirs, family, use_lora):
    generator = _generator(tiny_dirs[family], use_lora=use_lora, lora_rank=4)
    optimizer = torch.optim.AdamW(generator.trainable_parameters(), lr=5e-2 if use_lora else 3e-3)
    trainable = {name for name, p in generator.model.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in generator.model.named_parameters()}
    images = [_image(0), _image(1)] if family == "llava" else [_image(0), None]
    prompts = generator.prompt_texts(TITLES[:2])
    targets = ['{"colour": "red"}', '{"brand": "arla", "volume": "1 l"}']
    losses = [hf_sft_step(generator, optimizer, images, prompts, targets) for _ in range(12)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    if not use_lora:  # every weight free: the two targets are learnt outright
        assert losses[-1] < 0.8 * losses[0]
    changed = {name for name, p in generator.model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed and changed <= trainable
    if use_lora:
        assert all("lora_" in name for name in changed)
