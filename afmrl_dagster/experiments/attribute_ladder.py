"""The ladder's last rows: the generator side of AFMRL, seed by seed, on one dataset.

For each seed, the chain the pipeline runs:

1. **+ distilled generator attributes.** A compact generator is distilled (SFT) from the
   teacher's attributes of the training listings. The encoder is trained with full AGCL on
   the training listings' titles with the teacher's attributes appended (BM25 over the same
   attributes). Every evaluation listing, query and gallery alike, reads its title with the
   attributes the distilled generator writes.
2. **+ RAR.** The distilled generator is refined with GRPO: each training listing is a query,
   its sampled attributes are appended to its title, embedded by the frozen encoder and
   searched in the evaluation gallery (with the distilled attributes); the reward is
   Recall@k of its product. Queries then carry the RAR generator's attributes, the gallery
   keeps the distilled ones (the index is not rebuilt).
3. **+ CIT.** The encoder trains one more AGCL round from its stage-1 weights on 30% of the
   training products, with the RAR attributes in text and BM25; queries and gallery both
   carry RAR attributes.

The rows' records have the shape of :func:`afmrl_dagster.experiments.quality_ladder.run_ladder`'s, so
one table holds every row; :func:`attribute_chain_markdown` adds what RAR itself did.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from ..attributes.format import attributes_to_text
from ..encoders.dual_tower import ListingFeatures, embed_features
from ..encoders.towers import TextFeaturizer
from ..evaluation.scoring import score_plan
from ..features import with_listing_text
from .quality_ladder import TRAINED_ROWS, LadderDataset, LadderSettings, mean_sd, rows_of
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

DISTILLED_ROW = "+ distilled generator attributes"
RAR_ROW = "+ RAR"
CIT_ROW = "+ CIT"
ATTRIBUTE_ROWS = (DISTILLED_ROW, RAR_ROW, CIT_ROW)


@dataclass
class AttributeChainSettings:
    """Defaults are the library's, which the pipeline's ``AttributeGeneratorConfig``, ``RARConfig``
    and ``CITConfig`` read too."""

    distillation: DistillationSettings = field(default_factory=DistillationSettings)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    reward_k: int | None = None  # None: the pipeline's automatic choice from the gallery size
    invalid_reward: float = RARSettings.invalid_reward
    cit: CITSettings = field(default_factory=CITSettings)


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
    features of :meth:`LadderDataset.listings`. The encoder is trained as the ladder's full
    AGCL row (``settings.training`` and the dataset's overrides)."""
    settings = settings or LadderSettings()
    chain = chain or AttributeChainSettings()
    train, plan = dataset.train, dataset.plan
    train_features = features.subset(rows_of(features, train))
    eval_features = features.subset(rows_of(features, plan.listings))
    train_titles, eval_titles = train["title"].to_list(), plan.listings["title"].to_list()
    products, lines = train["product_id"].to_list(), train["product_line"].to_list()
    query_rows = rows_of(eval_features, plan.listings.filter(plan.listings["listing_id"].is_in(plan.query_ids)))
    # The student learns from the listings the teacher could say something about.
    taught = np.array([i for i, attributes in enumerate(dataset.attributes) if attributes], dtype=np.int64)
    if len(taught) == 0:
        raise ValueError(f"{dataset.name}: the teacher gave no attributes for any training listing; there is nothing to distil")
    with_teacher = with_listing_text(train_features, text_featurizer, train_titles, dataset.attributes)
    overrides = {**settings.training, **dataset.training}
    reward_k = chain.reward_k or default_reward_k(plan.listings.height)
    records = []

    def record(row: str, seed: int, started: float, metrics: dict, **extra) -> None:
        seconds = time.perf_counter() - started
        records.append({"dataset": dataset.name, "row": row, "seed": seed, "seconds": seconds, "metrics": metrics, **extra})
        progress(f"{dataset.name}: {row} seed {seed} R@1 {metrics[dataset.headline]['recall@1']:.3f} ({seconds:.0f} s)")

    for seed in settings.seeds:
        started = time.perf_counter()
        distillation = DistillationSettings(**{**asdict(chain.distillation), "seed": seed})
        generator, vocabulary, sft_history = distill_generator(
            train_features.subset(taught), [dataset.attributes[i] for i in taught], distillation)
        config = EncoderTrainingConfig(**overrides, seed=seed, agcl={**settings.agcl, **TRAINED_ROWS["full AGCL"]})
        head = train_encoder(with_teacher, products, lines, dataset.attribute_texts, config).head
        _, distilled = written_attributes(generator, vocabulary, eval_features)
        eval_distilled = with_listing_text(eval_features, text_featurizer, eval_titles, [p.attributes for p in distilled])
        gallery = embed_features(head, eval_distilled)
        record(DISTILLED_ROW, seed, started, score_plan(plan, gallery),
               sft_final_loss=sft_history[-1]["loss"], query_validity=_validity([distilled[i] for i in query_rows]))

        started = time.perf_counter()
        grpo = GRPOConfig(**{**asdict(chain.grpo), "seed": seed})
        # The reward searches the evaluation gallery without its queries: a query listing is never a reward positive.
        reward_rows = np.setdiff1d(np.arange(plan.listings.height), query_rows)
        policy, history = refine_with_rar(
            generator, vocabulary, head, text_featurizer, train_features, train_titles, products,
            RARGallery(gallery[reward_rows], [plan.listings["product_id"][int(i)] for i in reward_rows],
                       [plan.listings["listing_id"][int(i)] for i in reward_rows]), grpo,
            reward_k=reward_k, invalid_reward=chain.invalid_reward,
        )
        first, last = reward_trend(history)
        _, refined = written_attributes(policy, vocabulary, eval_features)
        eval_refined = with_listing_text(eval_features, text_featurizer, eval_titles, [p.attributes for p in refined])
        record(RAR_ROW, seed, started, score_plan(plan, gallery, query_embeddings=embed_features(head, eval_refined)),
               reward_k=reward_k, reward_first_steps=first, reward_last_steps=last, final_kl=history[-1]["kl"],
               query_validity=_validity([refined[i] for i in query_rows]))

        started = time.perf_counter()
        _, train_refined = written_attributes(policy, vocabulary, train_features)
        train_attributes = [p.attributes or {} for p in train_refined]
        rows = cit_rows(products, lines, list(range(len(products))), chain.cit.train_fraction, seed)
        with_refined = with_listing_text(train_features.subset(rows), text_featurizer, [train_titles[i] for i in rows],
                                         [train_attributes[i] for i in rows])
        cit_head = train_cit_round(head, with_refined, [products[i] for i in rows], [lines[i] for i in rows],
                                   [attributes_to_text(train_attributes[i]) for i in rows],
                                   CITSettings(**{**asdict(chain.cit), "seed": seed})).head
        record(CIT_ROW, seed, started, score_plan(plan, embed_features(cit_head, eval_refined)), cit_listings=len(rows))
    return records


