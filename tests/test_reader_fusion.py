"""The visual reader's text fused into search: trigram BM25, the on-disk word cache, and the
ladder's fusion row (alpha chosen on validation, test scored with it)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from afmrl_dagster.attributes.visual_reader import WordCache
from afmrl_dagster.catalog.builtin import BuiltinCatalogConfig, generate_product_line
from afmrl_dagster.evaluation.protocols import UNSEEN_PRODUCTS, RetrievalTask, make_plan
from afmrl_dagster.evaluation.statistics import ranks_from_scores
from afmrl_dagster.experiments.quality_ladder import LadderDataset, LadderSettings, dataset_features, seller_attributes
from afmrl_dagster.evaluation.scoring import fusion_weight_on_validation, query_scores
from afmrl_dagster.experiments.reader_fusion import ALPHAS, READER_ROW, ReaderScores, entry_texts, run_reader_fusion
from afmrl_dagster.retrieval.text_fusion import (FUSION_WEIGHTS, ReaderFusion, TrigramBM25, catalog_entry_texts, entry_text, min_max_rows,
                                                 reader_text)


def test_trigram_bm25_finds_an_entry_through_ocr_misreadings():
    entries = ["Arla Mellanmjölk 1.5 % 1 l", "Garant Standardmjölk 3 %", "Oatly Havredryck"]
    scores = TrigramBM25(entries).matrix(["ARL4 MELLANMJOLK", "oatiy havre", ""])
    assert scores.shape == (3, 3) and scores[0].argmax() == 0 and scores[1].argmax() == 2
    assert scores.min() >= 0.0 and scores.max() <= 1.0 and not scores[2].any()  # nothing read: no text signal
    assert min_max_rows(np.array([[2.0, 2.0], [1.0, 3.0]])).tolist() == [[0.0, 0.0], [0.0, 1.0]]


def test_ranks_from_scores_count_ties_for_the_true_match_and_skip_the_query_itself():
    scores = np.array([[0.9, 0.5, 0.5], [0.2, 0.8, 0.1]])
    ranks = ranks_from_scores(scores, ["b", "c"], ["b", "b", "x"], ["q", "r"], ["q", "g1", "g2"])
    assert ranks.tolist() == [1, 0]  # q's own row is skipped, its tie with g2 counts for it; c has no match
    with pytest.raises(ValueError, match="do not match"):
        ranks_from_scores(scores, ["b"], ["b", "b", "x"])


def test_word_cache_reads_each_image_once(tmp_path):
    batch = generate_product_line("mugs", BuiltinCatalogConfig(product_lines=("mugs",), families_per_line=1, siblings_per_family=2,
                                                               listings_per_product=2))
    data = next(iter(batch.images.values()))
    cache = WordCache(tmp_path / "ocr")
    first = cache.words(data)
    assert cache.read == 1 and first[0] and first[1]
    again = WordCache(tmp_path / "ocr").words(data)
    assert again == first and len(list((tmp_path / "ocr").glob("*.json"))) == 1


@pytest.fixture(scope="module")
def catalog_dataset(tmp_path_factory):
    """Built-in products in one line: the first listing of each product is its catalog entry,
    the others photos that query the entries; products alternate between training, validation
    and test by index."""
    config = BuiltinCatalogConfig(product_lines=("tops",), families_per_line=4, siblings_per_family=3, listings_per_product=4)
    batch = generate_product_line("tops", config)
    catalog = batch.listings.sort("listing_id")
    products = sorted(set(catalog["product_id"]))
    entry = {p: catalog.filter(pl.col("product_id") == p)["listing_id"][0] for p in products}
    entries = set(entry.values())
    plans = {}
    for part, offset in (("validation", 1), ("test", 2)):
        held = {p for i, p in enumerate(products) if i % 3 == offset}
        queries = sorted(catalog.filter(pl.col("product_id").is_in(list(held)) & ~pl.col("listing_id").is_in(list(entries)))["listing_id"])
        gallery = tuple(sorted(entries))
        task = RetrievalTask("photo_to_catalog", "photos query the catalog entries", tuple(queries), gallery)
        plans[part] = make_plan("t", "t", catalog, queries, [task], images=batch.images, products=UNSEEN_PRODUCTS, products_note="t")
    train_products = {p for i, p in enumerate(products) if i % 3 == 0}
    train = catalog.filter(pl.col("product_id").is_in(list(train_products)) | pl.col("listing_id").is_in(list(entries)))
    dataset = LadderDataset("tops", "t", plans["validation"], plans["test"], train, seller_attributes(train), images=batch.images,
                            training={"epochs": 8, "batch_size": 8})
    return dataset, dataset_features(dataset, tmp_path_factory.mktemp("features")), catalog


def test_reader_fusion_chooses_alpha_on_validation_and_gains_when_the_reader_names_the_product(catalog_dataset):
    dataset, features, catalog = catalog_dataset
    entries = entry_texts(dataset)
    assert set(entries) == set(dataset.test.tasks[0].gallery_ids)
    queries = [i for part in ("validation", "test") for i in dataset.plan(part).query_ids]
    product_of = dict(zip(catalog["listing_id"], catalog["product_id"]))
    entry_of = {product_of[i]: text for i, text in entries.items()}
    settings = LadderSettings(seeds=(0,))
    blind = run_reader_fusion(dataset, features, ReaderScores(dataset, dict.fromkeys(queries, ""), entries), settings)
    assert blind[0]["row"] == READER_ROW and blind[0]["alpha"] == 0.0  # nothing read: the cosine alone
    # A reader that reads the entry's own words off the photo (siblings whose entries share
    # their words stay tied): alpha > 0, and test gains.
    readable = run_reader_fusion(dataset, features, ReaderScores(dataset, {i: entry_of[product_of[i]] for i in queries}, entries), settings)
    assert readable[0]["alpha"] in ALPHAS and readable[0]["alpha"] > 0
    r1 = {name: records[0]["test"]["metrics"]["photo_to_catalog"]["recall@1"] for name, records in (("blind", blind), ("read", readable))}
    assert r1["read"] > r1["blind"]
    with pytest.raises(ValueError, match="no reader or entry text"):
        ReaderScores(dataset, {}, entries)


def test_bm25_of_chosen_documents_equals_the_full_row():
    entries = ["Arla Mellanmjölk 1.5 % 1 l", "Garant Standardmjölk 3 %", "Oatly Havredryck", "Arla Standardmjölk"]
    bm25 = TrigramBM25(entries)
    full = bm25.scores("ARLA STANDARDMJOLK")
    np.testing.assert_allclose(bm25.scores("ARLA STANDARDMJOLK", [3, 1]), full[[3, 1]])
    assert full.argmax() == 3
    assert entry_text("Mug", None, [{"key": "brand", "value": "Acme"}]) == "Mug Acme"
    assert reader_text({"brand": "arla", "variant": "mellanmjolk"}) == "arla mellanmjolk"


def _fusion_catalog(n_products: int = 30, photos: int = 3, seed: int = 0):
    """Products whose photos' embeddings confuse neighbours, whose entries name them, and a
    reader that reads the product's name off most photos."""
    rng = np.random.default_rng(seed)
    rows, centres = [], rng.normal(size=(n_products, 16))
    for p in range(n_products):
        rows.append({"listing_id": f"entry-{p}", "product_id": f"p{p}", "title": f"brand{p % 7} item{p}", "description": None,
                     "seller_attributes": [{"key": "brand", "value": f"maker{p}"}]})
        rows += [{"listing_id": f"photo-{p}-{i}", "product_id": f"p{p}", "title": "photo", "description": None, "seller_attributes": None}
                 for i in range(photos)]
    catalog = pl.DataFrame(rows)
    product = np.array([int(pid[1:]) for pid in catalog["product_id"]])
    embeddings = centres[product] + 1.5 * rng.normal(size=(catalog.height, 16))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    is_photo = catalog["listing_id"].str.starts_with("photo").to_numpy()
    texts = {listing: (f"item{p} maker{p}" if rng.random() < 0.8 else "") for listing, p, photo in
             zip(catalog["listing_id"], product, is_photo) if photo}
    return catalog, embeddings.astype(np.float32), is_photo, texts


