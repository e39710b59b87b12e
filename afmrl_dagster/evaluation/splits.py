"""The pipeline's split of every catalog by product: test products (reported once), validation
products (every decision) and training products, and which listings each part queries."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from ..catalog.splits import holdout_products

PARTS = ("train", "validation", "test")


@dataclass(frozen=True)
class HeldOutSplit:
    """Which listings train, which decide and which are reported, by product.

    ``fraction`` of each line's products are *test* products: held out of training and of every
    decision, scored once and reported. Of the other products, ``validation_fraction`` are
    *validation* products, also kept out of training: every decision (the quality gates, the
    promotion, any setting) is taken on them. The rest train. Both are unseen products at
    evaluation time. A product's part depends only on the seed and its id, so adding listings
    or lines moves no product between parts.
    """

    fraction: float = 0.3
    seed: int = 0
    validation_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")

    def test_products(self, catalog: pl.DataFrame) -> set[str]:
        return holdout_products(catalog["product_id"].to_list(), catalog["product_line"].to_list(), self.fraction, self.seed)

    def validation_products(self, catalog: pl.DataFrame) -> set[str]:
        rest = catalog.filter(~pl.col("product_id").is_in(list(self.test_products(catalog))))
        # A second, independent ranking (seed + 1) picks the validation products among the others.
        return holdout_products(rest["product_id"].to_list(), rest["product_line"].to_list(), self.validation_fraction, self.seed + 1)

    def part_of_products(self, catalog: pl.DataFrame) -> dict[str, str]:
        test, validation = self.test_products(catalog), self.validation_products(catalog)
        return {p: "test" if p in test else "validation" if p in validation else "train" for p in set(catalog["product_id"].to_list())}

    def mask(self, catalog: pl.DataFrame, part: str) -> np.ndarray:
        """Listings of ``part`` ('train', 'validation' or 'test'; 'held_out' = validation + test)."""
        if part == "held_out":
            return ~self.mask(catalog, "train")
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS} or 'held_out', got {part!r}")
        parts = self.part_of_products(catalog)
        return np.array([parts[p] == part for p in catalog["product_id"].to_list()], dtype=bool)

    def query_mask(self, catalog: pl.DataFrame) -> np.ndarray:
        """The listings kept out of training (validation and test products)."""
        return self.mask(catalog, "held_out")

    def gallery_mask(self, catalog: pl.DataFrame, part: str) -> np.ndarray:
        """What queries of ``part`` search: validation queries search every listing but the
        test ones (so no decision reads a test listing, not even as a distractor); test
        queries search the whole catalog, as a served query does."""
        if part == "validation":
            return ~self.mask(catalog, "test")
        return np.ones(catalog.height, dtype=bool)
