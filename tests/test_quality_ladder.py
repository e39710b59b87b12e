"""The ablation ladder: dataset protocols, the runs, the tables and the benchmark script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from afmrl_dagster.experiments.attribute_ladder import ATTRIBUTE_ROWS, AttributeChainSettings, attribute_chain_markdown, run_attribute_chain
from afmrl_dagster.attributes.teacher import SellerAttributeTeacher, title_facts
from afmrl_dagster.encoders.towers import DEFAULT_TEXT_MODEL, TextFeaturizer
from afmrl_dagster.evaluation.scoring import score_plan
from afmrl_dagster.training.attribute_stages import CITSettings, DistillationSettings
from afmrl_dagster.training.grpo import GRPOConfig
from afmrl_dagster.experiments.quality_ladder import (
    ROWS,
    LadderSettings,
    dataset_features,
    ladder_markdown,
    load_ladder_dataset,
    paired_differences,
    run_ladder,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_BUILTIN = "builtin:families=3,siblings=3,listings=4"


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


def test_builtin_protocol_trains_and_queries_disjoint_products(small_builtin):
    dataset, features, _ = small_builtin
    query_products = set(dataset.plan.listings.filter(pl.col("listing_id").is_in(dataset.plan.query_ids))["product_id"])
    assert query_products and not query_products & set(dataset.train["product_id"])
    assert len(dataset.attribute_texts) == dataset.train.height and all(dataset.attribute_texts)
    assert features.listing_ids == dataset.listings()["listing_id"].to_list()


def test_features_come_back_from_the_cache_unchanged(small_builtin):
    dataset, features, cache = small_builtin
    assert len(list(Path(cache).glob("builtin-*.npz"))) == 1
    again = dataset_features(dataset, cache)
    np.testing.assert_array_equal(again.image, features.image)
    np.testing.assert_array_equal(again.text, features.text)


def test_ladder_runs_every_row_over_every_seed(small_builtin):
    dataset, features, _ = small_builtin
    records = run_ladder(dataset, features, LadderSettings(seeds=(0, 1), training={"epochs": 20, "batch_size": 8}))
    assert [(r["row"], r["seed"]) for r in records] == [(ROWS[0], None)] + [(row, seed) for row in ROWS[1:] for seed in (0, 1)]
    assert all(r["final_loss"] < r["first_loss"] for r in records[1:])  # every row trained
    r1 = {(r["row"], r["seed"]): r["metrics"]["identical_product"]["recall@1"] for r in records}
    assert r1[("plain InfoNCE", 0)] != r1[("plain InfoNCE", 1)] or records[1]["final_loss"] != records[2]["final_loss"]
    differences = paired_differences(records, "identical_product", "full AGCL")
    assert differences == pytest.approx([r1[("full AGCL", s)] - r1[("plain InfoNCE", s)] for s in (0, 1)])
    table = ladder_markdown("builtin", records)
    assert table.count("\n") == 1 + len(ROWS)
    assert f"| {ROWS[0]} | - | {r1[(ROWS[0], None)]:.3f} |" in table


def test_ladder_table_reports_mean_sd_and_paired_difference():
    def record(row, seed, r1):
        return {"row": row, "seed": seed, "metrics": {"identical_product": {"recall@1": r1, "recall@5": 1.0, "map@10": 0.5, "mrr": 0.7}}}

    records = [record("plain InfoNCE", 0, 0.50), record("plain InfoNCE", 1, 0.60), record("full AGCL", 0, 0.54), record("full AGCL", 1, 0.62)]
    table = ladder_markdown("x", records)
    assert "| plain InfoNCE | 2 | 0.550 ± 0.071 |" in table
    assert "| full AGCL | 2 | 0.580 ± 0.057 |" in table
    assert table.rstrip().endswith("+0.030 ± 0.014 |")  # differences 0.04 and 0.02


def test_unknown_rows_are_refused(small_builtin):
    dataset, features, _ = small_builtin
    with pytest.raises(ValueError, match="unknown ladder row"):
        run_ladder(dataset, features, LadderSettings(rows=("plain InfoNCE", "triplet")))


def test_real_dataset_protocols_keep_test_listings_out_of_training(shared_data):
    grocery = load_ladder_dataset(f"grocery:{shared_data / 'grocery_store'}")
    val_photos = set(grocery.plan.query_ids)
    assert val_photos and not val_photos & set(grocery.train["listing_id"])
    assert any(grocery.attribute_texts) and "photo_to_catalog" in {task.name for task in grocery.plan.tasks}
    assert grocery.plan.products == "closed set"

    wdc = load_ladder_dataset(f"wdc_products:{shared_data / 'wdc_products'}")
    assert set(wdc.plan.query_ids) == set(wdc.plan.listings["listing_id"])
    assert not set(wdc.plan.query_ids) & set(wdc.train["listing_id"])
    assert wdc.plan.products == "closed set"  # new offers, but every gold-standard product has training offers

    amazon_google = load_ladder_dataset(f"amazon_google:{shared_data / 'amazon_google'}")
    query_products = set(amazon_google.plan.listings.filter(pl.col("listing_id").is_in(amazon_google.plan.query_ids))["product_id"])
    assert query_products and not query_products & set(amazon_google.train["product_id"])
    assert {task.name for task in amazon_google.plan.tasks} == {"amazon_to_google", "google_to_amazon"}
    assert amazon_google.plan.products == "unseen products"


def test_benchmark_script_writes_json_and_the_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- quality-ladder:start -->\nold\n<!-- quality-ladder:end -->\ntail\n")
    out = tmp_path / "quality.json"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "quality.py"), "--datasets", "builtin", "--builtin", "builtin:families=2,siblings=2,listings=3",
         "--seeds", "2", "--epochs", "3", "--rar-steps", "2", "--cache", str(tmp_path / "cache"), "--out", str(out), "--write-results", str(readme)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["seeds"] == 2 and [d["dataset"] for d in report["datasets"]] == ["builtin"]
    assert len(report["datasets"][0]["records"]) == 1 + (len(ROWS) - 1) * 2 + len(ATTRIBUTE_ROWS) * 2
    text = readme.read_text()
    assert "old" not in text and "| full AGCL | 2 |" in text and text.endswith("<!-- quality-ladder:end -->\ntail\n")
    assert "| + CIT | 2 |" in text and "RAR reward, first → last fifth of steps" in text
    assert "Products: **unseen products**" in text and report["datasets"][0]["products"] == "unseen products"


def test_score_plan_embeds_queries_apart_from_the_gallery(small_builtin):
    dataset, features, _ = small_builtin
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(dataset.plan.listings.height, 8)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)  # embeddings are unit vectors
    same = score_plan(dataset.plan, gallery, query_embeddings=gallery.copy())
    assert same == score_plan(dataset.plan, gallery)
    # Queries moved onto a gallery listing of their own product find it first.
    products = dataset.plan.listings["product_id"].to_list()
    ids = dataset.plan.listings["listing_id"].to_list()
    queries = gallery.copy()
    for i, listing in enumerate(ids):
        twin = next(j for j, p in enumerate(products) if p == products[i] and ids[j] != listing)
        queries[i] = gallery[twin]
    assert score_plan(dataset.plan, gallery, query_embeddings=queries)["identical_product"]["recall@1"] == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        score_plan(dataset.plan, gallery, query_embeddings=queries[:, :4])


def test_attribute_chain_runs_distillation_rar_and_cit_per_seed(small_builtin):
    dataset, features, _ = small_builtin
    chain = AttributeChainSettings(
        distillation=DistillationSettings(epochs=10, d_model=32, n_layers=1), grpo=GRPOConfig(steps=2, queries_per_step=4, group_size=4),
        cit=CITSettings(epochs=3),
    )
    settings = LadderSettings(seeds=(0, 1), training={"epochs": 10, "batch_size": 8})
    records = run_attribute_chain(dataset, features, TextFeaturizer(DEFAULT_TEXT_MODEL), settings, chain)
    assert [(r["row"], r["seed"]) for r in records] == [(row, seed) for seed in (0, 1) for row in ATTRIBUTE_ROWS]
    by = {(r["row"], r["seed"]): r for r in records}
    for seed in (0, 1):
        rar = by[("+ RAR", seed)]
        assert rar["reward_k"] == 5 and np.isfinite(rar["final_kl"]) and -0.1 <= rar["reward_first_steps"] <= 1.0
        assert by[("+ distilled generator attributes", seed)]["query_validity"] == 1.0  # constrained decoding
        assert 0 < by[("+ CIT", seed)]["cit_listings"] < dataset.train.height
        assert all(0.0 <= r["metrics"]["identical_product"]["recall@1"] <= 1.0 for r in records)
    table = attribute_chain_markdown(records)
    assert table.count("\n") == 2 and "| 2 | 5 | 1.000 ± 0.000 |" in table
