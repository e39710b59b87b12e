"""The whole chain through Dagster with the Hugging Face backends: a tiny Qwen2-VL (random
weights, built offline) is the teacher that reads the photos, the student that is distilled
(LoRA SFT) and refined (GRPO), and the VLM2Vec encoder trained with AGCL; the index, the
promotion, the serving record and ``afmrl search`` serve what they trained. And the same chain
with the fine-tuned towers as the encoder. Both chains train on two processes (``world_size``
2: torchrun through Dagster Pipes, DDP over gloo), so every encoder backend and both student
kinds train distributed through the real assets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dagster as dg
import pytest

from afmrl_dagster.assets.attributes import AttributeGeneratorConfig
from afmrl_dagster.assets.cit import CITConfig
from afmrl_dagster.assets.encoder import EncoderTrainingRunConfig
from afmrl_dagster.assets.rar import RARConfig
from afmrl_dagster.assets.retrieval import EvaluationConfig
from afmrl_dagster.resources.teacher import AttributeTeacherBackend
from afmrl_dagster.serving import read_serving_record
from afmrl_dagster.storage import open_store
from afmrl_dagster.vlm.tiny_models import build_tiny_qwen2_vl

from pipeline_fixtures import materialised_chain, tiny_resources

CATALOG = "builtin:families=2,siblings=3,listings=3,lines=mugs"
IMAGE_SIZE = 16  # the tiny Qwen2-VL's processor turns a 16 px photo into 4 image tokens


def metadata_of(instance, asset: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    return {key: value.value for key, value in event.asset_materialization.metadata.items()}


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_pipeline")
    model = build_tiny_qwen2_vl(root / "tiny-qwen2-vl")
    teacher = AttributeTeacherBackend(kind=f"hf-vlm:{model}", batch_size=8, max_new_tokens=32, image_size=IMAGE_SIZE)
    resources = tiny_resources(root, catalog_spec=CATALOG, encoder=f"vlm2vec:{model}", teacher=teacher, generator=f"hf-vlm:{model}",
                               world_size=2)
    config = {
        "attribute_generator": AttributeGeneratorConfig(hf_epochs=4, hf_batch_size=4, hf_learning_rate=5e-3, lora_rank=4,
                                                        hf_max_new_tokens=32, hf_image_size=IMAGE_SIZE),
        "agcl_encoder": EncoderTrainingRunConfig(epochs=2, batch_size=4, vlm2vec_lora_rank=4, vlm2vec_image_size=IMAGE_SIZE,
                                                 vlm2vec_learning_rate=1e-3),
        "rar_generator": RARConfig(steps=2, queries_per_step=2, group_size=4, reward_k=2, hf_learning_rate=1e-3),
        "cit_encoder": CITConfig(epochs=1, batch_size=4),
        "retrieval_evaluation": EvaluationConfig(min_gain_over_zero_shot=-1.0),
    }
    with materialised_chain(root, resources, config) as (_, instance, outcome):
        yield instance, outcome, root, model


def test_the_teacher_vlm_reads_photos_and_writes_parseable_attributes(hf_run):
    instance, _, _, _ = hf_run
    metadata = metadata_of(instance, "teacher_attributes")
    assert metadata["teacher"].startswith("hf-vlm")
    assert metadata["valid_share"] == 1.0
    assert metadata["mean_attributes"] >= 1.0


def test_the_student_vlm_is_distilled_with_lora_and_its_loss_falls(hf_run):
    instance, _, _, model = hf_run
    metadata = metadata_of(instance, "attribute_generator")
    assert metadata["sft_loss_last"] < metadata["sft_loss_first"]
    assert metadata["generator"] == "hf-vlm"
    assert metadata["training_processes"] == 2


def test_one_grpo_run_changes_only_the_adapter(hf_run):
    _, outcome, _, _ = hf_run
    weights = outcome["rar"]["weights"]
    assert weights["adapter_tensors_changed"] > 0
    assert weights["base_tensors_changed"] == 0


def test_the_vlm2vec_encoder_serves_through_the_record_and_search_answers(hf_run):
    instance, _, root, model = hf_run
    encoder = metadata_of(instance, "agcl_encoder")
    assert encoder["encoder_backend"] == f"vlm2vec:{model}"
    assert encoder["training_processes"] == 2
    store = open_store(str(root / "store"))
    record = read_serving_record(store)
    assert json.loads(store.read_directory_file(store.key_of(record.encoder_uri), "encoder.json"))["kind"] == "vlm2vec"
    assert json.loads(store.read_directory_file(store.key_of(record.generator_uri), "generator.json"))["kind"] == "hf-vlm"
    env = {**os.environ, "AFMRL_STORE": str(root / "store"), "AFMRL_DEVICE": "cpu"}
    answer = subprocess.run([sys.executable, "-m", "afmrl_dagster.apps.cli", "search", "--text", "blue mug", "--k", "3", "--json"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert answer.returncode == 0, answer.stderr[-2000:]
    result = json.loads(answer.stdout)
    assert len(result["hits"]) == 3
    assert isinstance(result["attributes"], dict) and result["attributes"], "the hf-vlm student wrote no attributes for the query"


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory):
    """The chain with ``AFMRL_ENCODER=dual-tower-finetune``: the real pretrained towers' last
    blocks train with the head, from the photos and texts, inside the same assets."""
    root = tmp_path_factory.mktemp("finetune_pipeline")
    resources = tiny_resources(root, catalog_spec=CATALOG, encoder="dual-tower-finetune", world_size=2)
    config = {
        "attribute_generator": AttributeGeneratorConfig(epochs=30, batch_size=8),
        "agcl_encoder": EncoderTrainingRunConfig(epochs=2, batch_size=4),
        "rar_generator": RARConfig(steps=2, queries_per_step=2, group_size=4, reward_k=2),
        "cit_encoder": CITConfig(epochs=1, batch_size=4),
        "retrieval_evaluation": EvaluationConfig(min_gain_over_zero_shot=-1.0),
    }
    with materialised_chain(root, resources, config) as (_, instance, outcome):
        yield instance, outcome, root


def test_fine_tuned_towers_train_index_and_serve_through_the_same_assets(finetune_run):
    instance, outcome, root = finetune_run
    encoder, generator = metadata_of(instance, "agcl_encoder"), metadata_of(instance, "attribute_generator")
    assert encoder["encoder_backend"] == "dual-tower-finetune"
    assert (encoder["training_processes"], generator["training_processes"], generator["generator"]) == (2, 2, "compact")
    store = open_store(str(root / "store"))
    record = read_serving_record(store)
    assert json.loads(store.read_directory_file(store.key_of(record.encoder_uri), "encoder.json"))["kind"] == "dual-tower-finetune"
    assert outcome["cit"]["validation"]["num_queries"] > 0  # CIT trained the fine-tuned encoder one more round and scored it
    env = {**os.environ, "AFMRL_STORE": str(root / "store"), "AFMRL_DEVICE": "cpu"}
    answer = subprocess.run([sys.executable, "-m", "afmrl_dagster.apps.cli", "search", "--text", "green mug", "--k", "3", "--json"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert len(json.loads(answer.stdout)["hits"]) == 3
