"""The student generator's kinds, in one place: ``compact`` (the small decoder over frozen-tower
features, :mod:`afmrl_dagster.attributes.generator`) and ``hf-vlm:<hub id or folder>`` (a
Hugging Face VLM with LoRA, :mod:`afmrl_dagster.attributes.hf_generator`).

Each kind is a *writer* class with the same surface: ``distill`` (SFT from the teacher's
attributes), ``write`` (attribute texts for listings, greedy), ``refine`` (RAR: GRPO against a
reward), ``save`` and ``load``. :data:`WRITERS` maps a kind to its class; a saved folder names
its kind in ``generator.json`` (compact folders written before that file existed hold
``vocabulary.json`` and load as compact), so :func:`load_writer` and
:func:`load_stored_writer` open either. An ``hf-vlm`` folder holds only the LoRA adapter
(``adapter/``) and ``generator.json`` naming the base model (hub id or folder) and the
generation settings: the base weights are referenced, never copied.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..attributes.format import attributes_to_json, parse_attributes
from ..attributes.generator import (AttributeGenerator, generate_attribute_texts, load_generator,
                                    save_generator)
from ..attributes.hf_generator import ADAPTER_NAME, REFERENCE_ADAPTER, HFAttributeGenerator, HFGeneratorConfig
from ..attributes.hf_teacher import HF_VLM_PREFIX
from ..attributes.vocabulary import AttributeVocabulary
from ..encoders.listing_encoder import ListingInputs
from ..local_files import write_folder_atomically
from .checkpoints import LoopCheckpoint
from .optimizers import adamw
from .grpo import GRPOConfig, _query_stream, train_grpo
from .distributed import distributed_world, wrap_for_ranks
from .hf_generator_training import hf_grpo_step, hf_sft_step, target_ids

GENERATOR_FILE = "generator.json"
ADAPTER_FOLDER = "adapter"
DEFAULT_GENERATOR_KIND = "compact"


class GeneratorFolderError(ValueError):
    """A generator folder cannot be loaded; the message names the folder and what is wrong."""


def parse_generator_spec(spec: str) -> tuple[str, str | None]:
    """``'compact'`` -> ``('compact', None)``; ``'hf-vlm:<id or folder>'`` -> ``('hf-vlm', '<id or folder>')``."""
    spec = (spec or "").strip()
    if spec == "compact":
        return "compact", None
    if spec.startswith(HF_VLM_PREFIX) and spec[len(HF_VLM_PREFIX):].strip():
        return "hf-vlm", spec[len(HF_VLM_PREFIX):].strip()
    raise ValueError(f"generator must be 'compact' or 'hf-vlm:<hub id or local folder>', got {spec!r}")


# ---- what a writer reads ---------------------------------------------------------------------------


def listing_inputs(catalog, features_table, listing_ids: Sequence[str], read_image: Callable[[str], bytes] | None = None) -> ListingInputs:
    """The :class:`ListingInputs` of ``listing_ids`` from the catalog frame and the listing-features table."""
    from ..features import align, listing_features

    rows = align(catalog, list(listing_ids))
    descriptions = rows["description"].to_list() if "description" in rows.columns else [None] * rows.height
    uris = rows["image_uri"].to_list() if "image_uri" in rows.columns else [None] * rows.height
    features = listing_features(features_table, list(listing_ids)) if features_table is not None else None
    return ListingInputs(list(listing_ids), [title or "" for title in rows["title"].to_list()], image_uris=uris, read_bytes=read_image,
                         features=features, descriptions=descriptions)


# ---- settings --------------------------------------------------------------------------------------


@dataclass
class CompactSFTSettings:
    """The compact student's size and SFT schedule (``DistillationSettings`` of attribute_stages)."""

    d_model: int
    n_layers: int
    constrained_decoding: bool
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int


@dataclass
class HFDistillationSettings:
    """LoRA SFT of the hf-vlm student; the pipeline's defaults (``AttributeGeneratorConfig`` reads them)."""

    hf_epochs: int = 3
    hf_batch_size: int = 4
    hf_learning_rate: float = 2e-4
    lora_rank: int = 8
    lora_alpha: int = 16
    hf_max_new_tokens: int = 96
    hf_image_size: int = 448


@dataclass
class HFRARSettings:
    """GRPO of the hf-vlm student beyond :class:`GRPOConfig` (``RARConfig`` reads it)."""

    hf_learning_rate: float = 1e-5


