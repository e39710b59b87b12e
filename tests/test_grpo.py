"""GRPO (RAR) on a synthetic reward: the policy learns what is rewarded, the reference stays put."""

import copy

import numpy as np
import pytest
import torch

from afmrl_dagster.attributes.format import parse_attributes
from afmrl_dagster.attributes.generator import AttributeGenerator, GeneratorConfig
from afmrl_dagster.attributes.vocabulary import AttributeVocabulary
from afmrl_dagster.training.generator_sft import SFTConfig, train_generator_sft
from afmrl_dagster.training.grpo import GRPOConfig, group_advantages, k3_kl, train_grpo

COLOURS = ["red", "blue", "green", "black"]


def red_reward(query_indices, texts):
    """1 when the output says the colour is red, -0.1 when it does not parse, else 0."""
    rewards = np.zeros((len(texts), len(texts[0])))
    for q, group in enumerate(texts):
        for g, text in enumerate(group):
            parsed = parse_attributes(text)
            rewards[q, g] = -0.1 if not parsed.is_valid else float(parsed.attributes.get("colour") == "red")
    return rewards


@pytest.fixture(scope="module")
def weak_policy():
    """An SFT generator whose colour is a coin toss (the features say nothing about it)."""
    rng = np.random.default_rng(0)
    count = 96
    image = rng.normal(size=(count, 6)).astype(np.float32)
    mask = np.ones(count, bool)
    text = rng.normal(size=(count, 4)).astype(np.float32)
    targets = [{"colour": COLOURS[i % 4], "size": ["s", "m"][i % 2 if i % 3 else 0]} for i in rng.permutation(count)]
    vocab = AttributeVocabulary.from_attribute_sets(targets)
    torch.manual_seed(0)
    config = GeneratorConfig(d_model=32, n_layers=1, n_heads=2, prefix_tokens=2, max_new_tokens=12, dropout=0.0)
    model = AttributeGenerator(len(vocab), 6, 4, config)
    train_generator_sft(model, vocab, image, mask, text, targets, SFTConfig(epochs=15, batch_size=32, learning_rate=5e-3))
    return model, vocab, image, mask, text


def _run(weak_policy, steps, **overrides):
    model, vocab, image, mask, text = weak_policy
    policy, reference = copy.deepcopy(model), copy.deepcopy(model)
    config = GRPOConfig(steps=steps, queries_per_step=8, group_size=8, learning_rate=3e-3, **overrides)
    history = train_grpo(policy, reference, vocab, image, mask, text, red_reward, config)
    return history, policy, reference


def test_grpo_raises_the_reward_and_keeps_the_reference(weak_policy):
    before = {name: tensor.clone() for name, tensor in weak_policy[0].state_dict().items()}
    history, policy, reference = _run(weak_policy, steps=16)
    first = np.mean([h["reward_mean"] for h in history[:4]])
    last = np.mean([h["reward_mean"] for h in history[-4:]])
    assert last > first + 0.3, [round(h["reward_mean"], 2) for h in history]
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert all(h["kl"] >= 0 for h in history) and history[-1]["kl"] > 1e-3
    assert all(torch.equal(before[name], tensor) for name, tensor in reference.state_dict().items())
    assert any(not torch.equal(before[name], tensor) for name, tensor in policy.state_dict().items())
    record = history[-1]
    assert {"step", "reward_mean", "reward_std", "validity_rate", "kl", "mean_num_attributes", "loss", "seconds", "samples"} <= set(record)
    assert 0 < len(record["samples"]) <= 4
    query_index, text, reward = record["samples"][0]
    assert 0 <= query_index < 96 and isinstance(text, str) and reward in (-0.1, 0.0, 1.0)


def test_grpo_is_deterministic_with_its_seed(weak_policy):
    runs = [_run(weak_policy, steps=2, grad_accumulation=2)[0] for _ in range(2)]

    def strip(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert strip(runs[0]) == strip(runs[1])
    other = _run(weak_policy, steps=2, seed=1)[0]
    assert strip(other) != strip(runs[0])


def test_grpo_rejects_a_shared_reference_and_bad_rewards(weak_policy):
    model, vocab, image, mask, text = weak_policy
    policy = copy.deepcopy(model)
    with pytest.raises(ValueError, match="separate"):
        train_grpo(policy, policy, vocab, image, mask, text, red_reward, GRPOConfig(steps=1))
    with pytest.raises(ValueError, match="shape"):
        train_grpo(policy, copy.deepcopy(model), vocab, image, mask, text, lambda q, t: np.zeros(len(q)), GRPOConfig(steps=1, queries_per_step=2, group_size=2))
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)


