"""Deterministic held-out splits by product, so held-out listings are of unseen products."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Sequence


def _rank(seed: int, product_id: str) -> str:
    return hashlib.sha256(f"{seed}:{product_id}".encode()).hexdigest()


def holdout_products(
    product_ids: Sequence[str], product_lines: Sequence[str], fraction: float = 0.3, seed: int = 0
) -> set[str]:
    """Pick ``fraction`` of the products of each line (at least one when a line has two or more).

    The choice depends only on the seed and the product ids, so adding listings or other
    lines never moves a product between train and held-out.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    products_by_line: dict[str, set[str]] = defaultdict(set)
    for product_id, line in zip(product_ids, product_lines):
        products_by_line[line].add(product_id)
    held_out: set[str] = set()
    for products in products_by_line.values():
        if len(products) < 2:
            continue
        count = max(1, round(fraction * len(products)))
        held_out.update(sorted(products, key=lambda p: _rank(seed, p))[:count])
    return held_out