@dataclass
class RAROutcome:
    """What RAR returns whatever the kind: the refined writer, the SFT writer it started from
    (the KL anchor, unchanged), the per-step history and which weights changed."""

    policy: object
    reference: object
    history: list[dict]
    weights: dict


# ---- the compact kind --------------------------------------------------------------------------------


class CompactWriter:
    """The small decoder over frozen-tower features; its vocabulary closes the keys."""

    kind = "compact"

    def __init__(self, model: AttributeGenerator, vocabulary: AttributeVocabulary, towers: dict | None = None):
        self.model, self.vocabulary = model, vocabulary
        self.towers = towers  # {"image_tower", "text_tower"} whose features it reads, when its folder says (towers.json)

    @property
    def keys(self) -> set[str]:
        return set(self.vocabulary.keys)

    @property
    def parse_keys(self) -> set[str]:
        """Keys outside these make an output invalid."""
        return set(self.vocabulary.keys)

    def describe(self) -> dict:
        return {"kind": self.kind, "vocabulary_size": len(self.vocabulary)}

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def write(self, inputs: ListingInputs, greedy: bool = True) -> list[str]:
        if inputs.features is None:
            raise ValueError("the compact generator reads the towers' features: the listing inputs carry none")
        features = inputs.features
        return generate_attribute_texts(self.model, self.vocabulary, features.image, features.image_mask, features.text, greedy=greedy)

    def save(self, folder: str | Path, extra_json: dict[str, dict] | None = None) -> None:
        save_generator(self.model, self.vocabulary, folder, extra_json={**(extra_json or {}), GENERATOR_FILE: {"kind": self.kind}})

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu", trainable: bool = False) -> CompactWriter:
        towers = Path(folder) / "towers.json"
        return cls(*load_generator(folder, device=device), json.loads(towers.read_text()) if towers.is_file() else None)

    @classmethod
    def distill(cls, model: str | None, inputs: ListingInputs, targets: Sequence[dict], compact: CompactSFTSettings,
                hf: HFDistillationSettings, device: str, on_epoch: Callable[[dict], None] | None = None,
                checkpoint: LoopCheckpoint | None = None) -> tuple[CompactWriter, list[dict]]:
        from .attribute_stages import DistillationSettings, distill_generator

        settings = DistillationSettings(**dataclasses.asdict(compact), device=device)
        generator, vocabulary, history = distill_generator(inputs.features, list(targets), settings, on_epoch=on_epoch, checkpoint=checkpoint)
        return cls(generator, vocabulary), history

    def refine(self, queries: ListingInputs, reward, config: GRPOConfig, hf: HFRARSettings,
               on_step: Callable[[dict], None] | None = None, checkpoint: LoopCheckpoint | None = None) -> RAROutcome:
        """GRPO on a copy of this generator (every weight trains); this one stays the reference."""
        policy = copy.deepcopy(self.model)
        features = queries.features
        history = train_grpo(policy, self.model, self.vocabulary, features.image, features.image_mask, features.text, reward, config,
                             on_step=on_step, checkpoint=checkpoint)
        return RAROutcome(CompactWriter(policy, self.vocabulary), self, history, {"trained": "every weight of the compact decoder"})


# ---- the hf-vlm kind ------------------------------------------------------------------------------------


def _weight_fingerprint(tensor: torch.Tensor) -> tuple[float, float]:
    values = tensor.detach().double()
    return float(values.sum()), float((values * values).sum())