def test_group_advantages_and_k3():
    advantages = group_advantages(np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]]))
    assert np.allclose(advantages[0], [1, -1, -1, 1], atol=1e-3)
    assert np.allclose(advantages[1], 0.0)  # a group with one reward teaches nothing
    log_p = torch.log(torch.tensor([0.5, 0.2]))
    assert torch.allclose(k3_kl(log_p, log_p), torch.zeros(2))
    assert (k3_kl(log_p, torch.log(torch.tensor([0.1, 0.6]))) > 0).all()


class Killed(Exception):
    """The process dying after a unit of training (its checkpoint already written)."""


def _without_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_grpo_killed_mid_run_resumes_from_its_checkpoint_as_if_never_stopped(weak_policy, tmp_path):
    """Steps 1-3 run, the process dies; a new run over the same folder trains steps 4-6 only and
    ends with the uninterrupted run's weights and history (the sampler's state and the query
    order carry over)."""
    from afmrl_dagster.training.checkpoints import LoopCheckpoint, checkpoint_step

    model, vocab, image, mask, text = weak_policy
    config = GRPOConfig(steps=6, queries_per_step=8, group_size=4, learning_rate=3e-3)
    whole, whole_policy = copy.deepcopy(model), None
    whole_history = train_grpo(whole, copy.deepcopy(model), vocab, image, mask, text, red_reward, config)
    whole_policy = whole

    def die_after_three(record):
        if record["step"] == 2:
            raise Killed

    checkpoint = LoopCheckpoint(tmp_path / "grpo", {"loop": "grpo"}, every=1)
    with pytest.raises(Killed):
        train_grpo(copy.deepcopy(model), copy.deepcopy(model), vocab, image, mask, text, red_reward, config, on_step=die_after_three,
                   checkpoint=checkpoint)
    assert checkpoint_step(tmp_path / "grpo") == 3
    steps_run = []
    resumed = copy.deepcopy(model)  # a new process: the SFT weights again, then the checkpoint
    history = train_grpo(resumed, copy.deepcopy(model), vocab, image, mask, text, red_reward, config,
                         on_step=lambda record: steps_run.append(record["step"]), checkpoint=checkpoint)
    assert steps_run == [3, 4, 5]
    assert _without_seconds(history)[3:] == _without_seconds(whole_history)[3:]
    assert [h["reward_mean"] for h in history] == [h["reward_mean"] for h in whole_history]
    assert all(torch.equal(tensor, whole_policy.state_dict()[name]) for name, tensor in resumed.state_dict().items())
    with pytest.raises(ValueError, match="differs from the checkpoint"):
        train_grpo(copy.deepcopy(model), copy.deepcopy(model), vocab, image, mask, text, red_reward, config,
                   checkpoint=LoopCheckpoint(tmp_path / "grpo", {"loop": "grpo", "queries": 7}))


def test_sft_killed_mid_run_resumes_from_its_checkpoint_as_if_never_stopped(tmp_path):
    from afmrl_dagster.training.checkpoints import LoopCheckpoint

    rng = np.random.default_rng(1)
    image, text = rng.normal(size=(40, 6)).astype(np.float32), rng.normal(size=(40, 4)).astype(np.float32)
    mask = np.ones(40, bool)
    targets = [{"colour": COLOURS[i % 4]} for i in range(40)]
    vocab = AttributeVocabulary.from_attribute_sets(targets)
    config = SFTConfig(epochs=5, batch_size=16, learning_rate=5e-3, seed=2)

    def fresh() -> AttributeGenerator:
        torch.manual_seed(0)  # dropout on: the resumed run must restore the global generator too
        return AttributeGenerator(len(vocab), 6, 4, GeneratorConfig(d_model=16, n_layers=1, n_heads=2, prefix_tokens=2, max_new_tokens=8))

    whole = fresh()
    whole_history = train_generator_sft(whole, vocab, image, mask, text, targets, config)

    def die_after_two(record):
        if record["epoch"] == 1:
            raise Killed

    checkpoint = LoopCheckpoint(tmp_path / "sft", {"loop": "sft"})
    with pytest.raises(Killed):
        train_generator_sft(fresh(), vocab, image, mask, text, targets, config, on_epoch=die_after_two, checkpoint=checkpoint)
    epochs_run, resumed = [], fresh()
    history = train_generator_sft(resumed, vocab, image, mask, text, targets, config,
                                  on_epoch=lambda record: epochs_run.append(record["epoch"]), checkpoint=checkpoint)
    assert epochs_run == [2, 3, 4]
    assert _without_seconds(history) == _without_seconds(whole_history)
    assert all(torch.equal(tensor, whole.state_dict()[name]) for name, tensor in resumed.state_dict().items())
