"""Distributed training: two gloo processes started by torchrun through Dagster Pipes train what
one process trains on the same global batches (the encoder, and the generator's SFT of either
kind), and a killed rank fails the run with a clear message, the rerun resuming from the last
checkpoint."""


import os
import signal
import threading
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch

from afmrl_dagster.encoders.dual_tower import ListingFeatures
from afmrl_dagster.encoders.listing_encoder import ListingInputs, load_encoder
from afmrl_dagster.training.distributed import product_shards
from afmrl_dagster.training.encoder_training import EncoderTrainingConfig, train_encoder
from afmrl_dagster.training.training_job import RESULT_DIR, EncoderJob, rank_states, read_job, write_encoder_job
from afmrl_dagster.resources.compute import TorchCompute


def catalog(products: int = 24, listings: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = products * listings
    centres = rng.normal(size=(products, 12))
    image = np.repeat(centres, listings, axis=0) + 0.3 * rng.normal(size=(n, 12))
    text = np.repeat(rng.normal(size=(products, 8)), listings, axis=0) + 0.3 * rng.normal(size=(n, 8))
    features = ListingFeatures([f"l{i:03d}" for i in range(n)], image, rng.random(n) > 0.1, text)
    product_ids = [f"p{i // listings}" for i in range(n)]
    lines = [f"line{(i // listings) % 3}" for i in range(n)]
    texts = [f"colour: c{(i // listings) % 5}; size: s{(i // listings) % 7}" for i in range(n)]
    return features, product_ids, lines, texts


def config(tmp_path: Path, **overrides) -> EncoderTrainingConfig:
    settings = {"epochs": 3, "batch_size": 8, "pairs_per_product": 2, "head": {"embed_dim": 8, "hidden_dim": 16, "dropout": 0.0},
                "checkpoint_dir": str(tmp_path / "checkpoints"), **overrides}
    return EncoderTrainingConfig(**settings)


def job_of(tmp_path: Path, training: EncoderTrainingConfig) -> Path:
    features, product_ids, lines, texts = catalog()
    inputs = ListingInputs(features.listing_ids, [""] * len(features), features=features)
    return write_encoder_job(tmp_path / "job", EncoderJob("dual-tower", {}, training, inputs, product_ids, lines, texts))


def launch(job: Path, world_size: int):
    @dg.asset
    def distributed_encoder(context: dg.AssetExecutionContext, torch_compute: TorchCompute) -> dg.MaterializeResult:
        _, history, reported = torch_compute.train_on_ranks(context, str(job))
        return dg.MaterializeResult(metadata={"epochs_reported": len(reported), "final_loss": history[-1]["loss"]})

    return dg.materialize([distributed_encoder], resources={"torch_compute": TorchCompute(device="cpu", world_size=world_size)},
                          raise_on_error=False)


def assert_same_weights(got, want, atol: float = 1e-5) -> None:
    for name, tensor in want.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], tensor, rtol=1e-4, atol=atol, msg=name)


def test_product_shards_keep_a_product_on_one_rank_and_balance_the_pairs():
    codes = np.array([3, 3, 1, 1, 1, 7, 2, 2, 9, 9])
    shards = product_shards(codes, 2)
    assert sorted(np.concatenate(shards).tolist()) == list(range(10))
    for product in set(codes.tolist()):
        assert len({rank for rank, shard in enumerate(shards) if product in codes[shard]}) == 1
    assert [len(shard) for shard in shards] == [5, 5]
    assert [len(shard) for shard in product_shards(np.array([4, 4, 4, 4]), 2)] == [2, 2]  # one product: split by pairs
    with pytest.raises(ValueError, match="cannot feed 4 ranks"):
        product_shards(np.array([1, 2, 3]), 4)


def test_a_job_reads_back_as_written(tmp_path):
    training = config(tmp_path)
    job = read_job(job_of(tmp_path, training))
    assert isinstance(job, EncoderJob)
    features, product_ids, lines, texts = catalog()
    assert job.config == training and job.product_ids == product_ids and job.attribute_texts == texts and job.backend == "dual-tower"
    np.testing.assert_array_equal(job.inputs.features.image, features.image.astype(job.inputs.features.image.dtype))
    assert rank_states(tmp_path / "job", 2) == {0: "not started", 1: "not started"}