class HFVLMWriter:
    """A Hugging Face VLM with a LoRA adapter, prompted with the student prompt and the photo.

    ``adapter`` names the peft adapter it writes with: the trained one, or the frozen SFT copy
    kept beside it during RAR (:class:`RAROutcome` ``reference``)."""

    kind = "hf-vlm"

    def __init__(self, generator: HFAttributeGenerator, keys: Sequence[str] | None = None, batch_size: int = 8,
                 adapter: str = ADAPTER_NAME):
        self.generator, self.batch_size, self.adapter = generator, batch_size, adapter
        self._keys = sorted(keys) if keys is not None else None

    @property
    def base(self) -> str:
        return self.generator.config.model

    @property
    def keys(self) -> set[str] | None:
        """The keys of the teacher's attributes it was distilled from (the vocabulary check's)."""
        return set(self._keys) if self._keys is not None else None

    @property
    def parse_keys(self) -> None:
        return None  # any key parses: the vocabulary is a warning, not a rule, for a free-text model

    def describe(self) -> dict:
        return {"kind": self.kind, "base_model": self.base}

    @property
    def module(self) -> torch.nn.Module:
        return self.generator.model

    def prompts(self, inputs: ListingInputs) -> list[str]:
        return self.generator.prompt_texts(inputs.titles, inputs.descriptions)

    def write(self, inputs: ListingInputs, greedy: bool = True) -> list[str]:
        model = self.generator.model
        active = model.active_adapter if hasattr(model, "active_adapter") else None
        texts: list[str] = []
        try:
            if active is not None and active != self.adapter:
                model.set_adapter(self.adapter)
            for start in range(0, len(inputs), self.batch_size):
                part = inputs.subset(range(start, min(start + self.batch_size, len(inputs))))
                texts.extend(self.generator.generate(part.load_images(), self.prompts(part), batch_size=self.batch_size, do_sample=not greedy))
        finally:
            if active is not None and model.active_adapter != active:
                model.set_adapter(active)
        return texts

    def save(self, folder: str | Path, extra_json: dict[str, dict] | None = None) -> None:
        """``adapter/`` (the LoRA weights) and ``generator.json`` (kind, base model, settings,
        keys), written atomically; the base weights stay where ``base_model`` names them."""
        config = dataclasses.asdict(self.generator.config)
        config["lora_target_modules"] = list(config["lora_target_modules"])
        description = {"kind": self.kind, "base_model": self.base, "config": config, "keys": self._keys,
                       "prompt": self.generator.prompt.id, "batch_size": self.batch_size}

        def fill(staging: Path) -> None:
            self.generator.save_adapter(staging / ADAPTER_FOLDER)
            (staging / GENERATOR_FILE).write_text(json.dumps(description, indent=2))
            for name, content in (extra_json or {}).items():
                (staging / name).write_text(json.dumps(content, indent=2))

        write_folder_atomically(folder, fill)

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu", trainable: bool = False) -> HFVLMWriter:
        folder = Path(folder)
        description = _read_description(folder)
        for name in ("base_model", "config"):
            if name not in description:
                raise GeneratorFolderError(f"{folder / GENERATOR_FILE}: field {name!r} is missing")
        if not (folder / ADAPTER_FOLDER / "adapter_config.json").exists():
            raise GeneratorFolderError(f"{folder}: no {ADAPTER_FOLDER}/adapter_config.json (the LoRA adapter)")
        fields = {field.name for field in dataclasses.fields(HFGeneratorConfig)}
        config_values = {key: value for key, value in description["config"].items() if key in fields}
        config_values["model"] = description["base_model"]
        config_values["lora_target_modules"] = tuple(config_values.get("lora_target_modules", ()))
        config = HFGeneratorConfig(**config_values)
        generator = HFAttributeGenerator.from_pretrained(config, device=device, adapter=folder / ADAPTER_FOLDER, trainable=trainable)
        return cls(generator, description.get("keys"), batch_size=int(description.get("batch_size", 8)))

    @classmethod
    def distill(cls, model: str | None, inputs: ListingInputs, targets: Sequence[dict], compact: CompactSFTSettings,
                hf: HFDistillationSettings, device: str, on_epoch: Callable[[dict], None] | None = None,
                checkpoint: LoopCheckpoint | None = None) -> tuple[HFVLMWriter, list[dict]]:
        """LoRA SFT of the base ``model`` on the teacher's attributes (canonical JSON texts),
        ``hf_epochs`` passes over the listings in seeded random order; one history row (mean
        loss) per epoch. With ``checkpoint`` the adapter and optimizer are saved per epoch and a
        killed run goes on from the epoch after the last one saved."""
        if not model:
            raise ValueError("the hf-vlm generator needs a base model: 'hf-vlm:<hub id or local folder>'")
        if len(targets) != len(inputs) or not targets:
            raise ValueError(f"need one target per listing and at least one; got {len(targets)} targets for {len(inputs)} listings")
        config = HFGeneratorConfig(model=model, lora_rank=hf.lora_rank, lora_alpha=hf.lora_alpha, max_new_tokens=hf.hf_max_new_tokens,
                                   image_size=hf.hf_image_size, seed=compact.seed)
        generator = HFAttributeGenerator.from_pretrained(config, device=device)
        optimizer = adamw(generator.trainable_parameters(), lr=hf.hf_learning_rate, weight_decay=0.0)
        texts = [attributes_to_json(target) for target in targets]
        rng = np.random.default_rng(compact.seed)
        history, done = [], 0
        if checkpoint is not None:
            done, history = checkpoint.resume(generator.model, optimizer, device=device)
            for _ in range(done):  # the orders of the epochs already trained
                rng.permutation(len(inputs))
        # Under torchrun: DDP over the adapter, each rank taking its share of every global batch.
        rank, world_size = distributed_world()
        ranks = wrap_for_ranks(generator.model, device, inputs_are_listings=False) if world_size > 1 else None
        for epoch in range(done, hf.hf_epochs):
            started, losses = time.perf_counter(), []
            order = rng.permutation(len(inputs))
            for start in range(0, len(order), hf.hf_batch_size):
                rows = order[start:start + hf.hf_batch_size].tolist()
                token_count, contributes = None, True
                if ranks is not None:
                    token_count = int(target_ids(generator, [texts[i] for i in rows])[1].sum())
                    mine = [rows[i] for i in np.array_split(np.arange(len(rows)), world_size)[rank]]
                    # A last batch smaller than the world: a rank without rows runs one row at weight 0 (DDP needs every rank's backward).
                    rows, contributes = (mine, True) if mine else (rows[:1], False)
                part = inputs.subset(rows)
                losses.append(hf_sft_step(generator, optimizer, part.load_images(), generator.prompt_texts(part.titles, part.descriptions),
                                          [texts[i] for i in rows], ranks=ranks, token_count=token_count, contributes=contributes))
            row = {"epoch": epoch, "loss": float(np.mean(losses)), "seconds": time.perf_counter() - started}
            history.append(row)
            if checkpoint is not None and rank == 0:  # one writer; every rank reads it back on resume
                checkpoint.save(epoch + 1, hf.hf_epochs, generator.model, optimizer, history, device=device)
            if on_epoch:
                on_epoch(row)
        keys = sorted({key for target in targets for key in target})
        return cls(generator, keys, batch_size=hf.hf_batch_size), history

    def refine(self, queries: ListingInputs, reward, config: GRPOConfig, hf: HFRARSettings,
               on_step: Callable[[dict], None] | None = None, checkpoint: LoopCheckpoint | None = None) -> RAROutcome:
        """GRPO on the LoRA adapter, in place: the base weights are frozen and the KL anchor is a
        frozen copy of the SFT adapter beside it. ``reward(query_indices, texts [Q][G]) -> [Q, G]``.
        With ``checkpoint`` the adapter and optimizer are saved every ``checkpoint.every`` steps and a
        killed run goes on from the step after the last one saved."""
        generator = self.generator
        model = generator.model
        generator.add_reference_adapter(REFERENCE_ADAPTER)
        trainable = dict((name, p) for name, p in model.named_parameters() if p.requires_grad)
        if not trainable or not all("lora_" in name for name in trainable):
            raise ValueError("RAR of an hf-vlm generator trains its LoRA adapter only; load it with trainable=True")
        adapter_before = {name: p.detach().clone() for name, p in trainable.items()}
        base_before = {name: _weight_fingerprint(p) for name, p in model.named_parameters() if "lora_" not in name}
        optimizer = adamw(list(trainable.values()), lr=hf.hf_learning_rate, weight_decay=0.0)
        per_step = min(config.queries_per_step, len(queries))
        stream = _query_stream(len(queries), per_step, np.random.default_rng(config.seed))
        history: list[dict] = []
        done = 0
        if checkpoint is not None:
            done, history = checkpoint.resume(model, optimizer, device=config.device)
            for _ in range(done):  # the queries of the steps already trained
                next(stream)
        for step in range(done, config.steps):
            indices = next(stream)
            part = queries.subset(indices)
            last: dict = {}

            def reward_fn(groups, indices=indices, last=last):
                last["rewards"] = np.asarray(reward(indices, groups), dtype=np.float64)
                return last["rewards"]

            record = hf_grpo_step(generator, optimizer, part.load_images(), self.prompts(part), reward_fn, config,
                                  sample_seed=config.seed + step, reference_adapter=REFERENCE_ADAPTER)
            groups = record.pop("samples")
            parsed = [parse_attributes(text) for group in groups for text in group]
            sizes = [len(p.attributes) for p in parsed if p.is_valid]
            record.update(step=step, mean_num_attributes=float(np.mean(sizes)) if sizes else 0.0,
                          samples=[(int(indices[q]), groups[q][0], float(last["rewards"][q, 0])) for q in range(min(4, len(groups)))])
            history.append(record)
            if checkpoint is not None:
                checkpoint.save(step + 1, config.steps, model, optimizer, history, device=config.device)
            if on_step:
                on_step(record)
        adapter_changed = sorted(name for name, p in trainable.items() if not torch.equal(p.detach(), adapter_before[name]))
        base_changed = sorted(name for name, p in model.named_parameters()
                              if "lora_" not in name and _weight_fingerprint(p) != base_before[name])
        weights = {"adapter_tensors": len(trainable), "adapter_tensors_changed": len(adapter_changed),
                   "base_tensors": len(base_before), "base_tensors_changed": len(base_changed)}
        if base_changed:
            raise RuntimeError(f"RAR changed base weights of {self.base}: {base_changed[:5]}")
        reference = HFVLMWriter(generator, self._keys, self.batch_size, adapter=REFERENCE_ADAPTER)
        return RAROutcome(self, reference, history, weights)


