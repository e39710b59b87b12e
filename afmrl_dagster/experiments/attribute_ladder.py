"""The generator side of AFMRL under a fair test (claim 3: RAR improves the generator), seed by seed.

For each seed the training products are split in two by product: the stage-1 products
(70%) train the encoder, the reward products (30%) are the RAR queries, so the reward is
measured on products the encoder never trained on (a reward on its own training queries is
saturated: every sample finds the product). Then:

1. **+ distilled generator attributes.** A compact generator is distilled (SFT) from the
   teacher's attributes of every training listing. The stage-1 encoder trains with AGCL on
   the stage-1 products' titles with the teacher's attributes. Every evaluation listing,
   query and gallery alike, reads its title with the attributes the distilled generator writes.
2. **+ RAR.** The distilled generator refined with GRPO: queries are the reward products'
   listings, the gallery every training listing (no validation or test listing) with the
   distilled attributes, embedded by the frozen stage-1 encoder; the reward is graded
   (reciprocal rank of the first true match by default, :data:`~afmrl_dagster.retrieval.reward.REWARD_KINDS`),
   so the samples of a group differ. Queries then carry the RAR attributes, the gallery keeps
   the distilled ones (the index is not rebuilt).
3. **CIT.** The encoder trains one more AGCL round from its stage-1 weights on the reward
   products, once with the distilled attributes (**CIT round, distilled attributes**) and
   once with RAR's (**+ CIT**): CIT is credited only with what RAR's attributes add.

Records have the shape of :func:`~afmrl_dagster.experiments.quality_ladder.run_ladder`'s;
:data:`CHAIN_BASELINES` says what each row is compared with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import polars as pl

from ..attributes.format import attributes_to_text
from ..encoders.dual_tower import ListingFeatures, embed_features
from ..encoders.towers import TextFeaturizer
from ..features import with_listing_text
from ..training.attribute_stages import (
    CITSettings,
    DistillationSettings,
    RARGallery,
    RARSettings,
    cit_rows,
    default_reward_k,
    distill_generator,
    refine_with_rar,
    reward_trend,
    train_cit_round,
    written_attributes,
)
from ..training.encoder_training import EncoderTrainingConfig, train_encoder
from ..training.grpo import GRPOConfig
from .quality_ladder import PARTS, LadderDataset, LadderSettings, mean_sd, plan_ranks, rank_metrics, rows_of

DISTILLED_ROW = "+ distilled generator attributes"
RAR_ROW = "+ RAR"
RAR_RECALL_ROW = "+ RAR, Recall@k reward"  # the paper's reward, beside the graded one: the pipeline's default is chosen on validation
CIT_DISTILLED_ROW = "CIT round, distilled attributes"
CIT_ROW = "+ CIT"
ATTRIBUTE_ROWS = (DISTILLED_ROW, RAR_ROW, RAR_RECALL_ROW, CIT_DISTILLED_ROW, CIT_ROW)
CHAIN_BASELINES = {RAR_ROW: DISTILLED_ROW, RAR_RECALL_ROW: DISTILLED_ROW, CIT_ROW: CIT_DISTILLED_ROW, CIT_DISTILLED_ROW: DISTILLED_ROW}
CHAIN_CLAIMS = {DISTILLED_ROW: "3: RAR (reference)", RAR_ROW: "3: RAR", RAR_RECALL_ROW: "3: RAR", CIT_DISTILLED_ROW: "3: CIT (reference)",
                CIT_ROW: "3: CIT"}


@dataclass
class AttributeChainSettings:
    """Defaults are the library's (the pipeline's ``AttributeGeneratorConfig``, ``RARConfig`` and
    ``CITConfig`` read them); the ladder runs Recall@k beside the reward as its own row."""

    distillation: DistillationSettings = field(default_factory=DistillationSettings)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    reward_k: int | None = None  # None: the pipeline's automatic choice from the gallery size
    reward: str = RARSettings.reward
    invalid_reward: float = RARSettings.invalid_reward
    cit: CITSettings = field(default_factory=CITSettings)
    agcl: dict = field(default_factory=dict)  # the stage-1 AGCL form (AGCLConfig fields); {} = the library's default


def _validity(parsed: list) -> float:
    return float(np.mean([p.is_valid for p in parsed])) if parsed else 0.0


def run_attribute_chain(
    dataset: LadderDataset,
    features: ListingFeatures,
    text_featurizer: TextFeaturizer,
    settings: LadderSettings | None = None,
    chain: AttributeChainSettings | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> list[dict]:
    """One record per (row, seed) of :data:`ATTRIBUTE_ROWS`; ``features`` are the bare-title tower
    features of :meth:`LadderDataset.listings`."""
    settings = settings or LadderSettings()
    chain = chain or AttributeChainSettings()
    RARSettings(reward=chain.reward)  # validates the reward kind before any training
    train = dataset.train
    train_features = features.subset(rows_of(features, train))
    part_features = {part: features.subset(rows_of(features, dataset.plan(part).listings)) for part in PARTS}
    part_titles = {part: dataset.plan(part).listings["title"].to_list() for part in PARTS}
    train_titles = train["title"].to_list()
    products, lines = train["product_id"].to_list(), train["product_line"].to_list()
    taught = np.array([i for i, attributes in enumerate(dataset.attributes) if attributes], dtype=np.int64)
    if len(taught) == 0:
        raise ValueError(f"{dataset.name}: the teacher gave no attributes for any training listing; there is nothing to distil")
    with_teacher = with_listing_text(train_features, text_featurizer, train_titles, dataset.attributes)
    teacher_texts = dataset.attribute_texts  # a property that formats every listing: read it once, not per row
    overrides = {**settings.training, **dataset.training}
    records = []

    # Every listing the chain writes attributes for, once: the parts' galleries hold the training listings.
    listing_ids = list(dict.fromkeys([*train["listing_id"].to_list(), *(i for part in PARTS for i in dataset.plan(part).listings["listing_id"].to_list())]))
    every_listing = features.subset(rows_of(features, pl.DataFrame({"listing_id": listing_ids})))
    position = {listing_id: i for i, listing_id in enumerate(listing_ids)}
    part_positions = {part: [position[i] for i in dataset.plan(part).listings["listing_id"].to_list()] for part in PARTS}

    def written(policy, vocabulary) -> tuple[list, dict[str, list[dict]], float]:
        """The parses of what ``policy`` writes (greedy) for every listing (training listings
        first, in ``train`` order), each part's attributes, and the validity on validation."""
        parsed = written_attributes(policy, vocabulary, every_listing)[1]
        by_part = {part: [parsed[i].attributes or {} for i in part_positions[part]] for part in PARTS}
        return parsed, by_part, _validity([parsed[i] for i in part_positions["validation"]])

    def embedded(head, attributes: dict[str, list[dict]]) -> dict[str, np.ndarray]:
        return {part: embed_features(head, with_listing_text(part_features[part], text_featurizer, part_titles[part], attributes[part]))
                for part in PARTS}

    def record(row: str, seed: int, started: float, gallery: dict, queries: dict | None = None, **extra) -> None:
        outcome = {}
        for part in PARTS:
            plan = dataset.plan(part)
            ranks = plan_ranks(plan, gallery[part], None if queries is None else queries[part])
            outcome[part] = {"ranks": ranks, "metrics": {task: rank_metrics(values) for task, values in ranks.items()}}
        seconds = time.perf_counter() - started
        records.append({"dataset": dataset.name, "row": row, "seed": seed, "seconds": seconds, **outcome, **extra})
        progress(f"{dataset.name}: {row} seed {seed} validation R@1 "
                 f"{outcome['validation']['metrics'][dataset.headline]['recall@1']:.3f} ({seconds:.0f} s)")

    for seed in settings.seeds:
        started = time.perf_counter()
        reward_rows = cit_rows(products, lines, list(range(len(products))), chain.cit.train_fraction, seed)
        stage_one = np.setdiff1d(np.arange(len(products)), reward_rows)
        distillation = DistillationSettings(**{**asdict(chain.distillation), "seed": seed})
        generator, vocabulary, sft_history = distill_generator(
            train_features.subset(taught), [dataset.attributes[i] for i in taught], distillation)
        config = EncoderTrainingConfig(**overrides, seed=seed, agcl=dict(chain.agcl))
        head = train_encoder(with_teacher.subset(stage_one), [products[i] for i in stage_one], [lines[i] for i in stage_one],
                             [teacher_texts[i] for i in stage_one], config).head
        train_distilled, distilled, validity = written(generator, vocabulary)
        gallery = embedded(head, distilled)
        record(DISTILLED_ROW, seed, started, gallery, sft_final_loss=sft_history[-1]["loss"], validity=validity,
               stage_one_listings=len(stage_one), reward_listings=len(reward_rows))

        train_gallery = embed_features(head, with_listing_text(train_features, text_featurizer, train_titles,
                                                               [p.attributes or {} for p in train_distilled[:len(train_titles)]]))
        reward_k = chain.reward_k or default_reward_k(len(products))
        policies = {}
        for row, reward in ((RAR_ROW, chain.reward), (RAR_RECALL_ROW, "recall")):
            if row == RAR_RECALL_ROW and chain.reward == "recall":
                continue
            started = time.perf_counter()
            grpo = GRPOConfig(**{**asdict(chain.grpo), "seed": seed})
            policy, history = refine_with_rar(
                generator, vocabulary, head, text_featurizer, train_features.subset(reward_rows), [train_titles[i] for i in reward_rows],
                [products[i] for i in reward_rows], RARGallery(train_gallery, products, train["listing_id"].to_list()), grpo,
                reward_k=reward_k, invalid_reward=chain.invalid_reward, reward_kind=reward,
            )
            policies[row] = written(policy, vocabulary)
            first, last = reward_trend(history)
            record(row, seed, started, gallery, embedded(head, policies[row][1]), reward=reward, reward_k=reward_k,
                   reward_first_steps=first, reward_last_steps=last, reward_std_mean=float(np.mean([h["reward_std"] for h in history])),
                   final_kl=history[-1]["kl"], validity=policies[row][2])
        train_refined, refined, _ = policies[RAR_ROW]

        for row, attributes_of_rows, evaluation in (
            (CIT_DISTILLED_ROW, [train_distilled[i].attributes or {} for i in reward_rows], distilled),
            (CIT_ROW, [train_refined[i].attributes or {} for i in reward_rows], refined),
        ):
            started = time.perf_counter()
            inputs = with_listing_text(train_features.subset(reward_rows), text_featurizer, [train_titles[i] for i in reward_rows],
                                       attributes_of_rows)
            cit_head = train_cit_round(head, inputs, [products[i] for i in reward_rows], [lines[i] for i in reward_rows],
                                       [attributes_to_text(a) for a in attributes_of_rows],
                                       CITSettings(**{**asdict(chain.cit), "seed": seed})).head
            record(row, seed, started, embedded(cit_head, evaluation), cit_listings=len(reward_rows))
    return records