def test_two_gloo_processes_through_pipes_train_what_one_process_trains(tmp_path):
    training = config(tmp_path, checkpoint_dir=None)
    job = job_of(tmp_path, training)
    result = launch(job, world_size=2)
    assert result.success
    metadata = result.asset_materializations_for_node("distributed_encoder")[0].metadata
    assert metadata["epochs_reported"].value == training.epochs  # rank 0's epochs came back through Pipes
    features, product_ids, lines, texts = catalog()
    alone = train_encoder(features, product_ids, lines, texts, training)
    assert_same_weights(load_encoder(job / RESULT_DIR).head, alone.head)
    assert metadata["final_loss"].value == pytest.approx(alone.history[-1]["loss"], rel=1e-5)
    assert rank_states(job, 2) == {0: "done", 1: "done"}


def _kill_rank_when_checkpointed(job: Path, checkpoints: Path, rank: int, killed: list) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not killed:
        if any(checkpoints.glob("*")):
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    command = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if f"RANK={rank}".encode() in environ and b"afmrl_dagster.apps.train_worker" in command and str(job).encode() in command:
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(int(pid))
                    return
        time.sleep(0.02)


def test_a_killed_rank_fails_the_run_by_name_and_the_rerun_resumes_from_the_checkpoint(tmp_path):
    training = config(tmp_path, epochs=400, checkpoint_every_steps=20)
    job = job_of(tmp_path, training)
    killed: list = []
    killer = threading.Thread(target=_kill_rank_when_checkpointed, args=(job, Path(training.checkpoint_dir), 1, killed), daemon=True)
    killer.start()
    failed = launch(job, world_size=2)
    killer.join(timeout=5)
    assert killed and not failed.success
    failure = next(event for event in failed.all_events if event.is_step_failure).step_failure_data.error
    assert "distributed training failed (2 processes)" in failure.message and "rank 1 stopped without finishing" in failure.message
    assert "resume from its last checkpoint" in failure.message

    rerun = launch(job_of(tmp_path, training), world_size=2)
    assert rerun.success
    features, product_ids, lines, texts = catalog()
    alone = train_encoder(features, product_ids, lines, texts, config(tmp_path, epochs=400, checkpoint_every_steps=20, checkpoint_dir=None))
    assert_same_weights(load_encoder(tmp_path / "job" / RESULT_DIR).head, alone.head, atol=1e-4)


SFT_RANK = """
import sys
import torch
sys.path.insert(0, {tests!r})
from test_generator import SMALL, toy_problem
from afmrl_dagster.attributes.generator import AttributeGenerator
from afmrl_dagster.attributes.vocabulary import AttributeVocabulary
from afmrl_dagster.training.distributed import init_from_environment
from afmrl_dagster.training.generator_sft import SFTConfig, train_generator_sft
rank, world_size = init_from_environment()
image, mask, text, targets = toy_problem(97, seed=4)  # the last batch of 1 row leaves rank 1 without rows
vocab = AttributeVocabulary.from_attribute_sets(targets)
torch.manual_seed(0)
model = AttributeGenerator(len(vocab), image.shape[1], text.shape[1], SMALL)
history = train_generator_sft(model, vocab, image, mask, text, targets, SFTConfig(epochs=3, batch_size=16, learning_rate=5e-3))
if rank == 0:
    torch.save({{"state": model.state_dict(), "loss": history[-1]["loss"], "world_size": world_size}}, {out!r})
torch.distributed.destroy_process_group()
"""


def test_generator_sft_on_two_gloo_processes_trains_what_one_process_trains(tmp_path):
    import subprocess
    import sys

    from afmrl_dagster.attributes.generator import AttributeGenerator
    from afmrl_dagster.attributes.vocabulary import AttributeVocabulary
    from afmrl_dagster.training.generator_sft import SFTConfig, train_generator_sft

    script = tmp_path / "sft_rank.py"
    script.write_text(SFT_RANK.format(tests=str(Path(__file__).parent), out=str(tmp_path / "ranks.pt")))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2", str(script)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = torch.load(tmp_path / "ranks.pt", weights_only=True)
    sys.path.insert(0, str(Path(__file__).parent))
    from test_generator import SMALL, toy_problem

    image, mask, text, targets = toy_problem(97, seed=4)  # the last batch of 1 row leaves rank 1 without rows
    vocab = AttributeVocabulary.from_attribute_sets(targets)
    torch.manual_seed(0)
    model = AttributeGenerator(len(vocab), image.shape[1], text.shape[1], SMALL)
    history = train_generator_sft(model, vocab, image, mask, text, targets, SFTConfig(epochs=3, batch_size=16, learning_rate=5e-3))
    assert ranks["world_size"] == 2 and ranks["loss"] == pytest.approx(history[-1]["loss"], rel=1e-5)
    d = SMALL.d_model
    for name, tensor in model.state_dict().items():
        got = ranks["state"][name]
        if name.endswith("qkv.bias"):
            # The keys' bias adds the same q·b to every score of a row, which softmax ignores: its gradient
            # is 0 up to rounding, and Adam scales that rounding up to steps of the learning rate's size,
            # differently in each run. The queries' and values' biases are compared; the keys' is not.
            got, tensor = torch.cat([got[:d], got[2 * d:]]), torch.cat([tensor[:d], tensor[2 * d:]])
        torch.testing.assert_close(got, tensor, rtol=1e-4, atol=1e-5, msg=name)