# ---- dispatch ------------------------------------------------------------------------------------------

WRITERS: dict[str, type] = {"compact": CompactWriter, "hf-vlm": HFVLMWriter}


def writer_class(kind: str) -> type:
    if kind not in WRITERS:
        raise ValueError(f"unknown generator kind {kind!r}; known: {', '.join(WRITERS)}")
    return WRITERS[kind]


def _read_description(folder: Path) -> dict:
    path = folder / GENERATOR_FILE
    try:
        description = json.loads(path.read_text())
    except ValueError as error:
        raise GeneratorFolderError(f"{path} is not JSON: {error}") from error
    if not isinstance(description, dict) or "kind" not in description:
        raise GeneratorFolderError(f"{path}: field 'kind' is missing")
    return description


def folder_kind(folder: str | Path) -> str:
    """The kind a saved generator folder holds: ``generator.json``'s ``kind``; compact when it
    has only ``vocabulary.json`` (written before kinds existed)."""
    folder = Path(folder)
    if (folder / GENERATOR_FILE).exists():
        kind = _read_description(folder)["kind"]
        if kind not in WRITERS:
            raise GeneratorFolderError(f"{folder / GENERATOR_FILE}: unknown kind {kind!r}; known: {', '.join(WRITERS)}")
        return kind
    if (folder / "vocabulary.json").exists():
        return "compact"
    raise GeneratorFolderError(f"{folder} holds no generator: neither {GENERATOR_FILE} nor vocabulary.json")


