"""Identical-product retrieval on held-out products: each held-out listing queries the whole
catalog (itself excluded); the other listings of its product are the relevant results."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from .catalog.splits import holdout_products
from .retrieval.metrics import retrieval_metrics

REPORTED_METRICS = ("recall@1", "recall@5", "recall@10", "map@10")


@dataclass(frozen=True)
class HeldOutSplit:
    """Which listings train and which query, decided by product."""

    fraction: float = 0.3
    seed: int = 0

    def held_out_products(self, catalog: pl.DataFrame) -> set[str]:
        return holdout_products(catalog["product_id"].to_list(), catalog["product_line"].to_list(), self.fraction, self.seed)

    def query_mask(self, catalog: pl.DataFrame) -> np.ndarray:
        return catalog["product_id"].is_in(list(self.held_out_products(catalog))).to_numpy()


def evaluate_embeddings(catalog: pl.DataFrame, embeddings: np.ndarray, query_mask: np.ndarray) -> dict[str, float]:
    """Metrics of held-out queries (``query_mask``) against every listing of ``catalog``."""
    listing_ids = catalog["listing_id"].to_list()
    product_ids = catalog["product_id"].to_list()
    query_index = np.flatnonzero(query_mask)
    return retrieval_metrics(
        embeddings[query_index],
        embeddings,
        [product_ids[i] for i in query_index],
        product_ids,
        query_listing_ids=[listing_ids[i] for i in query_index],
        gallery_listing_ids=listing_ids,
    )


def results_markdown(results: pl.DataFrame, metrics: tuple[str, ...] = REPORTED_METRICS) -> str:
    """A markdown table with one row per encoder (``encoder`` column) and the reported metrics."""
    header = "| encoder | " + " | ".join(metric.replace("recall@", "R@").replace("map@", "mAP@") for metric in metrics) + " |"
    lines = [header, "|---|" + "---|" * len(metrics)]
    for row in results.iter_rows(named=True):
        lines.append(f"| {row['encoder']} | " + " | ".join(f"{row[m]:.3f}" for m in metrics) + " |")
    return "\n".join(lines)