def _photos(folder: Path, count: int) -> list[str]:
    import PIL.Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    paths = []
    for i in range(count):
        path = folder / f"photo-{i}.png"
        PIL.Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _generator_job(tmp_path: Path, spec: str, hf_epochs: int = 2):
    from afmrl_dagster.storage import read_uri_bytes
    from afmrl_dagster.training.generator_backends import CompactSFTSettings, HFDistillationSettings
    from afmrl_dagster.training.training_job import GeneratorJob

    sys_path = str(Path(__file__).parent)
    import sys

    if sys_path not in sys.path:
        sys.path.insert(0, sys_path)
    from test_generator import toy_problem

    count = 9 if spec.startswith("hf-vlm") else 64  # 9: the last batch of 1 row leaves rank 1 without rows
    image, mask, text, targets = toy_problem(count, seed=4)
    image = np.nan_to_num(image)
    features = ListingFeatures([f"l{i:03d}" for i in range(count)], image, mask, text)
    inputs = ListingInputs(features.listing_ids, [f"listing {i}" for i in range(count)], image_uris=_photos(tmp_path / "photos", count),
                           read_bytes=read_uri_bytes, features=features, descriptions=[None] * count)
    compact = CompactSFTSettings(d_model=32, n_layers=1, constrained_decoding=True, epochs=3, batch_size=16, learning_rate=5e-3, seed=0)
    hf = HFDistillationSettings(hf_epochs=hf_epochs, hf_batch_size=4, hf_learning_rate=1e-3, hf_max_new_tokens=24, hf_image_size=16)
    return GeneratorJob(spec, inputs, targets, compact, hf, "cpu")


def test_the_compact_generators_sft_runs_on_two_gloo_processes_through_pipes(tmp_path):
    from afmrl_dagster.training.generator_backends import load_writer
    from afmrl_dagster.training.training_job import read_job, write_generator_job

    job = _generator_job(tmp_path, "compact")
    folder = write_generator_job(tmp_path / "job", job)
    assert read_job(folder).targets == job.targets
    result = launch(folder, world_size=2)
    assert result.success
    metadata = result.asset_materializations_for_node("distributed_encoder")[0].metadata
    assert metadata["epochs_reported"].value == job.compact.epochs
    assert rank_states(folder, 2) == {0: "done", 1: "done"}
    writer = load_writer(folder / RESULT_DIR)
    assert writer.kind == "compact" and len(writer.write(job.inputs)) == len(job.inputs)


def test_the_hf_vlm_generators_lora_sft_on_two_gloo_processes_through_pipes_trains_what_one_process_trains(tmp_path):
    from afmrl_dagster.training.generator_backends import distill_writer, load_writer
    from afmrl_dagster.training.training_job import write_generator_job
    from afmrl_dagster.vlm.tiny_models import build_tiny_qwen2_vl

    model = build_tiny_qwen2_vl(tmp_path / "tiny-qwen2-vl")
    job = _generator_job(tmp_path, f"hf-vlm:{model}")
    folder = write_generator_job(tmp_path / "job", job)
    result = launch(folder, world_size=2)
    assert result.success
    metadata = result.asset_materializations_for_node("distributed_encoder")[0].metadata
    assert metadata["epochs_reported"].value == job.hf.hf_epochs
    alone, history = distill_writer(job.generator, job.inputs, job.targets, job.compact, job.hf, "cpu")
    assert metadata["final_loss"].value == pytest.approx(history[-1]["loss"], rel=1e-4)
    trained = dict(load_writer(folder / RESULT_DIR).generator.model.named_parameters())
    adapter = {name: parameter for name, parameter in alone.generator.model.named_parameters() if parameter.requires_grad}
    assert adapter and all("lora" in name for name in adapter)
    for name, parameter in adapter.items():
        torch.testing.assert_close(trained[name], parameter, rtol=1e-4, atol=1e-5, msg=name)
    # LoRA's B matrices start at zero: the two ranks did train the adapter.
    assert max(float(trained[name].abs().max()) for name in adapter if "lora_B" in name) > 0