def load_writer(folder: str | Path, device: str = "cpu", trainable: bool = False):
    """The writer saved in ``folder``, whatever its kind."""
    return WRITERS[folder_kind(folder)].load(folder, device=device, trainable=trainable)


def load_stored_writer(store, uri: str, device: str = "cpu", trainable: bool = False):
    """The writer of the generator folder kept at ``uri`` of an artefact store (a manifest's ``uri``)."""
    with tempfile.TemporaryDirectory(prefix="afmrl-generator-") as scratch:
        return load_writer(store.download_directory(store.key_of(uri), Path(scratch) / "generator"), device=device, trainable=trainable)


def catalog_attributes(store, uri: str, catalog, features_table, read_image: Callable[[str], bytes] | None = None,
                       device: str = "cpu") -> list[dict]:
    """The attributes the generator kept at ``uri`` (any kind) writes for every listing of
    ``catalog`` (greedy; ``{}`` where its output does not parse)."""
    writer = load_stored_writer(store, uri, device=device)
    inputs = listing_inputs(catalog, features_table, catalog["listing_id"].to_list(), read_image)
    return [parse_attributes(text, writer.parse_keys).attributes or {} for text in writer.write(inputs)]


def distill_writer(spec: str, inputs: ListingInputs, targets: Sequence[dict], compact: CompactSFTSettings,
                   hf: HFDistillationSettings | None = None, device: str = "cpu", on_epoch: Callable[[dict], None] | None = None,
                   checkpoint: LoopCheckpoint | None = None):
    """SFT of the student ``spec`` names (``compact`` or ``hf-vlm:<id or folder>``) on the
    teacher's attributes ``targets`` (one per listing of ``inputs``): (writer, history). With
    ``checkpoint``, a killed SFT goes on from its last saved epoch."""
    kind, model = parse_generator_spec(spec)
    return WRITERS[kind].distill(model, inputs, targets, compact, hf or HFDistillationSettings(), device, on_epoch, checkpoint)
