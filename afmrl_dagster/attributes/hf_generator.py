"""An attribute generator over a Hugging Face image-text-to-text model (Qwen2-VL / Qwen2.5-VL,
LLaVA, Idefics3 / SmolVLM families), by hub id or local folder, optionally with LoRA.

Prompts are the versioned student prompt; batches are padded on the left so that every row's
prompt ends where generation starts. Sampled completions are scored again with one forward
pass over prompt + completion (:meth:`HFAttributeGenerator.completion_log_probs`), which is
what distillation and GRPO need; their training steps are in
:mod:`afmrl_dagster.training.hf_generator_training`. On machines without torchvision the
Qwen-VL processors cannot be built; the project's own processor (see
:mod:`afmrl_dagster.vlm.processors`) takes over.

With ``HFGeneratorConfig.constrained_json`` (the default) generation is grammar-constrained
(:mod:`.json_constraint`): every completion, greedy or sampled, parses as an attribute object.
Scoring (:meth:`HFAttributeGenerator.completion_log_probs`) is not: the log-probabilities that
SFT trains and GRPO scores and steps on are the model's own, over the whole vocabulary, while
the samples GRPO rewards came from the constrained distribution.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import PIL.Image
import torch

from ..vlm.lora import add_lora
from ..vlm.processors import QWEN_VL_TYPES, build_processor
from .prompts import STUDENT_PROMPT, PromptTemplate

ADAPTER_NAME = "default"  # peft's name of the adapter being trained and saved
REFERENCE_ADAPTER = "reference"  # a frozen copy of the SFT adapter during GRPO


@dataclass(frozen=True)
class HFGeneratorConfig:
    model: str  # hub id or local folder
    use_lora: bool = True
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    max_prompt_tokens: int = 256  # the listing text is cut to this; image tokens never are
    max_new_tokens: int = 96
    image_size: int | None = 448  # images are resized to a square of this side; None keeps them
    dtype: str = "auto"  # "auto": bf16 on CUDA, float32 on CPU
    seed: int = 0
    # Grammar-constrained decoding (:mod:`.json_constraint`): every completion is a JSON object of
    # 1..16 non-empty string pairs of at most 64 characters, closed and ended within max_new_tokens
    # (which must then be at least 10). False lets the model write whatever it likes.
    constrained_json: bool = True

    def torch_dtype(self, device: str | torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]


class HFAttributeGenerator:
    """Writes attribute JSON for listings with a Hugging Face VLM (``generate`` / ``completion_log_probs``)."""

    def __init__(self, model, inputs, config: HFGeneratorConfig, prompt: PromptTemplate = STUDENT_PROMPT):
        self.model, self.inputs, self.config, self.prompt = model, inputs, config, prompt
        self.tokenizer = inputs.tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def from_pretrained(cls, config: HFGeneratorConfig, device: str = "cpu", prompt: PromptTemplate = STUDENT_PROMPT,
                        adapter: str | Path | None = None, trainable: bool = False) -> HFAttributeGenerator:
        """The base model ``config.model`` with fresh LoRA adapters (``config.use_lora``), or with
        the adapter saved in ``adapter`` (:meth:`save_adapter`; ``trainable``: it may be trained on)."""
        from transformers import AutoConfig, AutoModelForImageTextToText

        hf_config = AutoConfig.from_pretrained(config.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the Qwen processor fallback says so in the log as well
            inputs = build_processor(config.model, hf_config)
        model = AutoModelForImageTextToText.from_pretrained(config.model, dtype=config.torch_dtype(device))
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter), adapter_name=ADAPTER_NAME, is_trainable=trainable)
        elif config.use_lora:
            model = add_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_target_modules, config.seed)
        return cls(model.to(device).eval(), inputs, config, prompt)

    def save_adapter(self, directory: str | Path) -> None:
        """Write the trained LoRA adapter (``adapter_model.safetensors`` + ``adapter_config.json``)
        into ``directory``; the base weights are not written."""
        if not hasattr(self.model, "peft_config"):
            raise ValueError("this generator has no LoRA adapter to save (it was loaded with use_lora=False)")
        self.model.save_pretrained(str(directory), selected_adapters=[ADAPTER_NAME])

    def add_reference_adapter(self, name: str = REFERENCE_ADAPTER) -> str:
        """A frozen copy of the current adapter beside it (GRPO's KL anchor: the SFT state);
        only the trained adapter is saved (:meth:`save_adapter`)."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        if not hasattr(self.model, "peft_config"):
            raise ValueError("this generator has no LoRA adapter to copy (it was loaded with use_lora=False)")
        state = get_peft_model_state_dict(self.model, adapter_name=ADAPTER_NAME)
        self.model.add_adapter(name, self.model.peft_config[ADAPTER_NAME])
        set_peft_model_state_dict(self.model, state, adapter_name=name)
        self.model.set_adapter(ADAPTER_NAME)
        for parameter_name, parameter in self.model.named_parameters():
            if f".{name}." in parameter_name:
                parameter.requires_grad_(False)
        return name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [parameter for parameter in self.model.parameters() if parameter.requires_grad]

    def prompt_texts(self, titles: Sequence[str], descriptions: Sequence[str | None] | None = None, keys=None) -> list[str]:
        descriptions = descriptions if descriptions is not None else [None] * len(titles)
        return [self.prompt.render(title, description, keys) for title, description in zip(titles, descriptions)]

    def _images(self, images: Sequence[PIL.Image.Image | None]) -> list[PIL.Image.Image | None]:
        size = self.config.image_size
        return [None if image is None else (image.convert("RGB").resize((size, size)) if size else image.convert("RGB"))
                for image in images]

    def encode_prompts(self, images: Sequence[PIL.Image.Image | None], prompts: Sequence[str],
                       systems: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Left-padded model inputs of (image or ``None``, prompt) pairs, on the model's device;
        each row starts with its system text (default: the prompt template's)."""
        if len(images) != len(prompts) or not prompts:
            raise ValueError(f"need one image (or None) per prompt and at least one; got {len(images)} and {len(prompts)}")
        systems = [self.prompt.system] * len(prompts) if systems is None else list(systems)
        if len(systems) != len(prompts):
            raise ValueError(f"{len(systems)} system texts for {len(prompts)} prompts")
        self.inputs.padding_side = "left"
        batch = self.inputs(self._images(images), [f"{system}\n" for system in systems], list(prompts),
                            self.config.max_prompt_tokens, None)
        dtype = next(self.model.parameters()).dtype
        return {key: value.to(self.device, dtype=dtype if value.is_floating_point() else None) for key, value in batch.items()}

    @torch.no_grad()
    def generate_ids(self, batch: dict[str, torch.Tensor], num_samples: int = 1, do_sample: bool = False,
                     temperature: float = 1.0, max_new_tokens: int | None = None,
                     min_new_tokens: int | None = None, constrained: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Completion ids ``[B * num_samples, T]`` (rows of one prompt together) and their mask
        (real tokens up to and including the first eos). ``min_new_tokens`` forbids eos before
        that many tokens (a throughput benchmark on random weights sets it to the maximum; it
        needs ``constrained=False``). ``constrained`` (default ``config.constrained_json``):
        every row is an attribute JSON object followed by eos (:mod:`.json_constraint`)."""
        max_new_tokens = max_new_tokens or self.config.max_new_tokens
        constrained = self.config.constrained_json if constrained is None else constrained
        processors = []
        if constrained:
            from .json_constraint import JSONConstraintError, JSONObjectLogitsProcessor  # imports transformers: loaded on use

            if min_new_tokens:
                raise JSONConstraintError("min_new_tokens forbids the end of a closed JSON object; generate with constrained=False")
            processors.append(JSONObjectLogitsProcessor(self.tokenizer, batch["input_ids"].shape[1], max_new_tokens))
        output = self.model.generate(
            **batch, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
            temperature=temperature if do_sample else None, top_p=None, top_k=None,
            num_return_sequences=num_samples, pad_token_id=self.tokenizer.pad_token_id,
            logits_processor=processors or None,
        )
        completion = output[:, batch["input_ids"].shape[1]:]
        eos = self.tokenizer.eos_token_id
        is_eos = completion == eos if eos is not None else torch.zeros_like(completion, dtype=torch.bool)
        ended_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first eos
        mask = ~ended_before
        return completion.masked_fill(~mask, self.tokenizer.pad_token_id), mask

    def decode(self, completion: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(row[row_mask], skip_special_tokens=True).strip() for row, row_mask in zip(completion, mask)]

    def generate(self, images: Sequence[PIL.Image.Image | None], prompts: Sequence[str], batch_size: int = 8,
                 systems: Sequence[str] | None = None, **sampling) -> list[str]:
        """One raw attribute text per (image, prompt), greedy unless ``do_sample=True``."""
        texts: list[str] = []
        for start in range(0, len(prompts), batch_size):
            batch = self.encode_prompts(images[start:start + batch_size], prompts[start:start + batch_size],
                                        None if systems is None else systems[start:start + batch_size])
            texts.extend(self.decode(*self.generate_ids(batch, **sampling)))
        return texts

    def completion_log_probs(self, batch: dict[str, torch.Tensor], completion: torch.Tensor, mask: torch.Tensor,
                             temperature: float = 1.0, model=None) -> torch.Tensor:
        """Log-probabilities ``[R, T]`` of each completion token given its prompt (``batch`` rows
        repeated to R); 0 where ``mask`` is off. ``model`` defaults to this generator's."""
        model = model or self.model
        config = getattr(model, "module", model).config  # through DDP's wrapper when training on several ranks
        prompt_length = batch["input_ids"].shape[1]
        full = dict(batch)
        full["input_ids"] = torch.cat([batch["input_ids"], completion], dim=1)
        full["attention_mask"] = torch.cat([batch["attention_mask"], mask.to(batch["attention_mask"].dtype)], dim=1)
        if "mm_token_type_ids" in batch:
            full["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)
        if getattr(config, "model_type", "") not in QWEN_VL_TYPES:
            # As generation numbers them: left padding takes no positions (Qwen-VL derives its own).
            full["position_ids"] = (full["attention_mask"].long().cumsum(dim=1) - 1).clamp(min=0)
        logits = model(**full, use_cache=False).logits[:, prompt_length - 1:-1].float() / temperature
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        return log_probs * mask

