"""The Hugging Face VLM as teacher and as student, on tiny random-weight models built offline
(Qwen2-VL, LLaVA, Idefics3): the generator kinds' dispatch, save and load, LoRA SFT, one RAR
step that changes only the adapter, the in-process teacher with its cache, and the served
teacher reading the photo of the request."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import PIL.Image
import polars as pl
import pytest
import requests
import torch

from afmrl_dagster.attributes.annotation_cache import AnnotationCache, annotate_with_cache
from afmrl_dagster.attributes.generator import AttributeGenerator, GeneratorConfig, save_generator
from afmrl_dagster.attributes.hf_generator import HFAttributeGenerator, HFGeneratorConfig
from afmrl_dagster.attributes.hf_teacher import HFVLMTeacher
from afmrl_dagster.attributes.http_teacher import EndpointConfig, OpenAICompatibleTeacher
from afmrl_dagster.attributes.prompts import TEACHER_PROMPT
from afmrl_dagster.attributes.teacher import attribute_table
from afmrl_dagster.attributes.vocabulary import AttributeVocabulary
from afmrl_dagster.encoders.dual_tower import ListingFeatures
from afmrl_dagster.storage import LocalObjectStore
from afmrl_dagster.training.generator_backends import (CompactWriter, GeneratorFolderError, HFDistillationSettings, HFRARSettings,
                                                       HFVLMWriter, ListingInputs, distill_writer, folder_kind, load_writer,
                                                       parse_generator_spec)
from afmrl_dagster.training.grpo import GRPOConfig



@pytest.fixture(scope="module")
def tiny(tiny_vlms):
    return tiny_vlms


def _photo(seed: int) -> bytes:
    image = PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


PHOTOS = {f"mem://{i}": _photo(i) for i in range(3)}
TITLES = ["red mug", "blue mug", "red bag"]
TARGETS = [{"colour": "red"}, {"colour": "blue"}, {"colour": "red", "kind": "bag"}]


def _inputs(rows=3) -> ListingInputs:
    features = ListingFeatures([f"l{i}" for i in range(rows)], np.zeros((rows, 4)), np.ones(rows, dtype=bool), np.zeros((rows, 4)))
    return ListingInputs([f"l{i}" for i in range(rows)], TITLES[:rows], image_uris=list(PHOTOS)[:rows], read_bytes=PHOTOS.__getitem__,
                         features=features, descriptions=[None] * rows)


HF = HFDistillationSettings(hf_epochs=4, hf_batch_size=3, hf_learning_rate=5e-2, lora_rank=4, hf_max_new_tokens=12, hf_image_size=16)


def _compact_settings():
    from afmrl_dagster.training.generator_backends import CompactSFTSettings

    return CompactSFTSettings(d_model=16, n_layers=1, constrained_decoding=True, epochs=2, batch_size=4, learning_rate=1e-3, seed=0)


def test_generator_specs_and_folders_are_checked(tmp_path):
    assert parse_generator_spec("compact") == ("compact", None)
    assert parse_generator_spec("hf-vlm:Qwen/Qwen2.5-VL-3B-Instruct") == ("hf-vlm", "Qwen/Qwen2.5-VL-3B-Instruct")
    for bad in ("hf-vlm:", "qwen", ""):
        with pytest.raises(ValueError, match="'compact' or 'hf-vlm:<hub id or local folder>'"):
            parse_generator_spec(bad)
    with pytest.raises(GeneratorFolderError, match="holds no generator"):
        folder_kind(tmp_path)
    (tmp_path / "generator.json").write_text(json.dumps({"kind": "gpt"}))
    with pytest.raises(GeneratorFolderError, match="unknown kind 'gpt'"):
        folder_kind(tmp_path)
    (tmp_path / "generator.json").write_text(json.dumps({"kind": "hf-vlm", "config": {}}))
    with pytest.raises(GeneratorFolderError, match="field 'base_model' is missing"):
        load_writer(tmp_path)


def test_compact_folders_load_with_or_without_a_kind(tmp_path):
    vocabulary = AttributeVocabulary.from_attribute_sets(TARGETS)
    model = AttributeGenerator(len(vocabulary), 4, 4, GeneratorConfig(d_model=16, n_layers=1))
    save_generator(model, vocabulary, tmp_path / "before-kinds")  # a folder written before generator.json existed
    assert folder_kind(tmp_path / "before-kinds") == "compact"
    old = load_writer(tmp_path / "before-kinds")
    CompactWriter(model, vocabulary).save(tmp_path / "now")
    assert json.loads((tmp_path / "now" / "generator.json").read_text()) == {"kind": "compact"}
    new = load_writer(tmp_path / "now")
    assert isinstance(old, CompactWriter) and isinstance(new, CompactWriter)
    assert old.write(_inputs()) == new.write(_inputs()) == CompactWriter(model.eval(), vocabulary).write(_inputs())


def test_hf_student_sft_save_load_and_one_rar_step_changing_only_the_adapter(tiny, tmp_path):
    epochs = []
    writer, history = distill_writer(f"hf-vlm:{tiny('qwen')}", _inputs(), TARGETS, _compact_settings(), HF, on_epoch=epochs.append)
    assert [row["epoch"] for row in history] == [0, 1, 2, 3] and epochs == history
    assert history[-1]["loss"] < history[0]["loss"]
    assert writer.keys == {"colour", "kind"} and writer.parse_keys is None
    written = writer.write(_inputs())
    writer.save(tmp_path / "sft", extra_json={"towers.json": {"image_tower": "t"}})
    saved = {path.name for path in (tmp_path / "sft").iterdir()}
    assert saved == {"adapter", "generator.json", "towers.json"}  # the base weights are referenced, not copied
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {path.name for path in (tmp_path / "sft" / "adapter").iterdir()}
    description = json.loads((tmp_path / "sft" / "generator.json").read_text())
    assert (description["kind"], description["base_model"], description["keys"]) == ("hf-vlm", tiny("qwen"), ["colour", "kind"])

    loaded = load_writer(tmp_path / "sft")
    assert isinstance(loaded, HFVLMWriter) and loaded.write(_inputs()) == written

    policy_writer = load_writer(tmp_path / "sft", trainable=True)
    base = {name: p.detach().clone() for name, p in policy_writer.module.named_parameters() if "lora_" not in name}

    def reward(indices, groups):
        return np.array([[len(text) % 3 for text in group] for group in groups], dtype=float)

    outcome = policy_writer.refine(_inputs(), reward, GRPOConfig(steps=1, queries_per_step=2, group_size=3, seed=0),
                                   HFRARSettings(hf_learning_rate=5e-2))
    assert outcome.weights["adapter_tensors_changed"] > 0 and outcome.weights["base_tensors_changed"] == 0
    assert all(torch.equal(p, base[name]) for name, p in outcome.policy.module.named_parameters() if "lora_" not in name)
    assert np.isfinite(outcome.history[0]["loss"]) and outcome.history[0]["kl"] >= 0
    assert outcome.reference.write(_inputs()) == written  # the KL anchor is the SFT adapter, untouched
    outcome.policy.save(tmp_path / "rar")
    assert not any(path.suffix == ".safetensors" and "adapter" not in path.name for path in (tmp_path / "rar").rglob("*"))


def test_hf_student_sft_killed_mid_run_resumes_from_its_checkpoint(tiny, tmp_path):
    """The LoRA SFT dies after epoch 2 of 4; run again over the same checkpoint folder it trains
    epochs 3 and 4 only and ends with the adapter of the run that was never stopped."""
    from afmrl_dagster.training.checkpoints import LoopCheckpoint

    whole, whole_history = distill_writer(f"hf-vlm:{tiny('qwen')}", _inputs(), TARGETS, _compact_settings(), HF)

    def die_after_two(row):
        if row["epoch"] == 1:
            raise RuntimeError("killed")

    checkpoint = LoopCheckpoint(tmp_path / "sft", {"loop": "sft"})
    with pytest.raises(RuntimeError, match="killed"):
        distill_writer(f"hf-vlm:{tiny('qwen')}", _inputs(), TARGETS, _compact_settings(), HF, on_epoch=die_after_two, checkpoint=checkpoint)
    epochs = []
    resumed, history = distill_writer(f"hf-vlm:{tiny('qwen')}", _inputs(), TARGETS, _compact_settings(), HF,
                                      on_epoch=lambda row: epochs.append(row["epoch"]), checkpoint=checkpoint)
    assert epochs == [2, 3] and [row["loss"] for row in history] == pytest.approx([row["loss"] for row in whole_history], rel=1e-5)
    adapter = dict(whole.module.named_parameters())
    assert all(torch.allclose(p, adapter[name], atol=1e-6) for name, p in resumed.module.named_parameters() if "lora_" in name)


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_hf_student_of_other_families_trains_saves_and_loads(tiny, tmp_path, family):
    settings = HFDistillationSettings(hf_epochs=2, hf_batch_size=3, hf_learning_rate=5e-2, lora_rank=4, hf_max_new_tokens=12, hf_image_size=16)
    writer, history = distill_writer(f"hf-vlm:{tiny(family)}", _inputs(), TARGETS, _compact_settings(), settings)
    assert len(history) == 2 and all(np.isfinite(row["loss"]) for row in history)
    writer.save(tmp_path / family)
    assert load_writer(tmp_path / family).write(_inputs()) == writer.write(_inputs())


def _listings(rows=3) -> pl.DataFrame:
    return pl.DataFrame({"listing_id": [f"l{i}" for i in range(rows)], "title": TITLES[:rows], "description": [None] * rows,
                         "image_uri": list(PHOTOS)[:rows]})


@pytest.mark.parametrize("family", ["qwen", "llava", "idefics3"])
def test_hf_vlm_teacher_reads_the_photos_records_invalid_answers_and_caches(tiny, tmp_path, family):
    teacher = HFVLMTeacher(tiny(family), read_image=PHOTOS.__getitem__, revision="r1", batch_size=2, max_new_tokens=5, image_size=16,
                           constrained_json=False)  # free: noise, which must be recorded
    assert teacher.version == f"{tiny(family)}@r1+teacher-v1"
    cache = AnnotationCache(LocalObjectStore(tmp_path))
    texts, stats = annotate_with_cache(teacher, _listings(), cache, read_image=PHOTOS.__getitem__)
    assert (stats.generated, stats.cached) == (3, 0) and all(isinstance(text, str) for text in texts)
    again, stats = annotate_with_cache(teacher, _listings(), cache, read_image=PHOTOS.__getitem__)
    assert (again, stats.generated, stats.cached) == (texts, 0, 3)
    table = attribute_table(_listings()["listing_id"].to_list(), texts, f"{teacher.name}@{teacher.version}")
    assert table.height == 3 and table.filter(~pl.col("is_valid"))["error"].is_not_null().all()  # noise is recorded, not repaired
    # The photo is part of the input: the prompt with the photo scores differently than without it.
    generator = teacher.generator()
    prompts = [TEACHER_PROMPT.render(title) for title in TITLES]
    images = [PIL.Image.open(io.BytesIO(PHOTOS[uri])) for uri in PHOTOS]
    with_photo = generator.encode_prompts(images, prompts)
    assert "pixel_values" in with_photo and with_photo["input_ids"].shape[1] > generator.encode_prompts([None] * 3, prompts)["input_ids"].shape[1]


def test_served_hf_vlm_teacher_answers_from_the_photo_of_the_request(tiny):
    from afmrl_dagster.apps.teacher_server import build_server

    model = f"hf-vlm:{tiny('qwen')}"
    server = build_server(model)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        client = OpenAICompatibleTeacher(EndpointConfig(base_url=base_url, model=model, max_tokens=12, max_retries=0),
                                         read_image=PHOTOS.__getitem__)
        row = {"listing_id": "l0", "title": TITLES[0], "description": None, "image_uri": "mem://0"}
        answer = client.complete("l0", client._messages(row))
        local = HFAttributeGenerator.from_pretrained(HFGeneratorConfig(model=tiny("qwen"), use_lora=False))
        prompt = TEACHER_PROMPT.render(TITLES[0])
        photo = PIL.Image.open(io.BytesIO(PHOTOS["mem://0"]))
        assert answer == local.generate([photo], [prompt], systems=[TEACHER_PROMPT.system], max_new_tokens=12)[0]
        messages = client._messages(row)
        messages[1]["content"][0]["image_url"]["url"] = "https://example.com/photo.jpg"
        refused = requests.post(f"{base_url}/chat/completions", json={"model": model, "messages": messages, "max_tokens": 4}, timeout=60)
        assert refused.status_code == 400 and "data URI" in refused.json()["error"]["message"]
    finally:
        server.shutdown()
        server.server_close()
