"""Per-query outcomes and their intervals: what a difference of 0.01 R@1 needs before it is called.

A retrieval figure is a mean over queries, so its uncertainty is that of the queries drawn:
:func:`bootstrap_interval` resamples the queries (with replacement) and reads the 2.5% and
97.5% quantiles of the resampled mean. Two encoders scored on the same queries are compared
by :func:`paired_difference`, which resamples the per-query *differences*: the queries both
find easy or both find hard cancel, so the interval is much narrower than the two separate
intervals suggest. A difference is *resolved* when its interval excludes 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

BOOTSTRAP_DRAWS = 2000


def first_match_ranks(
    query_embeddings: np.ndarray,
    query_product_ids: Sequence[str],
    gallery_embeddings: np.ndarray,
    gallery_product_ids: Sequence[str],
    query_listing_ids: Sequence[str] | None = None,
    gallery_listing_ids: Sequence[str] | None = None,
) -> np.ndarray:
    """1-based rank of each query's first true match by cosine (0 when the gallery holds none);
    a listing present on both sides never matches itself."""
    queries = np.asarray(query_embeddings, dtype=np.float32)
    gallery = np.asarray(gallery_embeddings, dtype=np.float32)
    if len(queries) != len(query_product_ids) or len(gallery) != len(gallery_product_ids):
        raise ValueError("embeddings and product ids must align on both sides")
    return ranks_from_scores(queries @ gallery.T, query_product_ids, gallery_product_ids, query_listing_ids, gallery_listing_ids)


def ranks_from_scores(
    scores: np.ndarray,
    query_product_ids: Sequence[str],
    gallery_product_ids: Sequence[str],
    query_listing_ids: Sequence[str] | None = None,
    gallery_listing_ids: Sequence[str] | None = None,
) -> np.ndarray:
    """:func:`first_match_ranks` for any ``[queries, gallery]`` score matrix (higher is closer),
    e.g. a cosine with a text score fused in; ties count in the true match's favour."""
    scores = np.array(scores, dtype=np.float64)
    if scores.shape != (len(query_product_ids), len(gallery_product_ids)):
        raise ValueError(f"scores {scores.shape} do not match {len(query_product_ids)} queries x {len(gallery_product_ids)} gallery listings")
    if query_listing_ids is not None and gallery_listing_ids is not None:
        column = {listing: j for j, listing in enumerate(gallery_listing_ids)}
        for i, listing in enumerate(query_listing_ids):
            j = column.get(listing)
            if j is not None:
                scores[i, j] = -np.inf
    codes = {product: code for code, product in enumerate(dict.fromkeys(map(str, gallery_product_ids)))}
    gallery_codes = np.array([codes[str(p)] for p in gallery_product_ids], dtype=np.int64)
    query_codes = np.array([codes.get(str(p), -1) for p in query_product_ids], dtype=np.int64)
    positive = (gallery_codes[None, :] == query_codes[:, None]) & np.isfinite(scores)
    best_true = np.where(positive, scores, -np.inf).max(axis=1, initial=-np.inf)
    ranks = (scores > best_true[:, None]).sum(axis=1) + 1
    return np.where(positive.any(axis=1), ranks, 0).astype(np.int64)


def bootstrap_interval(values: Sequence[float] | np.ndarray, draws: int = BOOTSTRAP_DRAWS, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per query)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(values) == 0:
        raise ValueError("cannot bootstrap an empty sample")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(draws, len(values)))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


@dataclass(frozen=True)
class Estimate:
    """A mean over queries with its bootstrap interval."""

    mean: float
    low: float
    high: float

    @property
    def resolved(self) -> bool:
        """The interval excludes 0 (meaningful for a difference)."""
        return self.low > 0.0 or self.high < 0.0

    def text(self, signed: bool = False) -> str:
        fmt = "{:+.3f}" if signed else "{:.3f}"
        return f"{fmt.format(self.mean)} [{fmt.format(self.low)}, {fmt.format(self.high)}]"


def estimate(values: Sequence[float] | np.ndarray, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> Estimate:
    """The mean of per-query ``values`` and its 95% bootstrap interval."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    low, high = bootstrap_interval(values, draws, seed)
    return Estimate(float(values.mean()), low, high)


def paired_difference(treatment: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray,
                      draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> Estimate:
    """Mean of ``treatment - baseline`` over the same queries, with the 95% interval of the
    paired bootstrap (the queries resampled together on both sides)."""
    treatment = np.asarray(treatment, dtype=np.float64).reshape(-1)
    baseline = np.asarray(baseline, dtype=np.float64).reshape(-1)
    if treatment.shape != baseline.shape:
        raise ValueError(f"paired samples differ in length: {len(treatment)} and {len(baseline)}")
    return estimate(treatment - baseline, draws, seed)
