"""A tiny Qwen2-VL that already writes attribute JSON, for the pipeline run with an hf-vlm
teacher and student.

A random-weight tiny model writes noise, which the teacher's blocking parse-rate check rightly
stops. Real teachers and students are instruction-tuned models that answer JSON; the tiny
stand-in is made one by fine-tuning every weight of the random model, briefly, on the built-in
catalog's listings (photo, title, description) with their seller attributes as the answer,
under both the teacher and the student prompt. It is then saved like a hub checkpoint.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from afmrl_dagster.attributes.hf_generator import HFAttributeGenerator, HFGeneratorConfig
from afmrl_dagster.attributes.prompts import STUDENT_PROMPT, TEACHER_PROMPT
from afmrl_dagster.attributes.teacher import SellerAttributeTeacher
from afmrl_dagster.catalog.source import list_product_lines, load_product_line
from afmrl_dagster.training.hf_generator_training import hf_sft_step
from afmrl_dagster.vlm.tiny_models import build_tiny_qwen2_vl

IMAGE_SIZE = 16  # the tiny Qwen2-VL's processor turns a 16x16 photo into 4 image tokens


def catalog_examples(catalog_spec: str) -> list[tuple[PIL.Image.Image, str, str | None, str]]:
    """(photo, title, description, seller-attribute JSON) of every listing of the catalog."""
    examples = []
    for line in list_product_lines(catalog_spec):
        batch = load_product_line(catalog_spec, line)
        answers = SellerAttributeTeacher().annotate(batch.listings)
        for row, answer in zip(batch.listings.to_dicts(), answers):
            image = PIL.Image.open(io.BytesIO(batch.images[row["listing_id"]])).convert("RGB")
            examples.append((image, row["title"] or "", row.get("description"), answer))
    return examples


def build_tiny_attribute_writer(directory: Path, catalog_spec: str, steps: int = 120, seed: int = 0) -> Path:
    """A tiny Qwen2-VL fine-tuned to answer the catalog's listings with attribute JSON (both prompts)."""
    base = build_tiny_qwen2_vl(Path(directory).with_name(Path(directory).name + "-random"), seed=seed)
    examples = catalog_examples(catalog_spec)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    writers = [HFAttributeGenerator.from_pretrained(HFGeneratorConfig(model=str(base), use_lora=False, image_size=IMAGE_SIZE), prompt=prompt)
               for prompt in (TEACHER_PROMPT, STUDENT_PROMPT)]
    writers[1].model = writers[0].model  # one model, two prompts
    optimizer = torch.optim.AdamW(writers[0].trainable_parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        writer = writers[step % 2]
        rows = rng.choice(len(examples), size=min(8, len(examples)), replace=False)
        chosen = [examples[i] for i in rows]
        hf_sft_step(writer, optimizer, [e[0] for e in chosen], writer.prompt_texts([e[1] for e in chosen], [e[2] for e in chosen]),
                    [e[3] for e in chosen])
    target = Path(directory)
    writers[0].model.save_pretrained(target)
    for item in base.iterdir():
        if item.name not in ("config.json", "generation_config.json") and not item.name.endswith(".safetensors"):
            shutil.copy(item, target / item.name)
    return target
