"""The generator side of AFMRL as three library calls, shared by the pipeline's assets and the
quality ladder: distil the student from the teacher (SFT), refine it with RAR (GRPO rewarded
by retrieval through the frozen encoder), and train the encoder one more round on the refined
attributes (CIT).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..attributes.format import Attributes, parse_attributes
from ..attributes.generator import AttributeGenerator, GeneratorConfig, generate_attribute_texts
from ..attributes.vocabulary import AttributeVocabulary
from ..catalog.splits import holdout_products
from ..encoders.dual_tower import DualTowerHead, ListingFeatures
from ..encoders.listing_encoder import FrozenTowerEncoder, ListingEncoder, ListingInputs
from ..encoders.towers import TextFeaturizer
from ..retrieval.reward import INVALID_REWARD, REWARD_KINDS, RetrievalReward
from .agcl import AGCLConfig
from .checkpoints import LoopCheckpoint
from .encoder_training import EncoderTrainingConfig, TrainingResult, train_listing_encoder
from .generator_sft import SFTConfig, train_generator_sft
from .grpo import GRPOConfig, train_grpo


@dataclass
class DistillationSettings:
    """The student's size and its SFT schedule; the defaults are the generator's and SFT's own,
    and the pipeline's (``AttributeGeneratorConfig`` of the ``attribute_generator`` asset reads them)."""

    d_model: int = GeneratorConfig.d_model
    n_layers: int = GeneratorConfig.n_layers
    constrained_decoding: bool = True
    epochs: int = SFTConfig.epochs
    batch_size: int = SFTConfig.batch_size
    learning_rate: float = SFTConfig.learning_rate
    seed: int = SFTConfig.seed
    device: str = SFTConfig.device


def distill_generator(
    features: ListingFeatures,
    targets: Sequence[Attributes],
    settings: DistillationSettings | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoint: LoopCheckpoint | None = None,
) -> tuple[AttributeGenerator, AttributeVocabulary, list[dict]]:
    """A compact generator trained to write ``targets`` (the teacher's attributes, one per row of
    ``features``) from the frozen towers' features; its vocabulary is built from the targets."""
    settings = settings or DistillationSettings()
    torch.manual_seed(settings.seed)
    vocabulary = AttributeVocabulary.from_attribute_sets(list(targets))
    model = AttributeGenerator(
        len(vocabulary), features.image.shape[1], features.text.shape[1],
        GeneratorConfig(d_model=settings.d_model, n_layers=settings.n_layers,
                        grammar_keys=len(vocabulary.keys) if settings.constrained_decoding else 0),
    )
    sft = SFTConfig(epochs=settings.epochs, batch_size=settings.batch_size, learning_rate=settings.learning_rate,
                    seed=settings.seed, device=settings.device)
    history = train_generator_sft(model, vocabulary, features.image, features.image_mask, features.text, list(targets), sft, on_epoch=on_epoch,
                                  checkpoint=checkpoint)
    return model, vocabulary, history


def written_attributes(model: AttributeGenerator, vocabulary: AttributeVocabulary, features: ListingFeatures) -> tuple[list[str], list]:
    """The raw texts ``model`` writes (greedy) for each listing of ``features``, and their parses."""
    texts = generate_attribute_texts(model, vocabulary, features.image, features.image_mask, features.text)
    return texts, [parse_attributes(text, set(vocabulary.keys)) for text in texts]


