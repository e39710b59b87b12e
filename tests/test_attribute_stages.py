"""The generator-side stages' small rules: CIT's share of products, RAR's reward depth and trend."""

import pytest

from afmrl_dagster.training.attribute_stages import cit_rows, default_reward_k, reward_trend


def test_cit_takes_its_share_of_each_lines_products():
    products = [f"{line}-{i // 3}" for line in ("mugs", "tops") for i in range(60)]
    lines = [product.split("-")[0] for product in products]
    rows = cit_rows(products, lines, list(range(len(products))), 0.3, seed=0)
    chosen = {products[i] for i in rows}
    assert {product.split("-")[0] for product in chosen} == {"mugs", "tops"}
    assert len(chosen) == 12 and len(rows) == 36  # 30% of 20 products per line, every listing of each
    assert list(rows) == sorted(rows)
    assert set(cit_rows(products, lines, list(range(len(products))), 0.3, seed=1)) != set(rows)


def test_cit_on_a_tiny_catalog_still_gets_two_trainable_products():
    products = ["a", "a", "b", "b", "c", "c", "d"]
    rows = cit_rows(products, ["x"] * 7, list(range(7)), 0.3, seed=0)
    assert len({products[i] for i in rows if products.count(products[i]) >= 2}) >= 2


def test_reward_depth_and_trend():
    assert default_reward_k(450) == 5 and default_reward_k(3_000) == 30 and default_reward_k(1_000_000) == 50
    history = [{"reward_mean": value} for value in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    assert reward_trend(history) == pytest.approx((0.15, 0.95))  # first and last fifth
