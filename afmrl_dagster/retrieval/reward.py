"""RAR's reward: how well generated attributes make a query retrieve its own product.

For each generated text: parse it strictly (unparseable -> ``invalid_reward``), append the
attributes to the query's title, embed the query with the frozen Stage-1 encoder (any backend:
the head over the frozen towers re-embeds only the text; a fine-tuned or VLM2Vec encoder reads
the photo and the text again), search the gallery exactly (the query's own listing excluded)
and score it by one of :data:`REWARD_KINDS`:

- ``recall``: the fraction of the query's positives in the top k (method.md: Recall@50);
- ``reciprocal_rank``: 1 / rank of the query's first true match in the whole gallery, graded
  where Recall@k is saturated (every sample of a group finds the product in the top k);
- ``margin``: cosine of the best true match minus that of the best wrong listing, in [-2, 2],
  which differs between any two samples that move the query at all.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..attributes.format import parse_attributes
from ..encoders.dual_tower import DualTowerHead, ListingFeatures
from ..encoders.listing_encoder import FrozenTowerEncoder, ListingEncoder, ListingInputs
from ..encoders.towers import TextFeaturizer
from .metrics import top_indices

INVALID_REWARD = -0.1  # reward of a generated text that does not parse (the pipeline's default)
REWARD_KINDS = ("recall", "reciprocal_rank", "margin")


def reward_label(kind: str, k: int) -> str:
    """How a report names the reward ``kind`` (``k``: Recall@k's cut-off)."""
    labels = {"recall": f"Recall@{k}", "reciprocal_rank": "reciprocal rank of the first true match",
              "margin": "margin of the best true match over the best wrong listing"}
    if kind not in labels:
        raise ValueError(f"reward must be one of {REWARD_KINDS}, got {kind!r}")
    return labels[kind]


class RetrievalReward:
    """``reward_fn(query_indices, texts) -> float32 [Q, G]`` for GRPO; ``texts[q][g]`` is raw generated text."""

    def __init__(
        self,
        head: DualTowerHead,
        text_featurizer: TextFeaturizer,
        query_titles: list[str],
        query_image: np.ndarray,
        query_image_mask: np.ndarray,
        query_product_ids: Sequence[str],
        query_listing_ids: Sequence[str],
        gallery_embeddings: np.ndarray,
        gallery_product_ids: Sequence[str],
        gallery_listing_ids: Sequence[str],
        k: int = 50,
        invalid_reward: float = INVALID_REWARD,
        vocabulary: set[str] | None = None,
        kind: str = "recall",
    ):
        """The reward through a head over the frozen towers: the queries' image features are
        given, the text tower embeds each title + sampled attributes (see :meth:`for_encoder`
        for any encoder backend)."""
        n = len(query_titles)
        if not (len(query_image) == len(query_image_mask) == len(query_product_ids) == len(query_listing_ids) == n):
            raise ValueError("query titles, image features, image mask, product ids and listing ids must align")
        image = np.asarray(query_image, dtype=np.float32)
        features = ListingFeatures(list(query_listing_ids), image, query_image_mask, np.zeros((n, 1), np.float32))
        queries = ListingInputs(list(query_listing_ids), list(query_titles), features=features, text_features_current=False)
        self._setup(FrozenTowerEncoder(head).use_text_featurizer(text_featurizer), queries, query_product_ids, gallery_embeddings,
                    gallery_product_ids, gallery_listing_ids, k, invalid_reward, vocabulary, kind)

    @classmethod
    def for_encoder(
        cls,
        encoder: ListingEncoder,
        queries: ListingInputs,
        query_product_ids: Sequence[str],
        gallery_embeddings: np.ndarray,
        gallery_product_ids: Sequence[str],
        gallery_listing_ids: Sequence[str],
        k: int = 50,
        invalid_reward: float = INVALID_REWARD,
        vocabulary: set[str] | None = None,
        kind: str = "recall",
    ) -> RetrievalReward:
        """The reward through any frozen :class:`ListingEncoder`; ``queries`` are the query
        listings as that encoder reads them (their own attributes are replaced by each sample)."""
        if len(query_product_ids) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(query_product_ids)} product ids")
        reward = cls.__new__(cls)
        reward._setup(encoder, queries, query_product_ids, gallery_embeddings, gallery_product_ids, gallery_listing_ids, k,
                      invalid_reward, vocabulary, kind)
        return reward

    def _setup(self, encoder, queries, query_product_ids, gallery_embeddings, gallery_product_ids, gallery_listing_ids, k,
               invalid_reward, vocabulary, kind="recall") -> None:
        if kind not in REWARD_KINDS:
            raise ValueError(f"reward kind must be one of {REWARD_KINDS}, got {kind!r}")
        self.kind = kind
        if not (len(gallery_embeddings) == len(gallery_product_ids) == len(gallery_listing_ids)):
            raise ValueError("gallery embeddings, product ids and listing ids must align")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.encoder = encoder.eval()
        self.queries = queries
        self.device = encoder.device
        self.query_titles = list(queries.titles)
        query_listing_ids = queries.listing_ids
        self.k = k
        self.invalid_reward = float(invalid_reward)
        self.vocabulary = vocabulary
        self.gallery = torch.as_tensor(np.asarray(gallery_embeddings, dtype=np.float32)).to(self.device)
        products = {product: code for code, product in enumerate(dict.fromkeys(map(str, gallery_product_ids)))}
        self.gallery_products = torch.tensor([products[str(p)] for p in gallery_product_ids], dtype=torch.int64)
        self.query_products = torch.tensor([products.get(str(p), -1) for p in query_product_ids], dtype=torch.int64)
        gallery_row = {str(listing): row for row, listing in enumerate(gallery_listing_ids)}
        self.query_gallery_row = torch.tensor([gallery_row.get(str(listing), -1) for listing in query_listing_ids], dtype=torch.int64)
        counts = torch.bincount(self.gallery_products, minlength=len(products))
        known = self.query_products >= 0
        own_row = self.query_gallery_row
        own_is_positive = (own_row >= 0) & known & (self.gallery_products[own_row.clamp_min(0)] == self.query_products)
        self.num_positives = torch.where(known, counts[self.query_products.clamp_min(0)], 0) - own_is_positive.long()
        self.has_positives = (self.num_positives > 0).numpy()
        self.last_stats: dict[str, float] = {}

    def _recall(self, embeddings: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """The reward of :attr:`kind` for ``embeddings`` of those ``queries`` (0 for a query
        without a positive in the gallery)."""
        scores = embeddings @ self.gallery.T
        own = self.query_gallery_row[queries]
        has_own = own >= 0
        scores[has_own.nonzero()[:, 0].to(self.device), own[has_own].to(self.device)] = float("-inf")
        if self.kind != "recall":
            return self._graded(scores.cpu(), queries)
        depth = min(self.k, len(self.gallery))
        top = top_indices(scores.cpu(), depth)
        hits = (self.gallery_products[top] == self.query_products[queries].unsqueeze(1)).sum(1).float()
        relevant = self.num_positives[queries]
        return torch.where(relevant > 0, hits / relevant.clamp(1, self.k).float(), torch.zeros_like(hits))

    def _graded(self, scores: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Reciprocal rank of the first true match, or its cosine margin over the best wrong listing."""
        positive = self.gallery_products.unsqueeze(0) == self.query_products[queries].unsqueeze(1)
        best_true = scores.masked_fill(~positive, float("-inf")).max(dim=1).values
        best_wrong = scores.masked_fill(positive, float("-inf")).max(dim=1).values
        relevant = self.num_positives[queries] > 0
        if self.kind == "reciprocal_rank":
            rank = (scores > best_true.unsqueeze(1)).sum(dim=1) + 1
            value = 1.0 / rank.float()
        else:
            value = best_true - best_wrong.clamp_min(-1.0)
        return torch.where(relevant, value.float(), torch.zeros_like(value, dtype=torch.float32))

    def __call__(self, query_indices: np.ndarray, texts: list[list[str]]) -> np.ndarray:
        """Rewards ``float32 [len(query_indices), G]``; all valid outputs are embedded in one ``embed`` call."""
        query_indices = np.asarray(query_indices, dtype=np.int64).reshape(-1)
        if len(texts) != len(query_indices):
            raise ValueError(f"{len(query_indices)} queries but {len(texts)} groups of texts")
        group = len(texts[0]) if len(texts) else 0
        if any(len(outputs) != group for outputs in texts):
            raise ValueError("every query must have the same number G of generated texts")
        rewards = np.full((len(query_indices), group), self.invalid_reward, dtype=np.float32)
        cells, sampled = [], []
        for position, (query, outputs) in enumerate(zip(query_indices, texts)):
            for g, text in enumerate(outputs):
                parsed = parse_attributes(text, self.vocabulary)
                if parsed.is_valid:
                    cells.append((position, g, query))
                    sampled.append(parsed.attributes)
        recall = np.zeros(0, dtype=np.float32)
        if cells:
            queries = torch.tensor([cell[2] for cell in cells], dtype=torch.int64)
            embeddings = self.encoder.embed(self.queries.with_attributes(queries.numpy(), sampled))
            with torch.inference_mode():
                recall = self._recall(torch.from_numpy(embeddings).to(self.device), queries).numpy()
            rows = np.array([cell[0] for cell in cells])
            columns = np.array([cell[1] for cell in cells])
            rewards[rows, columns] = recall
        total = max(rewards.size, 1)
        self.last_stats = {
            "valid_fraction": len(cells) / total,
            "mean_valid_reward": float(recall.mean()) if cells else 0.0,
        }
        return rewards
