"""The protocols of :mod:`afmrl_dagster.evaluation.protocols` on the real datasets (skipped when
``../shared/data`` is absent): which listings query, what they search, and which products they are."""

from __future__ import annotations

import gzip

import polars as pl
import pytest

from afmrl_dagster.catalog.loaders import load_wdc_products
from afmrl_dagster.evaluation.protocols import EvaluationError, plan_evaluation, unseen_products_split
from afmrl_dagster.evaluation.splits import HeldOutSplit

WDC_TRAIN = "wdcproducts80cc20rnd000un_train_medium.json.gz"
WDC_VALID = "wdcproducts80cc20rnd000un_valid_medium.json.gz"
WDC_GOLD = "wdcproducts80cc20rnd000un_gs.json.gz"


@pytest.fixture
def wdc(shared_data):
    root = shared_data / "wdc_products"
    if not all((root / name).is_file() for name in (WDC_TRAIN, WDC_VALID, WDC_GOLD)):
        pytest.skip(f"WDC Products pair files absent from {root}")
    return root


def products_of(plan, ids) -> set[str]:
    return set(plan.listings.filter(pl.col("listing_id").is_in(list(ids)))["product_id"])


def test_wdc_gold_standard_is_a_closed_set(wdc):
    """Why the unseen protocol exists: every product of the 000un gold standard has training offers."""
    plan = plan_evaluation(f"wdc_products:{wdc}", WDC_GOLD)
    assert plan.products == "closed set"
    assert products_of(plan, plan.query_ids) <= set(load_wdc_products(wdc, files=[WDC_TRAIN])["product_id"])


def test_wdc_unseen_products_are_not_in_the_training_offers(wdc):
    plan = plan_evaluation(f"wdc_products:{wdc}", f"unseen:{WDC_TRAIN},{WDC_VALID}")
    assert plan.products == "unseen products" and plan.protocol == "wdc_products"
    offers = load_wdc_products(wdc, files=[WDC_TRAIN, WDC_VALID])
    held_out, training = unseen_products_split(offers)
    queried = products_of(plan, plan.query_ids)
    # The queries are every offer of the held-out products, and none of their products has a training offer.
    assert set(plan.query_ids) == set(held_out["listing_id"]) == set(plan.listings["listing_id"])
    assert queried and not queried & set(training["product_id"])
    assert held_out.height + training.height == offers.height
    assert len(queried) == round(0.3 * offers["product_id"].n_unique())  # the pipeline's test share of the products
    (task,) = plan.tasks
    assert task.gallery_ids == tuple(sorted(plan.query_ids))  # they query each other, nothing else
    assert plan.listings.group_by("product_id").len()["len"].min() >= 2  # every query has a match
    # Seeded: the same products again, other products under another seed.
    assert set(plan_evaluation(f"wdc_products:{wdc}", f"unseen:{WDC_TRAIN},{WDC_VALID}").query_ids) == set(plan.query_ids)
    other, _ = unseen_products_split(offers, HeldOutSplit(seed=1))
    assert set(other["product_id"]) != queried
    limited = plan_evaluation(f"wdc_products:{wdc}", f"unseen:{WDC_TRAIN}", limit=10)
    assert len(limited.query_ids) == 10 and not products_of(limited, limited.query_ids) & set(
        unseen_products_split(load_wdc_products(wdc, files=[WDC_TRAIN]))[1]["product_id"])


def test_unseen_split_is_refused_where_it_has_no_meaning(tmp_path, wdc):
    with pytest.raises(EvaluationError, match="unseen-product protocol takes wdc_products"):
        plan_evaluation(f"grocery:{tmp_path}", "unseen:val.txt")
    with pytest.raises(EvaluationError, match="unseen-product protocol takes wdc_products"):
        plan_evaluation(f"wdc_products:{wdc}", "unseen:")
    with pytest.raises(EvaluationError, match="split file 'nope.json.gz' not found"):
        plan_evaluation(f"wdc_products:{wdc}", "unseen:nope.json.gz")


def test_grocery_protocol_queries_the_split_against_the_rest(shared_data):
    root = shared_data / "grocery_store"
    if not (root / "val.txt").is_file():
        pytest.skip("grocery_store absent")
    plan = plan_evaluation(f"grocery:{root}", "val.txt", limit=20)
    assert plan.products == "closed set"
    tasks = {task.name: task for task in plan.tasks}
    queries = set(plan.query_ids)
    assert len(queries) == 20 and plan.query_ids == sorted(plan.query_ids)
    assert all(i.startswith("grocery-val-") for i in queries)
    gallery = set(tasks["identical_product"].gallery_ids)
    assert not gallery & queries and not any(i.startswith("grocery-val-") for i in gallery)  # the rest of val.txt is left out
    iconic = tasks["photo_to_catalog"].gallery_ids
    assert len(iconic) == 81 and all(i.startswith("grocery-iconic-") for i in iconic)
    assert set(plan.listings["listing_id"].to_list()) == queries | gallery


def test_amazon_google_protocol_queries_the_other_table(shared_data):
    root = shared_data / "amazon_google"
    if not (root / "gt.csv").is_file():
        pytest.skip("amazon_google absent")
    plan = plan_evaluation(f"amazon_google:{root}")
    assert plan.products == "not split"  # the benchmark has no training split
    tasks = {task.name: task for task in plan.tasks}
    assert set(tasks) == {"amazon_to_google", "google_to_amazon"}
    assert all(i.startswith("amazon-") for i in tasks["amazon_to_google"].query_ids)
    assert all(i.startswith("gp-") for i in tasks["amazon_to_google"].gallery_ids)
    assert all(i.startswith("gp-") for i in tasks["google_to_amazon"].query_ids)
    assert all(i.startswith("amazon-") for i in tasks["google_to_amazon"].gallery_ids)
    sizes = plan.listings.group_by("product_id").len()
    matched = set(plan.listings.join(sizes.filter(sizes["len"] >= 2), on="product_id")["listing_id"].to_list())
    assert set(plan.query_ids) == matched
    assert plan.pooled == {"identical_product": ("amazon_to_google", "google_to_amazon")}


def test_empty_query_set_is_an_error(tmp_path):
    empty = tmp_path / "pairs.json.gz"
    with gzip.open(empty, "wt") as stream:
        stream.write("")
    with pytest.raises(EvaluationError, match="no queries"):
        plan_evaluation(f"wdc_products:{tmp_path}", str(empty))