def attribute_chain_markdown(records: list[dict], headline: str = "identical_product") -> str:
    """What each step of the chain did, mean ± sd over seeds: the distilled and RAR generators'
    validity on the queries, RAR's reward over its run and its KL, and the paired R@1 change
    of each step against the one before."""
    by = {(r["row"], r["seed"]): r for r in records}
    seeds = sorted(seed for (row, seed) in by if row == RAR_ROW and (DISTILLED_ROW, seed) in by)
    if not seeds:
        return ""

    def paired(row: str, before: str) -> list[float]:
        return [by[(row, s)]["metrics"][headline]["recall@1"] - by[(before, s)]["metrics"][headline]["recall@1"]
                for s in seeds if (row, s) in by and (before, s) in by]

    rar = [by[(RAR_ROW, s)] for s in seeds]
    cells = [
        str(len(seeds)),
        ", ".join(str(k) for k in sorted({r["reward_k"] for r in rar})),
        mean_sd([by[(DISTILLED_ROW, s)]["query_validity"] for s in seeds]),
        mean_sd([r["query_validity"] for r in rar]),
        mean_sd([r["reward_first_steps"] for r in rar]) + " → " + mean_sd([r["reward_last_steps"] for r in rar]),
        mean_sd([r["reward_last_steps"] - r["reward_first_steps"] for r in rar], signed=True),
        mean_sd([r["final_kl"] for r in rar]),
        mean_sd(paired(RAR_ROW, DISTILLED_ROW), signed=True),
        mean_sd(paired(CIT_ROW, RAR_ROW), signed=True) if paired(CIT_ROW, RAR_ROW) else "",
    ]
    header = ["seeds", "reward k", "validity, distilled", "validity, RAR", "RAR reward, first → last fifth of steps", "reward change",
              "KL at the last step", "ΔR@1 RAR − distilled (paired)", "ΔR@1 CIT − RAR (paired)"]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(cells) + " |"])
