"""The fair test of the claims: dataset parts, the runs, the statistics, the tables and the benchmark script."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from afmrl_dagster.experiments.finetuned_tower import FINETUNED_ROW, FinetunedImageBlock, run_finetuned_tower
from afmrl_dagster.experiments.attribute_ladder import ATTRIBUTE_ROWS, AttributeChainSettings, attribute_chain_markdown, run_attribute_chain
from afmrl_dagster.evaluation.statistics import first_match_ranks, paired_difference
from afmrl_dagster.attributes.teacher import SellerAttributeTeacher, title_facts
from afmrl_dagster.encoders.towers import DEFAULT_TEXT_MODEL, TextFeaturizer
from afmrl_dagster.training.attribute_stages import CITSettings, DistillationSettings
from afmrl_dagster.training.grpo import GRPOConfig
from afmrl_dagster.experiments.quality_ladder import (
    ALL_ROWS,
    PARTS,
    LadderSettings,
    chosen_on_validation,
    dataset_features,
    load_ladder_dataset,
    rank_metrics,
    run_ladder,
    summarise,
    unlink_duplicates,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_BUILTIN = "builtin:families=4,siblings=3,listings=4"


def test_title_facts_reads_quantities_by_unit_family_and_model_codes():
    assert title_facts("SanDisk 480GB SSD Plus SATA III Internal") == {"storage": "480 gb"}
    assert title_facts("Crucial 8GB (1x8GB) DDR4 2666MHz") == {"storage": "8 gb", "frequency": "2666 mhz", "model": "ddr4"}
    assert title_facts("Shimano CN-HG901 11 Speed Chain") == {"model": "cnhg901"}
    assert title_facts("Arla milk 1,5l") == {"volume": "1.5 l"}
    assert title_facts("Plain cotton tee") == {}


def test_title_facts_fill_only_keys_the_seller_did_not_give():
    listings = pl.DataFrame({
        "listing_id": ["a", "b"],
        "title": ["Dymo 19mm D1 tape LM-160", "Dymo 12mm tape"],
        "seller_attributes": [[{"key": "length", "value": "24 mm"}], None],
    }, schema={"listing_id": pl.Utf8, "title": pl.Utf8,
               "seller_attributes": pl.List(pl.Struct({"key": pl.Utf8, "value": pl.Utf8}))})
    plain, with_facts = SellerAttributeTeacher(), SellerAttributeTeacher(title_facts=True)
    assert plain.version != with_facts.version  # part of the annotation cache key
    first, second = (json.loads(text) for text in with_facts.annotate(listings))
    assert first == {"length": "24 mm", "model": "lm160"}  # the seller's length wins over the title's
    assert second == {"length": "12 mm"}
    assert [json.loads(text) for text in plain.annotate(listings)][1] == {}


@pytest.fixture(scope="module")
def small_builtin(tmp_path_factory):
    dataset = load_ladder_dataset(SMALL_BUILTIN)
    cache = tmp_path_factory.mktemp("ladder-cache")
    return dataset, dataset_features(dataset, cache), cache


def products_of(plan, ids):
    return set(plan.listings.filter(pl.col("listing_id").is_in(list(ids)))["product_id"])


def test_builtin_parts_hold_disjoint_products_and_a_part_never_searches_the_other(small_builtin):
    dataset, features, _ = small_builtin
    validation = products_of(dataset.validation, dataset.validation.query_ids)
    test = products_of(dataset.test, dataset.test.query_ids)
    trained = set(dataset.train["product_id"])
    assert validation and test and not validation & test and not (validation | test) & trained
    assert not products_of(dataset.test, dataset.test.tasks[0].gallery_ids) & validation
    assert dataset.products == "unseen products"
    assert len(dataset.attribute_texts) == dataset.train.height and all(dataset.attribute_texts)
    assert features.listing_ids == dataset.listings()["listing_id"].to_list()
    assert set(dataset.serving_attributes) >= set(dataset.listings()["listing_id"])


def test_features_come_back_from_the_cache_unchanged(small_builtin):
    dataset, features, cache = small_builtin
    assert len(list(Path(cache).glob("builtin-*.npz"))) == 1
    again = dataset_features(dataset, cache)
    np.testing.assert_array_equal(again.image, features.image)
    np.testing.assert_array_equal(again.text, features.text)


def test_first_match_ranks_skip_the_query_itself_and_count_what_outranks_the_true_match():
    gallery = np.eye(4, dtype=np.float32)
    queries = np.array([[1, 0.2, 0.5, 0], [0.9, 0.1, 0, 0], [0, 0, 0, 1]], dtype=np.float32)
    ranks = first_match_ranks(queries, ["a", "b", "z"], gallery, ["a", "a", "b", "c"], ["q0", "q1", "q2"], ["q0", "g1", "g2", "g3"])
    # q0 is gallery row 0 itself, so its true match is row 1, beaten by row 2; q1 (product b)
    # finds row 2 behind rows 0 and 1; product z has no listing in the gallery.
    assert ranks.tolist() == [2, 3, 0]
    assert rank_metrics([1, 2, 0, 1]) == {"recall@1": 0.5, "recall@5": 0.75, "mrr": pytest.approx((1 + 0.5 + 0 + 1) / 4)}


def test_paired_difference_resolves_a_consistent_gain_that_separate_intervals_would_not():
    rng = np.random.default_rng(0)
    baseline = (rng.random(400) < 0.6).astype(float)
    treatment = baseline.copy()
    flipped = rng.choice(np.flatnonzero(baseline == 0), 20, replace=False)
    treatment[flipped] = 1.0  # 20 of 400 queries fixed, none broken: +0.05
    delta = paired_difference(treatment, baseline)
    assert delta.mean == pytest.approx(0.05) and delta.resolved and delta.low > 0.02
    noise = paired_difference(rng.permutation(baseline), baseline)  # same hits, shuffled over queries: no effect
    assert noise.mean == 0.0 and not noise.resolved and noise.high - noise.low > 0.05
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference(treatment[:3], baseline)


def test_unlinked_duplicates_split_only_products_with_four_listings():
    products = ["a"] * 4 + ["b"] * 2 + ["c"] * 6
    twins, split = unlink_duplicates(products, ["x"] * len(products), 0.5)
    assert split == 1 and twins[4:6] == ["b", "b"]
    changed = [p for p, q in zip(products, twins) if p != q]
    assert changed and len(set(changed)) == 1 and twins.count(f"{changed[0]}#twin") == products.count(changed[0]) // 2


def test_ladder_runs_every_row_over_every_seed_on_both_parts(small_builtin):
    dataset, features, _ = small_builtin
    settings = LadderSettings(seeds=(0, 1), training={"epochs": 6, "batch_size": 8})
    records = run_ladder(dataset, features, settings, TextFeaturizer(DEFAULT_TEXT_MODEL))
    assert [(r["row"], r["seed"]) for r in records] == [(ALL_ROWS[0], None)] + [(row, seed) for row in ALL_ROWS[1:] for seed in (0, 1)]
    assert all(r["final_loss"] < r["first_loss"] for r in records[1:])  # every row trained
    for record in records:
        for part in PARTS:
            ranks = record[part]["ranks"]["identical_product"]
            assert len(ranks) == len(dataset.plan(part).query_ids) and min(ranks) >= 1
    duplicated = [r for r in records if "unlinked" in r["row"]]
    assert duplicated and all(r["unlinked_products"] > 0 for r in duplicated)
    summary = summarise(records, "identical_product")
    assert summary["plain InfoNCE"]["baseline"] == "zero-shot towers"
    assert summary["AGCL mask only, unlinked duplicates"]["baseline"] == "plain InfoNCE, unlinked duplicates"
    assert summary["plain InfoNCE"]["test_queries"] == len(dataset.test.query_ids)
    choice = chosen_on_validation(records, "identical_product", ("plain InfoNCE", "AGCL, fact terms, z-scored BM25"))
    best = max(("plain InfoNCE", "AGCL, fact terms, z-scored BM25"), key=lambda n: np.mean(summary[n]["validation_r1"]))
    assert choice == best
    zero = next(r for r in records if r["seed"] is None)
    assert zero["test"]["metrics"]["identical_product"] == rank_metrics(zero["test"]["ranks"]["identical_product"])


def test_a_row_whose_training_equals_an_earlier_one_reuses_it(small_builtin):
    dataset, features, _ = small_builtin
    # At most three listings a product: no product can be split into unlinked duplicates.
    keep = dataset.train.with_row_index("row").filter(pl.int_range(pl.len()).over("product_id") < 3)["row"].to_list()
    few = dataclasses.replace(dataset, train=dataset.train[keep], attributes=[dataset.attributes[i] for i in keep])
    rows = ("plain InfoNCE", "plain InfoNCE, unlinked duplicates")
    settings = LadderSettings(seeds=(0,), rows=rows, training={"epochs": 2, "batch_size": 8})
    plain, unlinked = run_ladder(few, features, settings)
    assert unlinked["row"] == rows[1] and unlinked["same_training_as"] == rows[0] and unlinked["unlinked_products"] == 0
    assert unlinked["validation"] == plain["validation"] and unlinked["test"] == plain["test"]
    split = run_ladder(dataset, features, settings)  # four listings a product: the duplicates row trains on its own
    assert split[1]["unlinked_products"] > 0 and "same_training_as" not in split[1]


def test_unknown_rows_are_refused(small_builtin):
    dataset, features, _ = small_builtin
    with pytest.raises(ValueError, match="unknown ladder row"):
        run_ladder(dataset, features, LadderSettings(rows=("plain InfoNCE", "triplet")))


def test_real_dataset_parts_keep_validation_and_test_out_of_training(shared_data):
    grocery = load_ladder_dataset(f"grocery:{shared_data / 'grocery_store'}")
    validation, test = set(grocery.validation.query_ids), set(grocery.test.query_ids)
    assert validation and test and not validation & test and abs(len(validation) - len(test)) <= 1
    assert not (validation | test) & set(grocery.train["listing_id"])
    assert {task.name for task in grocery.test.tasks} == {"identical_product", "photo_to_catalog", "packages_to_catalog"}
    assert grocery.products == "closed set" and grocery.serving_attributes is None

    wdc = load_ladder_dataset(f"wdc_products:{shared_data / 'wdc_products'}")
    assert not set(wdc.validation.query_ids) & set(wdc.test.query_ids)
    assert not (set(wdc.validation.query_ids) | set(wdc.test.query_ids)) & set(wdc.train["listing_id"])
    assert wdc.products == "closed set"

    amazon_google = load_ladder_dataset(f"amazon_google:{shared_data / 'amazon_google'}")
    held = {part: products_of(amazon_google.plan(part), amazon_google.plan(part).query_ids) for part in PARTS}
    assert held["validation"] and held["test"] and not held["validation"] & held["test"]
    assert not (held["validation"] | held["test"]) & set(amazon_google.train["product_id"])
    for task in amazon_google.test.tasks:
        assert not products_of(amazon_google.test, task.gallery_ids) & held["validation"]
    assert amazon_google.products == "unseen products"


def test_benchmark_script_writes_json_claims_and_the_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- quality-ladder:start -->\nold\n<!-- quality-ladder:end -->\ntail\n")
    out = tmp_path / "quality.json"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "quality.py"), "--datasets", "builtin", "--builtin", "builtin:families=2,siblings=2,listings=4",
         "--seeds", "2", "--epochs", "3", "--rar-steps", "2", "--attribute-rows", "builtin", "--cache", str(tmp_path / "cache"),
         "--out", str(out), "--write-results", str(readme)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["seeds"] == 2 and [d["dataset"] for d in report["datasets"]] == ["builtin"]
    assert len(report["datasets"][0]["records"]) == 1 + (len(ALL_ROWS) - 1) * 2 + len(ATTRIBUTE_ROWS) * 2
    assert report["claims"][0]["dataset"] == "builtin" and report["reward"] == "reciprocal_rank"
    text = readme.read_text()
    assert "old" not in text and text.endswith("<!-- quality-ladder:end -->\ntail\n")
    assert "| plain InfoNCE | baseline | 2 |" in text and "| + CIT | 3: CIT | 2 |" in text
    assert "reward, first → last fifth of steps" in text and "Products: **unseen products**" in text
    assert "**The claims**" in text


def test_attribute_chain_rewards_unseen_products_and_credits_cit_apart(small_builtin):
    dataset, features, _ = small_builtin
    chain = AttributeChainSettings(
        distillation=DistillationSettings(epochs=10, d_model=32, n_layers=1), grpo=GRPOConfig(steps=2, queries_per_step=4, group_size=4),
        cit=CITSettings(epochs=3),
    )
    settings = LadderSettings(seeds=(0, 1), training={"epochs": 6, "batch_size": 8})
    records = run_attribute_chain(dataset, features, TextFeaturizer(DEFAULT_TEXT_MODEL), settings, chain)
    assert [(r["row"], r["seed"]) for r in records] == [(row, seed) for seed in (0, 1) for row in ATTRIBUTE_ROWS]
    by = {(r["row"], r["seed"]): r for r in records}
    for seed in (0, 1):
        distilled, rar = by[("+ distilled generator attributes", seed)], by[("+ RAR", seed)]
        assert distilled["validity"] == 1.0  # constrained decoding
        assert distilled["stage_one_listings"] + distilled["reward_listings"] == dataset.train.height
        assert rar["reward"] == "reciprocal_rank" and np.isfinite(rar["final_kl"]) and 0.0 < rar["reward_first_steps"] <= 1.0
        assert rar["reward_std_mean"] > 0  # a graded reward separates the samples of a group
        assert by[("+ CIT", seed)]["cit_listings"] == by[("CIT round, distilled attributes", seed)]["cit_listings"] == distilled["reward_listings"]
    summary = summarise(records, "identical_product", {"+ RAR": "+ distilled generator attributes"})
    assert summary["+ RAR"]["baseline"] == "+ distilled generator attributes"
    table = attribute_chain_markdown(records)
    assert table.count("\n") == 3 and "| + RAR | 2 | reciprocal_rank | 5 | 1.000 ± 0.000 |" in table
    assert "| + RAR, Recall@k reward | 2 | recall | 5 |" in table
    assert by[("+ RAR, Recall@k reward", 0)]["reward"] == "recall"


def test_fine_tuned_image_block_reads_its_frozen_blocks_back_and_trains_the_same(small_builtin, tmp_path):
    dataset, _, _ = small_builtin
    computed = FinetunedImageBlock(dataset, tmp_path)
    assert len(list(tmp_path.glob("builtin-frozen-blocks-*.pt"))) == 1
    read_back = FinetunedImageBlock(dataset, tmp_path)
    assert computed.base.cache_stats()["image_misses"] == len(computed.inputs) and read_back.base.cache_stats()["image_misses"] == 0
    assert read_back.base.frozen_image_outputs().keys() == computed.base.frozen_image_outputs().keys()
    np.testing.assert_array_equal(read_back.features.image, computed.features.image)
    settings = LadderSettings(seeds=(0,), training={"epochs": 2, "batch_size": 8})
    records = run_finetuned_tower(read_back, None, settings)
    assert [(r["row"], r["seed"]) for r in records] == [(FINETUNED_ROW, 0)]
    again = run_finetuned_tower(computed, None, settings)
    assert records[0]["validation"]["ranks"] == again[0]["validation"]["ranks"]
    assert records[0]["test"]["metrics"] == again[0]["test"]["metrics"]
    encoder = read_back.train(0, {"epochs": 1, "batch_size": 8})
    together = read_back.embed(encoder)  # the parts' shared gallery embedded once
    for part in PARTS:
        np.testing.assert_allclose(together[part], encoder.embed(read_back.inputs.subset(read_back.part_rows[part])), atol=1e-5)