def test_fused_evaluation_scores_each_query_as_the_search_reranks_it():
    catalog, embeddings, is_photo, texts = _fusion_catalog()
    gallery = ~is_photo  # photos query the catalog entries
    reader = ReaderFusion(catalog_entry_texts(catalog), candidates=5)
    fused = query_scores(catalog, embeddings, is_photo, gallery, (reader, texts, 0.3))
    # The search's path, query by query: top candidates by cosine, re-ranked by the reader's text.
    entries = np.flatnonzero(gallery)
    products = catalog["product_id"].to_list()
    served = []
    for q in np.flatnonzero(is_photo):
        cosines = embeddings[entries] @ embeddings[q]
        top = np.argsort(-cosines, kind="stable")[:5]
        _, rows = reader.rerank(texts[catalog["listing_id"][int(q)]], cosines[top], entries[top], weight=0.3)
        served.append(float(products[rows[0]] == products[q]))
    np.testing.assert_array_equal(fused.values["recall@1"], np.array(served))
    plain = query_scores(catalog, embeddings, is_photo, gallery)
    assert fused.metrics["recall@1"] > plain.metrics["recall@1"] + 0.1
    unfused = query_scores(catalog, embeddings, is_photo, gallery, (reader, texts, 0.0))
    np.testing.assert_array_equal(unfused.values["mrr"], plain.values["mrr"])


def test_fusion_weight_is_chosen_on_validation_and_is_zero_when_the_reader_reads_nothing():
    catalog, embeddings, is_photo, texts = _fusion_catalog(seed=1)
    gallery = ~is_photo
    reader = ReaderFusion(catalog_entry_texts(catalog))
    weight, by_weight = fusion_weight_on_validation(catalog, embeddings, is_photo, gallery, reader, texts)
    assert set(by_weight) == set(FUSION_WEIGHTS) and weight > 0 and by_weight[weight] == max(by_weight.values())
    assert by_weight[weight] > by_weight[0.0]
    blind, flat = fusion_weight_on_validation(catalog, embeddings, is_photo, gallery, reader, dict.fromkeys(texts, ""))
    assert blind == 0.0 and len(set(flat.values())) == 1
