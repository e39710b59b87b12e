"""Encoder training checkpoints: exact resume, config checks, atomic writes, mixed precision."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from afmrl_dagster.encoders.dual_tower import ListingFeatures
from afmrl_dagster.training import checkpoints
from afmrl_dagster.training.checkpoints import (
    flatten_tensors,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unflatten_tensors,
)
from afmrl_dagster.training.encoder_training import EncoderTrainingConfig, train_encoder

AGCL = {"agcl": {}}
INFONCE = {
    "agcl": {"use_weights": False, "use_false_negative_mask": False}, "sampler": "random", "grad_accumulation": 2, "checkpoint_every_steps": 1
}


def tiny_catalog(num_lines=3, per_line=4, listings=2, seed=0):
    """12 products of 2 listings in 3 lines of near-identical siblings; small feature dims."""
    rng = np.random.default_rng(seed)
    product_ids, product_lines, texts, image, text = [], [], [], [], []
    for line in range(num_lines):
        line_image, line_text = rng.normal(size=16), rng.normal(size=8)
        for variant in range(per_line):
            for _ in range(listings):
                product_ids.append(f"l{line}v{variant}")
                product_lines.append(f"line{line}")
                texts.append(f"type: line{line}; variant: v{variant}; colour: c{variant % 3}")
                image.append(line_image + 0.4 * rng.normal(size=16))
                text.append(line_text + 0.4 * rng.normal(size=8))
    n = len(product_ids)
    mask = rng.random(n) > 0.1
    features = ListingFeatures([f"x{i}" for i in range(n)], np.abs(np.array(image)) * mask[:, None], mask, np.array(text))
    return features, product_ids, product_lines, texts


def make_config(**overrides) -> EncoderTrainingConfig:
    # Dropout stays on (0.1 by default) so the torch generator matters to the result.
    base = {"epochs": 4, "batch_size": 4, "learning_rate": 3e-3, "seed": 5, "head": {"embed_dim": 8, "hidden_dim": 16}}
    return EncoderTrainingConfig(**{**base, **overrides})


def without_seconds(history):
    # Wall time is the one history entry that cannot repeat.
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def assert_same_result(first, second):
    assert without_seconds(first.history) == without_seconds(second.history)
    state, other = first.head.state_dict(), second.head.state_dict()
    assert state.keys() == other.keys()
    for name in state:
        assert torch.equal(state[name], other[name]), name


@pytest.mark.parametrize("loss", [AGCL, INFONCE], ids=["agcl", "infonce"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, loss):
    data = tiny_catalog()
    uninterrupted = train_encoder(*data, make_config(**loss))
    assert uninterrupted.completed and len(uninterrupted.history) == 4
    steps_per_epoch = uninterrupted.global_step // 4
    assert steps_per_epoch >= 2

    folder = str(tmp_path / "ckpt")
    stop_at = 2 * steps_per_epoch + 1  # two epochs and one step into the third
    partial = train_encoder(*data, make_config(**loss, checkpoint_dir=folder, max_steps=stop_at))
    assert not partial.completed and partial.global_step == stop_at and len(partial.history) == 2
    assert without_seconds(partial.history) == without_seconds(uninterrupted.history[:2])
    assert has_checkpoint(folder)
    _, meta = load_checkpoint(folder)
    assert meta["progress"]["global_step"] == stop_at and meta["progress"]["epoch"] == 2

    seen = []
    resumed = train_encoder(*data, make_config(**loss, checkpoint_dir=folder), on_epoch=seen.append)
    assert resumed.completed and resumed.global_step == uninterrupted.global_step
    assert [record["epoch"] for record in seen] == [3, 4]  # only the epochs this call trained
    assert_same_result(resumed, uninterrupted)
    assert not torch.equal(partial.head.residual[0].weight, resumed.head.residual[0].weight)

    # A finished checkpoint resumes to the same result without training.
    again = train_encoder(*data, make_config(**loss, checkpoint_dir=folder), on_epoch=seen.append)
    assert_same_result(again, uninterrupted)
    assert len(seen) == 2


def test_resume_refuses_a_changed_config_or_data(tmp_path):
    data = tiny_catalog()
    folder = str(tmp_path / "ckpt")
    train_encoder(*data, make_config(checkpoint_dir=folder, max_steps=2))
    with pytest.raises(ValueError, match="learning_rate") as raised:
        train_encoder(*data, make_config(checkpoint_dir=folder, learning_rate=1e-2))
    assert "agcl" not in str(raised.value)  # names only what differs
    with pytest.raises(ValueError, match=r"agcl\.delta"):
        train_encoder(*data, make_config(checkpoint_dir=folder, agcl={"delta": 0.3}))
    features, ids, lines, texts = data
    changed = ListingFeatures(features.listing_ids, features.image, features.image_mask, features.text + 1.0)
    with pytest.raises(ValueError, match=r"data\.digest"):
        train_encoder(changed, ids, lines, texts, make_config(checkpoint_dir=folder))
    # Checkpoint cadence, device and max_steps may change; resume=False starts afresh.
    train_encoder(*data, make_config(checkpoint_dir=folder, checkpoint_every_steps=2, max_steps=3))
    fresh = train_encoder(*data, make_config(checkpoint_dir=folder, learning_rate=1e-2, max_steps=1), resume=False)
    assert fresh.global_step == 1 and load_checkpoint(folder)[1]["fingerprint"]["learning_rate"] == 1e-2


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    save_checkpoint(root, {"w": torch.arange(4.0)}, {"step": 1})
    real_save_file = checkpoints.save_file

    def failing_save_file(tensors, path):
        real_save_file(tensors, path)  # half the checkpoint is on disk ...
        assert any(p.name.startswith(checkpoints.STAGING_PREFIX) for p in root.iterdir())
        raise OSError("disk full")  # ... when the write fails

    monkeypatch.setattr(checkpoints, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(root, {"w": torch.zeros(4)}, {"step": 2})
    state, meta = load_checkpoint(root)
    assert meta == {"step": 1} and torch.equal(state["w"], torch.arange(4.0))
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "checkpoint-00000001"]  # staging removed
    monkeypatch.undo()
    save_checkpoint(root, {"w": torch.ones(2)}, {"step": 3})
    assert load_checkpoint(root)[1] == {"step": 3}
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "checkpoint-00000002"]  # the old one is gone
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "empty")


def test_training_survives_a_failed_checkpoint_write(tmp_path, monkeypatch):
    data = tiny_catalog()
    uninterrupted = train_encoder(*data, make_config())
    folder = str(tmp_path / "ckpt")
    train_encoder(*data, make_config(checkpoint_dir=folder, max_steps=4))

    def failing_save_file(tensors, path):
        raise OSError("killed while writing")

    monkeypatch.setattr(checkpoints, "save_file", failing_save_file)
    with pytest.raises(OSError, match="killed"):
        train_encoder(*data, make_config(checkpoint_dir=folder))
    assert load_checkpoint(folder)[1]["progress"]["global_step"] == 4
    monkeypatch.undo()
    assert_same_result(train_encoder(*data, make_config(checkpoint_dir=folder)), uninterrupted)


def test_optimizer_state_round_trips_without_pickles():
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3, betas=(0.8, 0.95))
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    structure, tensors = flatten_tensors(optimizer.state_dict(), "optimizer")
    restored = unflatten_tensors(structure, tensors)
    assert set(restored["state"]) == {0, 1} and restored["param_groups"][0]["betas"] == (0.8, 0.95)
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(restored["state"][index][key], value)
    with pytest.raises(TypeError, match="object"):
        flatten_tensors({"bad": object()}, "x")


def test_mixed_precision_auto_is_full_precision_on_cpu():
    data = tiny_catalog()
    auto = train_encoder(*data, make_config(epochs=2, mixed_precision="auto"))
    off = train_encoder(*data, make_config(epochs=2, mixed_precision="no"))
    assert make_config().autocast_dtype is None
    assert_same_result(auto, off)
    with pytest.raises(ValueError, match="CUDA"):
        make_config(mixed_precision="bf16")
    with pytest.raises(ValueError, match="mixed_precision"):
        make_config(mixed_precision="fp8")
    with pytest.raises(ValueError, match="max_steps"):
        make_config(max_steps=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_training_on_cuda_stays_close_to_full_precision(tmp_path):
    data = tiny_catalog()
    config = make_config(epochs=6, device="cuda")
    assert config.autocast_dtype == torch.bfloat16
    mixed = train_encoder(*data, config)
    full = train_encoder(*data, replace(config, mixed_precision="no"))
    assert all(math.isfinite(r["loss"]) for r in mixed.history)
    assert mixed.history[-1]["loss"] < mixed.history[0]["loss"]
    assert abs(mixed.history[-1]["loss"] - full.history[-1]["loss"]) < 0.1 * full.history[-1]["loss"]
    folder = str(tmp_path / "ckpt")
    train_encoder(*data, replace(config, checkpoint_dir=folder, max_steps=5))
    resumed = train_encoder(*data, replace(config, checkpoint_dir=folder))
    assert resumed.completed and len(resumed.history) == 6