def attribute_chain_markdown(records: list[dict]) -> str:
    """What RAR did per reward, mean ± sd over seeds: validity on validation, the reward over its
    run (first and last fifth of the steps), the spread of rewards within a group, and the KL."""
    distilled = {r["seed"]: r for r in records if r["row"] == DISTILLED_ROW}
    header = ["row", "seeds", "reward", "k", "validity, distilled", "validity, RAR", "reward, first → last fifth of steps", "reward change",
              "reward sd within a group (mean over steps)", "KL at the last step"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in (RAR_ROW, RAR_RECALL_ROW):
        rar = [r for r in records if r["row"] == row]
        if not rar:
            continue
        cells = [
            row, str(len(rar)), rar[0]["reward"], ", ".join(str(k) for k in sorted({r["reward_k"] for r in rar})),
            mean_sd([distilled[r["seed"]]["validity"] for r in rar if r["seed"] in distilled]),
            mean_sd([r["validity"] for r in rar]),
            mean_sd([r["reward_first_steps"] for r in rar]) + " → " + mean_sd([r["reward_last_steps"] for r in rar]),
            mean_sd([r["reward_last_steps"] - r["reward_first_steps"] for r in rar], signed=True),
            mean_sd([r["reward_std_mean"] for r in rar]),
            mean_sd([r["final_kl"] for r in rar]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""