def default_reward_k(gallery_size: int) -> int:
    """Recall@50 as in the paper, capped at 1% of the gallery (at least 5): on a small catalog
    Recall@50 is 1 for nearly every output, and GRPO would get no signal."""
    return min(50, max(5, gallery_size // 100))


@dataclass
class RARSettings:
    """RAR's reward (its GRPO schedule is :class:`GRPOConfig`); the pipeline's defaults
    (``RARConfig`` of the ``rar_generator`` asset reads them)."""

    reward_k: int = 0  # reward = Recall@reward_k; 0 = default_reward_k(gallery size)
    invalid_reward: float = INVALID_REWARD
    # One of REWARD_KINDS: recall (Recall@reward_k, the paper's), reciprocal_rank, margin. Chosen on validation by
    # benchmarks/quality.py: the graded reward against Recall@k, +0.023 [+0.011, +0.036] R@1 on grocery, +0.004 on Amazon-Google.
    reward: str = "reciprocal_rank"

    def __post_init__(self) -> None:
        if self.reward not in REWARD_KINDS:
            raise ValueError(f"reward must be one of {REWARD_KINDS}, got {self.reward!r}")


@dataclass
class RARGallery:
    """The catalog the reward searches: its embeddings under the frozen encoder, product and
    listing id per row."""

    embeddings: np.ndarray
    product_ids: Sequence[str]
    listing_ids: Sequence[str]


def refine_with_rar(
    reference: AttributeGenerator,
    vocabulary: AttributeVocabulary,
    head: DualTowerHead,
    text_featurizer: TextFeaturizer,
    queries: ListingFeatures,
    query_titles: Sequence[str],
    query_product_ids: Sequence[str],
    gallery: RARGallery,
    config: GRPOConfig,
    reward_k: int | None = None,
    invalid_reward: float = RARSettings.invalid_reward,
    on_step: Callable[[dict], None] | None = None,
    reward_kind: str = RARSettings.reward,
) -> tuple[AttributeGenerator, list[dict]]:
    """RAR: a copy of the distilled generator ``reference`` trained with GRPO.

    ``queries`` are the training listings (bare-title features feed the generator); for each,
    every sampled attribute set is appended to its title, embedded with the frozen ``head``
    and searched in ``gallery``; the reward is Recall@``reward_k`` of the query's product
    (``invalid_reward`` when the output does not parse). ``reference`` stays as it is: it is
    the KL anchor. Returns the policy and the per-step history of :func:`train_grpo`.
    """
    reward = RetrievalReward(
        head, text_featurizer, list(query_titles), queries.image, queries.image_mask, list(query_product_ids),
        list(queries.listing_ids), gallery.embeddings, list(gallery.product_ids), list(gallery.listing_ids),
        k=reward_k or default_reward_k(len(gallery.listing_ids)), invalid_reward=invalid_reward, kind=reward_kind,
    )
    policy = copy.deepcopy(reference)
    history = train_grpo(policy, reference, vocabulary, queries.image, queries.image_mask, queries.text, reward, config, on_step=on_step)
    return policy, history


def rar_reward(encoder: ListingEncoder, queries: ListingInputs, query_product_ids: Sequence[str], gallery: RARGallery,
               reward_k: int | None = None, invalid_reward: float = RARSettings.invalid_reward,
               reward_kind: str = RARSettings.reward) -> RetrievalReward:
    """RAR's reward over ``queries`` through the frozen stage-1 ``encoder`` (any backend):
    ``reward_kind`` (Recall@``reward_k`` by default) of the query's product with each sampled
    attribute set appended."""
    return RetrievalReward.for_encoder(
        encoder, queries, list(query_product_ids), gallery.embeddings, list(gallery.product_ids), list(gallery.listing_ids),
        k=reward_k or default_reward_k(len(gallery.listing_ids)), invalid_reward=invalid_reward, kind=reward_kind,
    )


def refine_writer_with_rar(writer, encoder: ListingEncoder, queries: ListingInputs, query_product_ids: Sequence[str],
                           gallery: RARGallery, config: GRPOConfig, reward_k: int | None = None,
                           invalid_reward: float = RARSettings.invalid_reward, hf=None, on_step: Callable[[dict], None] | None = None,
                           reward_kind: str = RARSettings.reward, checkpoint: LoopCheckpoint | None = None):
    """RAR of a distilled writer of any kind (:mod:`.generator_backends`): GRPO rewarded by
    retrieval through the frozen ``encoder``; returns its :class:`~.generator_backends.RAROutcome`.
    With ``checkpoint``, a killed run goes on from its last saved step."""
    from .generator_backends import HFRARSettings

    reward = rar_reward(encoder, queries, query_product_ids, gallery, reward_k, invalid_reward, reward_kind)
    return writer.refine(queries, reward, config, hf or HFRARSettings(), on_step=on_step, checkpoint=checkpoint)


def reward_trend(history: list[dict]) -> tuple[float, float]:
    """Mean reward over the first and over the last fifth of the GRPO steps."""
    fifth = max(1, len(history) // 5)
    return (float(np.mean([h["reward_mean"] for h in history[:fifth]])),
            float(np.mean([h["reward_mean"] for h in history[-fifth:]])))


@dataclass
class CITSettings:
    """One more AGCL round from the stage-1 head; the pipeline's defaults (``CITConfig`` of the
    ``cit_encoder`` asset reads them)."""

    train_fraction: float = 0.3
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 3e-4
    seed: int = 0
    device: str = "cpu"
    checkpoint_dir: str | None = None  # checkpoints here, resumed after a kill (see EncoderTrainingConfig)
    checkpoint_every_steps: int = 0


def cit_rows(product_ids: Sequence[str], product_lines: Sequence[str], candidate_rows: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """The rows among ``candidate_rows`` whose product is in the ``fraction`` of each line's
    products that the CIT round trains on; on a small catalog, at least two products with two
    or more listings (what contrastive training needs), added in product-id order."""
    candidates = [product_ids[i] for i in candidate_rows]
    chosen = holdout_products(candidates, [product_lines[i] for i in candidate_rows], fraction, seed=seed)
    counts: dict[str, int] = {}
    for product in candidates:
        counts[product] = counts.get(product, 0) + 1
    pairable = sorted(product for product, count in counts.items() if count >= 2)
    for product in pairable:
        if sum(counts[p] >= 2 for p in chosen) >= 2:
            break
        chosen.add(product)
    return np.array([i for i in candidate_rows if product_ids[i] in chosen], dtype=np.int64)


def train_cit_round(
    stage_one: ListingEncoder | DualTowerHead,
    inputs: ListingInputs | ListingFeatures,
    product_ids: Sequence[str],
    product_lines: Sequence[str],
    attribute_texts: Sequence[str],
    settings: CITSettings | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainingResult:
    """The stage-1 encoder (any backend; a bare head is the frozen-tower one) trained one more
    round with full AGCL on ``inputs`` (listings carrying the refined attributes; for a head,
    their features of title + refined attributes), BM25 reading ``attribute_texts``;
    ``stage_one`` itself is left unchanged."""
    settings = settings or CITSettings()
    if isinstance(stage_one, DualTowerHead):
        stage_one = FrozenTowerEncoder(stage_one)
    if isinstance(inputs, ListingFeatures):
        inputs = ListingInputs(inputs.listing_ids, [""] * len(inputs), features=inputs)
    config = EncoderTrainingConfig(
        epochs=settings.epochs, batch_size=settings.batch_size, learning_rate=settings.learning_rate, seed=settings.seed,
        device=settings.device, agcl=AGCLConfig(), pca_init=False,
        checkpoint_dir=settings.checkpoint_dir, checkpoint_every_steps=settings.checkpoint_every_steps,
    )
    result = train_listing_encoder(copy.deepcopy(stage_one), inputs, product_ids, product_lines, attribute_texts, config,
                                   on_epoch=on_epoch, fresh_start=False)
    if isinstance(result.encoder, FrozenTowerEncoder):
        result.head = result.encoder.head
    return result


# ---- the stages as the pipeline runs them over a catalog split by product ------------------------


@dataclass
class CITOutcome:
    """One CIT round over a catalog: the new encoder, every listing embedded with the refined
    attributes, its scores per part of the split, and the rows it trained on."""

    encoder: ListingEncoder
    gallery: np.ndarray
    scores: dict[str, dict[str, float]]
    rows: np.ndarray
    history: list[dict]

    @property
    def head(self) -> DualTowerHead | None:
        return getattr(self.encoder, "head", None)


def run_cit_stage(
    stage_one: ListingEncoder,
    writer,
    features_table,
    catalog,
    split,
    text_featurizer: TextFeaturizer,
    settings: CITSettings,
    on_epoch: Callable[[dict], None] | None = None,
    read_image: Callable[[str], bytes] | None = None,
) -> CITOutcome:
    """The refined generator (a writer of any kind, :mod:`.generator_backends`; ``read_image``
    reads photos for the writers and encoders that look at them) writes every listing's
    attributes; the stage-1 encoder (any backend) trains one more AGCL round on
    ``settings.train_fraction`` of the training products (``split``'s train part only); the
    whole catalog is embedded with those attributes and scored on validation and test products
    (:func:`afmrl_dagster.evaluation.evaluate_parts`)."""
    from ..attributes.format import attributes_to_text
    from ..evaluation.scoring import evaluate_parts
    from ..features import with_listing_text
    from .generator_backends import listing_inputs

    ids, titles = catalog["listing_id"].to_list(), catalog["title"].to_list()
    products, lines = catalog["product_id"].to_list(), catalog["product_line"].to_list()
    inputs = listing_inputs(catalog, features_table, ids, read_image)
    refined = [parse_attributes(text, writer.parse_keys).attributes or {} for text in writer.write(inputs)]
    served = ListingInputs(ids, titles, refined, inputs.image_uris, read_image,
                           with_listing_text(inputs.features, text_featurizer, titles, refined) if inputs.features is not None else None)
    rows = cit_rows(products, lines, np.flatnonzero(split.mask(catalog, "train")).tolist(), settings.train_fraction, settings.seed)
    result = train_cit_round(stage_one, served.subset(rows), [products[i] for i in rows], [lines[i] for i in rows],
                             [attributes_to_text(refined[i]) for i in rows], settings, on_epoch=on_epoch)
    encoder = result.encoder.to(settings.device)
    gallery = encoder.embed(served)
    return CITOutcome(encoder, gallery, evaluate_parts(catalog, gallery, split), rows, result.history)


def compare_query_attributes(
    generators: dict,
    encoder: ListingEncoder,
    features_table,
    catalog,
    gallery: np.ndarray,
    split,
    parts: Sequence[str] = ("validation", "test"),
    read_image: Callable[[str], bytes] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{part: {name: metrics + validity_rate}}``: the same encoder (any backend) and gallery
    (every listing of ``catalog`` embedded as served), the queries of each part carrying the
    attributes each generator (a writer of any kind, :mod:`.generator_backends`) writes; each
    part's queries search the gallery its split gives it."""
    from ..evaluation.report import REPORTED_METRICS
    from ..retrieval.metrics import retrieval_metrics
    from .generator_backends import listing_inputs

    ids, products = catalog["listing_id"].to_list(), catalog["product_id"].to_list()
    comparison: dict[str, dict[str, dict[str, float]]] = {}
    for part in parts:
        rows, gallery_rows = np.flatnonzero(split.mask(catalog, part)), np.flatnonzero(split.gallery_mask(catalog, part))
        inputs = listing_inputs(catalog, features_table, [ids[i] for i in rows], read_image)
        comparison[part] = {}
        for name, writer in generators.items():
            parsed = [parse_attributes(text, writer.parse_keys) for text in writer.write(inputs)]
            queries = inputs.with_attributes(np.arange(len(rows)), [p.attributes for p in parsed])
            metrics = retrieval_metrics(
                encoder.embed(queries), gallery[gallery_rows], [products[i] for i in rows], [products[i] for i in gallery_rows],
                query_listing_ids=[ids[i] for i in rows], gallery_listing_ids=[ids[i] for i in gallery_rows],
            )
            comparison[part][name] = {**{m: float(metrics[m]) for m in REPORTED_METRICS}, "validity_rate": float(np.mean([p.is_valid for p in parsed]))}
    return comparison
