"""GPU benchmark: the project's VLM paths and training steps at a Qwen2-VL-2B-sized configuration.

Measures, on CUDA in bf16, with a Qwen2-VL model of Qwen2-VL-2B-Instruct's shape and RANDOM
weights built from a config (no hub download; the tokenizer is the tiny one of
:mod:`afmrl_dagster.vlm.tiny_models`, so texts take more tokens than with Qwen's own, and the
vocabulary mismatch does not matter for throughput) and the project's Qwen-VL processor
(:class:`~afmrl_dagster.vlm.processors.QwenVLProcessor`):

1. attribute generation through :class:`~afmrl_dagster.attributes.hf_generator.HFAttributeGenerator`
   at batch 1, 8 and 32: one 448 px image and a listing prompt each, greedy, exactly
   ``max_new_tokens`` new tokens (``min_new_tokens`` = max, so random weights cannot stop early);
2. the VLM2Vec encoder's AGCL training step (LoRA, bf16 autocast): ``encoder_batch_loss`` +
   backward + clipping + AdamW, as ``train_listing_encoder`` does it, and the peak GPU memory;
3. the dual-tower head's AGCL step (:class:`FrozenTowerEncoder` over cached features) on the GPU
   against the same step on this machine's CPU, in one process;
4. exact top-k search: faiss-gpu when ``import faiss`` works and sees a GPU, else torch's
   matrix product + top-k on the GPU (the table then says faiss-gpu was not available).

Every figure is timed after warm-up, between ``torch.cuda.synchronize()`` calls. It imports only
torch-level modules of the project (no polars, dagster, mlflow or faiss needed), so it runs on a
machine with only torch, transformers and peft, from the repository root:

    PYTHONPATH=. python3 benchmarks/gpu.py --out DIR                      # on the GPU machine (~2-5 min)
    PYTHONPATH=. .venv/bin/python benchmarks/gpu.py --smoke --out .afmrl/gpu-smoke  # tiny sizes on CPU, seconds
    .venv/bin/python benchmarks/gpu.py --from-json DIR/gpu_benchmark.json --write-results docs/results.md

``--out`` gets ``gpu_benchmark.json`` and ``gpu_benchmark.md``; ``--write-results`` writes the
table into the ``gpu-benchmark`` block of docs/results.md (from a run, or from a JSON file a
run on another machine brought back).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from afmrl_dagster.readme import publish_result

RESULTS_BLOCK = "gpu-benchmark"
JSON_FILE, MARKDOWN_FILE = "gpu_benchmark.json", "gpu_benchmark.md"

# Qwen2-VL-2B-Instruct's shape (its config.json), for a random-weight model of the same cost.
QWEN2_VL_2B_TEXT = {
    "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
    "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
QWEN2_VL_2B_VISION = {
    "depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4, "in_channels": 3,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
}
# --smoke: the tiny model of tiny_models.build_tiny_qwen2_vl (2 text layers, hidden 32).
TINY_TEXT = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 384, "max_position_embeddings": 1024, "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
}
TINY_VISION = {"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 4,
               "spatial_merge_size": 2, "temporal_patch_size": 2}

TITLES = [
    "red v-neck summer dress", "blue round-neck cotton t-shirt", "Arla standard milk 1 l", "stainless steel water bottle 750 ml",
    "wireless earbuds with charging case, black", "organic green tea, 20 bags", "leather wallet brown with coin pocket",
    "running shoes size 42 white and gray",
]
ATTRIBUTES = [
    {"colour": "red", "neckline": "v-neck"}, {"colour": "blue", "material": "cotton"}, {"brand": "arla", "fat": "3 %"},
    {"material": "steel", "volume": "750 ml"}, {"colour": "black", "connectivity": "bluetooth"}, {"brand": "pukka", "flavour": "green tea"},
    {"material": "leather", "colour": "brown"}, {"size": "42", "colour": "white"},
]


@dataclass
class Sizes:
    """What one run measures; ``full`` is the GPU run, ``smoke`` the seconds-long CPU check."""

    text: dict
    vision: dict
    image_px: int
    generation_batches: tuple[int, ...]
    max_new_tokens: int
    generation_repeats: int
    train_pairs: int
    train_warmup: int
    train_steps: int
    head_batches: tuple[int, ...]
    head_listings: int
    head_steps_gpu: int
    head_steps_cpu: int
    gallery: int
    queries: int
    search_dim: int
    top_k: int = 10


FULL = Sizes(QWEN2_VL_2B_TEXT, QWEN2_VL_2B_VISION, 448, (1, 8, 32), 64, 2, 32, 2, 3, (32, 256), 20000, 50, 10,
             1_000_000, 10_000, 256)
SMOKE = Sizes(TINY_TEXT, TINY_VISION, 32, (1, 2), 4, 1, 3, 1, 1, (8,), 200, 2, 2, 2000, 64, 32)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device) -> tuple[float, object]:
    """Seconds ``function()`` took, the device synchronised before and after, and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def random_image(seed: int, size: int) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def build_qwen2_vl(sizes: Sizes, device: torch.device, dtype: torch.dtype):
    """A random-weight Qwen2-VL of ``sizes``' shape on ``device`` and the project's Qwen-VL processor for it."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    from afmrl_dagster.vlm.processors import QwenVLProcessor
    from afmrl_dagster.vlm.tiny_models import QWEN2_VL_SPECIAL_TOKENS, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(QWEN2_VL_SPECIAL_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_VL_SPECIAL_TOKENS}
    text = {**sizes.text, "vocab_size": max(sizes.text["vocab_size"], len(tokenizer)),
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
    config = Qwen2VLConfig(
        text_config=text, vision_config=sizes.vision, tie_word_embeddings=sizes.text["tie_word_embeddings"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    patch, merge = sizes.vision["patch_size"], sizes.vision["spatial_merge_size"]
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=merge, temporal_patch_size=sizes.vision["temporal_patch_size"],
        min_pixels=(patch * merge) ** 2, max_pixels=max(sizes.image_px, patch * merge) ** 2,
    )
    return model.eval(), QwenVLProcessor(tokenizer, image_processor, config)


def generation_round(generator, images, prompts, new_tokens: int, device: torch.device) -> tuple[float, float, int, int]:
    """One batch through the generator: seconds preparing inputs, seconds generating, new tokens, prompt tokens a row."""
    prepare, batch = timed(lambda: generator.encode_prompts(images, prompts), device)
    decode, (_, mask) = timed(lambda: generator.generate_ids(batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens), device)
    return prepare, decode, int(mask.sum()), int(batch["attention_mask"].sum()) // len(prompts)


def bench_generation(model, processor, sizes: Sizes, device: torch.device) -> dict:
    """Listings/s and new tokens/s of HFAttributeGenerator at each batch size."""
    from afmrl_dagster.attributes.hf_generator import HFAttributeGenerator, HFGeneratorConfig

    generator = HFAttributeGenerator(model, processor, HFGeneratorConfig(
        model="random-weight Qwen2-VL", use_lora=False, max_new_tokens=sizes.max_new_tokens, image_size=sizes.image_px,
        constrained_json=False))  # throughput of free generation: min_new_tokens = max, no grammar
    rows = []
    for batch_size in sizes.generation_batches:
        images = [random_image(i, sizes.image_px) for i in range(batch_size)]
        prompts = generator.prompt_texts([TITLES[i % len(TITLES)] for i in range(batch_size)])

        generation_round(generator, images, prompts, sizes.max_new_tokens, device)  # warm-up
        prepare = decode = 0.0
        tokens = prompt_tokens = 0
        for _ in range(sizes.generation_repeats):
            p, d, t, prompt_tokens = generation_round(generator, images, prompts, sizes.max_new_tokens, device)
            prepare, decode, tokens = prepare + p, decode + d, tokens + t
        total = prepare + decode
        listings = batch_size * sizes.generation_repeats
        rows.append({
            "batch": batch_size, "listings_timed": listings, "prompt_tokens": prompt_tokens,
            "new_tokens_per_listing": tokens / listings, "seconds": total, "input_prep_seconds": prepare,
            "listings_per_s": listings / total, "new_tokens_per_s": tokens / total,
        })
        print(f"  generation batch {batch_size}: {listings / total:.2f} listings/s, {tokens / total:.0f} new tokens/s", flush=True)
    return {"rows": rows, "max_new_tokens": sizes.max_new_tokens, "image_px": sizes.image_px}


def bench_vlm2vec_training(model, processor, sizes: Sizes, device: torch.device, pairs: int) -> dict:
    """Training samples/s of the VLM2Vec encoder (LoRA on q/k/v/o, bf16 autocast on CUDA) and peak memory."""
    from afmrl_dagster.encoders.vlm2vec import VLM2VecConfig, VLM2VecEncoder
    from afmrl_dagster.vlm.lora import add_lora

    config = VLM2VecConfig(model="random-weight Qwen2-VL", image_size=sizes.image_px)
    backbone = model.model
    lora_model = add_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_target_modules, config.seed)
    try:
        return _train_steps(VLM2VecEncoder(lora_model, backbone, processor, config).to(device).train(), sizes, device, pairs)
    finally:
        lora_model.unload()  # the base model without adapters again, for a retry at a smaller batch


def _train_steps(encoder, sizes: Sizes, device: torch.device, pairs: int) -> dict:
    from afmrl_dagster.encoders.listing_encoder import ListingInputs
    from afmrl_dagster.training.agcl import AGCLConfig, AGCLLoss
    from afmrl_dagster.training.bm25 import BM25Scorer
    from afmrl_dagster.training.encoder_training import encoder_batch_loss, make_optimizer

    trainable = [p for p in encoder.parameters() if p.requires_grad]
    n = 2 * pairs
    titles = [f"{TITLES[i % pairs % len(TITLES)]} {i % pairs}" + (" new" if i >= pairs else "") for i in range(n)]
    attributes = [ATTRIBUTES[i % pairs % len(ATTRIBUTES)] for i in range(n)]
    images = [random_image(i % pairs, sizes.image_px) for i in range(n)]
    inputs = ListingInputs([f"l{i}" for i in range(n)], titles, attributes, images=images)
    scorer = BM25Scorer(["; ".join(f"{k}: {v}" for k, v in a.items()) for a in attributes])
    anchors, positives = np.arange(pairs), np.arange(pairs, n)
    codes = np.concatenate([np.arange(pairs), np.arange(pairs)])
    loss_fn = AGCLLoss(AGCLConfig())
    optimizer = make_optimizer(encoder, 1e-4, 0.01)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    tokens = int(encoder.tokenize(images, inputs.texts())["attention_mask"].sum())

    def step():
        out = encoder_batch_loss(encoder, loss_fn, inputs, anchors, positives, codes, scorer, autocast)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out["loss"].detach())

    for _ in range(sizes.train_warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, losses = timed(lambda: [step() for _ in range(sizes.train_steps)], device)
    prepare, _ = timed(lambda: encoder.tokenize(images, inputs.texts()), device)
    result = {
        "pairs_per_step": pairs, "sequences_per_step": n, "tokens_per_step": tokens, "steps_timed": sizes.train_steps,
        "seconds_per_step": seconds / sizes.train_steps, "pairs_per_s": pairs * sizes.train_steps / seconds,
        "samples_per_s": n * sizes.train_steps / seconds, "input_prep_seconds_per_step": prepare,
        "trainable_parameters": sum(p.numel() for p in trainable), "losses": losses,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    print(f"  VLM2Vec training: {result['samples_per_s']:.1f} listings/s ({pairs} pairs a step, "
          f"{result['seconds_per_step']:.2f} s a step)", flush=True)
    return result


@dataclass
class HeadStep:
    """One AGCL optimizer step of the head on batch ``number`` (of pairs ``(2i, 2i + 1)``), as the training loop takes it."""

    encoder: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trainable: list
    loss_fn: object
    inputs: object
    codes: np.ndarray
    scorer: object
    autocast: torch.dtype | None
    batches: list

    def __call__(self, number: int) -> None:
        from afmrl_dagster.training.encoder_training import encoder_batch_loss

        anchors = self.batches[number % len(self.batches)]
        out = encoder_batch_loss(self.encoder, self.loss_fn, self.inputs, anchors, anchors + 1, self.codes, self.scorer, self.autocast)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, steps: int) -> None:
        for number in range(steps):
            self(number)


def bench_head(sizes: Sizes, device: torch.device) -> dict:
    """The dual-tower head's AGCL step (features cached, as the pipeline trains it) on ``device`` vs the CPU."""
    from afmrl_dagster.encoders.dual_tower import DualTowerConfig, DualTowerHead, ListingFeatures
    from afmrl_dagster.encoders.listing_encoder import FrozenTowerEncoder, ListingInputs
    from afmrl_dagster.training.agcl import AGCLConfig, AGCLLoss
    from afmrl_dagster.training.bm25 import BM25Scorer
    from afmrl_dagster.training.encoder_training import make_optimizer

    config = DualTowerConfig()
    rng = np.random.default_rng(0)
    n = sizes.head_listings
    features = ListingFeatures([f"l{i}" for i in range(n)], rng.standard_normal((n, config.image_dim), dtype=np.float32),
                               rng.random(n) < 0.9, rng.standard_normal((n, config.text_dim), dtype=np.float32))
    inputs = ListingInputs(features.listing_ids, [""] * n, features=features)
    keys = sorted({k for a in ATTRIBUTES for k in a})
    attribute_texts = [f"{keys[i % len(keys)]}: v{i % 97}; {keys[(i // 7) % len(keys)]}: w{i % 31}" for i in range(n)]
    scorer = BM25Scorer(attribute_texts)
    codes = np.arange(n) // 2
    loss_fn = AGCLLoss(AGCLConfig())
    rows = []
    for batch_size in sizes.head_batches:
        per_device = {}
        targets = [(device, sizes.head_steps_gpu)] if device.type == "cuda" else []
        for target, steps in targets + [(torch.device("cpu"), sizes.head_steps_cpu)]:
            torch.manual_seed(0)
            encoder = FrozenTowerEncoder(DualTowerHead(config)).to(target).train()
            optimizer = make_optimizer(encoder, 1e-3, 0.01)
            trainable = [p for p in encoder.parameters() if p.requires_grad]
            autocast = torch.bfloat16 if target.type == "cuda" else None
            batches = [(2 * rng.choice(n // 2, batch_size, replace=False)) for _ in range(8)]
            step = HeadStep(encoder, optimizer, trainable, loss_fn, inputs, codes, scorer, autocast, batches)
            for number in range(3):
                step(number)
            seconds, _ = timed(partial(step.run, steps), target)
            per_device[target.type] = {"steps": steps, "ms_per_step": 1000 * seconds / steps, "pairs_per_s": batch_size * steps / seconds}
        row = {"batch": batch_size, **{f"{kind}": values for kind, values in per_device.items()}}
        if device.type == "cuda":
            row["speedup"] = per_device["cpu"]["ms_per_step"] / per_device["cuda"]["ms_per_step"]
        rows.append(row)
        print(f"  head step batch {batch_size}: " + ", ".join(f"{k} {v['ms_per_step']:.2f} ms" for k, v in per_device.items()), flush=True)
    return {"rows": rows, "embed_dim": config.embed_dim, "image_dim": config.image_dim, "text_dim": config.text_dim,
            "cpu_threads": torch.get_num_threads()}


def bench_search(sizes: Sizes, device: torch.device) -> dict:
    """Exact inner-product top-k over a random gallery: faiss-gpu when present, else torch on ``device``."""
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((sizes.gallery, sizes.search_dim), dtype=np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    query_rows = rng.choice(sizes.gallery, sizes.queries, replace=False)
    queries = gallery[query_rows]
    faiss_note = None
    try:
        import faiss  # noqa: PLC0415 - optional: absent on the GPU machine unless carried

        if device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            resources = faiss.StandardGpuResources()

            def build():
                index = faiss.GpuIndexFlatIP(resources, sizes.search_dim)
                index.add(gallery)
                return index

            build_seconds, index = timed(build, device)
            index.search(queries[:64], sizes.top_k)  # warm-up
            search_seconds, (_, found) = timed(lambda: index.search(queries, sizes.top_k), device)
            backend = f"faiss-gpu {faiss.__version__} GpuIndexFlatIP"
        elif device.type == "cuda":
            faiss_note = "faiss imports but has no GPU support on this machine"
        else:
            faiss_note = "no GPU in this run"
    except ImportError:
        faiss_note = "faiss-gpu was not available on this machine"
    if faiss_note is not None:
        def build():
            return torch.from_numpy(gallery).to(device)

        def search(matrix):
            hits = []
            for start in range(0, len(queries), 1024):
                block = torch.from_numpy(queries[start:start + 1024]).to(device)
                hits.append(torch.topk(block @ matrix.T, sizes.top_k, dim=1).indices)
            return torch.cat(hits).cpu().numpy()

        build_seconds, matrix = timed(build, device)
        search(matrix[:1024])  # warm-up
        search_seconds, found = timed(lambda: search(matrix), device)
        backend = f"torch matmul + topk on {device.type} (float32, exact)"
    return {"backend": backend, "note": faiss_note, "self_found_first": float(np.mean(np.asarray(found)[:, 0] == query_rows)),
            "gallery": sizes.gallery, "dim": sizes.search_dim, "queries": sizes.queries,
            "top_k": sizes.top_k, "build_seconds": build_seconds, "search_seconds": search_seconds,
            "queries_per_s": sizes.queries / search_seconds}


def environment(device: torch.device, smoke: bool) -> dict:
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    info = {"smoke": smoke, "device": device.type, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft_version, "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update({"gpu": properties.name, "gpu_memory_gib": round(properties.total_memory / 2**30, 1), "cuda": torch.version.cuda})
    return info


def run(sizes: Sizes, device: torch.device, smoke: bool) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results: dict = {"environment": environment(device, smoke), "model": {}, "errors": {}}
    started = time.perf_counter()
    print(f"building a random-weight Qwen2-VL ({'tiny' if smoke else '2B-sized'}) on {device} in {dtype}", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_seconds, (model, processor) = timed(lambda: build_qwen2_vl(sizes, device, dtype), device)
    results["model"] = {
        "parameters": sum(p.numel() for p in model.parameters()), "build_seconds": build_seconds, "dtype": str(dtype).removeprefix("torch."),
        "attention": getattr(model.config, "_attn_implementation", None), "processor": type(processor).__name__,
        "text_layers": sizes.text["num_hidden_layers"], "text_hidden": sizes.text["hidden_size"],
        "vision_depth": sizes.vision["depth"], "image_px": sizes.image_px,
    }
    sections = (
        ("generation", lambda: bench_generation(model, processor, sizes, device)),
        ("vlm2vec_training", lambda: train_with_fallback(model, processor, sizes, device)),
        ("head_step", lambda: bench_head(sizes, device)),
        ("search", lambda: bench_search(sizes, device)),
    )
    for name, measure in sections:
        print(f"{name} ...", flush=True)
        try:
            results[name] = measure()
        except Exception as error:  # one section failing must not lose the others' figures
            results["errors"][name] = f"{type(error).__name__}: {error}"
            print(f"  {name} failed: {results['errors'][name]}", file=sys.stderr, flush=True)
        if name == "vlm2vec_training":
            model = processor = None  # the head and search sections need neither
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["total_seconds"] = time.perf_counter() - started
    return results


def train_with_fallback(model, processor, sizes: Sizes, device: torch.device) -> dict:
    """The VLM2Vec step at ``sizes.train_pairs`` pairs, halving the batch on running out of GPU memory."""
    pairs = sizes.train_pairs
    while True:
        try:
            return bench_vlm2vec_training(model, processor, sizes, device, pairs)
        except torch.cuda.OutOfMemoryError:
            if pairs <= 2:
                raise
            print(f"  out of GPU memory at {pairs} pairs a step; trying {pairs // 2}", flush=True)
            pairs //= 2
            gc.collect()
            torch.cuda.empty_cache()


def _speedup(row: dict) -> str:
    return f"{row['speedup']:.1f}x" if "speedup" in row else "n/a"


def _number(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def render(results: dict) -> str:
    """The markdown of a run's JSON: one paragraph naming the machine, then one table per section."""
    env, model = results["environment"], results.get("model", {})
    shape = "a tiny" if env.get("smoke") else "Qwen2-VL-2B-Instruct's"
    where = f"{env.get('gpu', 'CPU')}" + (f" ({env['gpu_memory_gib']} GiB, CUDA {env['cuda']})" if env.get("gpu") else "")
    lines = [
        f"{'**Smoke run (tiny sizes, not a measurement).** ' if env.get('smoke') else ''}"
        f"`benchmarks/gpu.py` on {where}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
        f"Python {env['python']}. Model: Qwen2-VL of {shape} shape with random weights "
        f"({_number(model.get('parameters', 0) / 1e9, 2)} B parameters, {model.get('dtype')}, attention {model.get('attention')}, "
        f"inputs by {model.get('processor')}, images {model.get('image_px')} px); the tokenizer is the tiny test one, so texts "
        f"take more tokens than with Qwen's. Whole run {_number(results.get('total_seconds'), 0)} s.",
        "",
    ]
    generation = results.get("generation")
    if generation:
        lines += [
            f"Attribute generation (HFAttributeGenerator, greedy, exactly {generation['max_new_tokens']} new tokens a listing):",
            "",
            "| batch | listings timed | prompt tokens | listings / s | new tokens / s | of which input prep (CPU) |",
            "|---|---|---|---|---|---|",
        ]
        for row in generation["rows"]:
            share = row["input_prep_seconds"] / row["seconds"]
            lines.append(f"| {row['batch']} | {row['listings_timed']} | {row['prompt_tokens']} | {_number(row['listings_per_s'], 2)} "
                         f"| {_number(row['new_tokens_per_s'], 0)} | {share:.0%} |")
        lines.append("")
    training = results.get("vlm2vec_training")
    if training:
        lines += [
            "VLM2Vec encoder AGCL training step (LoRA r=8 on q/k/v/o, bf16 autocast, AdamW; "
            "one step = anchors + positives through the model, backward, clipping, optimizer step):",
            "",
            "| pairs a step | tokens a step | s / step | of which input prep (CPU) | listings / s | pairs / s | trainable parameters "
            "| peak GPU memory |",
            "|---|---|---|---|---|---|---|---|",
            f"| {training['pairs_per_step']} | {training['tokens_per_step']:,} | {_number(training['seconds_per_step'], 3)} "
            f"| {training['input_prep_seconds_per_step'] / training['seconds_per_step']:.0%} "
            f"| {_number(training['samples_per_s'])} | {_number(training['pairs_per_s'])} | {training['trainable_parameters'] / 1e6:.2f} M "
            f"| {_number(training['peak_gpu_memory_gib'])} GiB |",
            "",
        ]
    head = results.get("head_step")
    if head:
        lines += [
            f"Dual-tower head AGCL step (features cached; embed {head['embed_dim']}, image {head['image_dim']}, text {head['text_dim']}; "
            f"GPU in bf16 autocast, CPU in float32 on {head['cpu_threads']} threads, same process):",
            "",
            "| batch (pairs) | GPU ms / step | GPU pairs / s | CPU ms / step | CPU pairs / s | GPU speed-up |",
            "|---|---|---|---|---|---|",
        ]
        for row in head["rows"]:
            gpu, cpu = row.get("cuda"), row["cpu"]
            lines.append(f"| {row['batch']} | {_number(gpu and gpu['ms_per_step'], 2)} | {_number(gpu and gpu['pairs_per_s'], 0)} "
                         f"| {_number(cpu['ms_per_step'], 2)} | {_number(cpu['pairs_per_s'], 0)} | "
                         f"{_speedup(row)} |")
        lines.append("")
    search = results.get("search")
    if search:
        lines += [
            f"Exact top-{search['top_k']} search, {search['gallery']:,} × {search['dim']} gallery, {search['queries']:,} queries: "
            f"{search['backend']}" + (f" ({search['note']})" if search.get("note") else "") + ":",
            "",
            "| build s | search s | queries / s | query found itself first |",
            "|---|---|---|---|",
            f"| {_number(search['build_seconds'], 3)} | {_number(search['search_seconds'], 3)} | {_number(search['queries_per_s'], 0)} "
            f"| {search['self_found_first']:.0%} |",
            "",
        ]
    for name, error in results.get("errors", {}).items():
        lines.append(f"- {name} failed: `{error}`")
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for gpu_benchmark.json and gpu_benchmark.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds, CPU is fine): checks the script, measures nothing")
    parser.add_argument("--device", default=None, help="default: cuda when available (a full run needs it), else cpu with --smoke")
    parser.add_argument("--from-json", help="render this run's JSON instead of running (with --write-results)")
    parser.add_argument("--write-results", help="docs/results.md: write the table into its gpu-benchmark block")
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    else:
        if not args.out:
            parser.error("--out DIR is required (or --from-json FILE)")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type != "cuda" and not args.smoke:
            parser.error(f"a full run needs a CUDA device (got {device}); use --smoke to check the script on CPU")
        results = run(SMOKE if args.smoke else FULL, device, args.smoke)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / JSON_FILE).write_text(json.dumps(results, indent=2))
        (out / MARKDOWN_FILE).write_text(render(results) + "\n")
        print(f"wrote {out / JSON_FILE} and {out / MARKDOWN_FILE}")
    status = publish_result(render(results), args.write_results, RESULTS_BLOCK)
    return status or (2 if results.get("errors") else 0)


if __name__ == "__main__":
    sys.exit(main())
