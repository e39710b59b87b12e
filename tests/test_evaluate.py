"""``afmrl evaluate`` (:mod:`afmrl_dagster.apps.evaluate`) end to end on tiny catalogs, its protocols, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from afmrl_dagster.apps.cli import main
from afmrl_dagster.encoders.dual_tower import DualTowerConfig, DualTowerHead, save_head
from afmrl_dagster.evaluation.encoders import resolve_encoder
from afmrl_dagster.evaluation.protocols import EvaluationError, plan_evaluation
from afmrl_dagster.evaluation.scoring import score_plan

RETRIEVAL_KEYS = {"recall@1", "recall@5", "recall@10", "map@10", "mrr", "num_queries", "queries_without_match"}
WDC_GOLD = "wdcproducts80cc20rnd000un_gs.json.gz"


def evaluate(tmp_path, *arguments: str) -> dict:
    out = tmp_path / "metrics.json"
    main(["evaluate", *arguments, "--out", str(out), "--markdown", str(tmp_path / "metrics.md")])
    return json.loads(out.read_text())


def check_retrieval(values: dict, queries: int) -> None:
    assert set(values) == RETRIEVAL_KEYS
    assert values["num_queries"] + values["queries_without_match"] == queries
    assert 0.0 <= values["recall@1"] <= values["recall@5"] <= values["recall@10"] <= 1.0
    assert 0.0 <= values["map@10"] <= 1.0 and 0.0 < values["mrr"] <= 1.0


@pytest.fixture
def abo(shared_data):
    if not (shared_data / "abo_samples").is_dir():
        pytest.skip("abo_samples absent")
    return f"abo:{shared_data / 'abo_samples'}"


def test_zero_shot_on_abo_samples(tmp_path, abo, capsys):
    report = evaluate(tmp_path, "--catalog", abo, "--encoder", "zero-shot")
    assert report["encoder"] == "zero-shot" and report["catalog"] == abo and report["split"] is None
    assert report["protocol"]["name"] == "abo" and report["protocol"]["products"] == "not split"
    assert report["counts"]["listings_embedded"] == report["counts"]["queries"] == 12
    assert report["counts"]["products"] == 3 and report["counts"]["listings_with_image"] == 12
    check_retrieval(report["metrics"]["identical_product"], 12)
    clustering = report["metrics"]["clustering_product_id"]
    assert clustering["num_clusters"] == 3 and 0.0 <= clustering["purity"] <= 1.0 and -1.0 <= clustering["ari"] <= 1.0
    assert "knn_product_line" not in report["metrics"]  # one product line: nothing to classify
    table = (tmp_path / "metrics.md").read_text()
    assert "| identical_product | 12 |" in table and table in capsys.readouterr().out
    assert "Products: **not split**, the whole catalog" in table


def test_local_head_folder_on_abo_samples(tmp_path, abo):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    folder = save_head(DualTowerHead(DualTowerConfig()), tmp_path / "head")
    report = evaluate(tmp_path, "--catalog", abo, "--encoder", str(folder))
    assert report["encoder"] == str(folder)
    assert report["towers"] == {"image": "efficientnet-lite0", "text": "all-MiniLM-L6-v2"}
    check_retrieval(report["metrics"]["identical_product"], 12)


def test_wdc_gold_standard_limited_text_only(tmp_path, shared_data):
    gold = shared_data / "wdc_products" / WDC_GOLD
    if not gold.is_file():
        pytest.skip(f"{gold} absent")
    report = evaluate(tmp_path, "--catalog", f"wdc_products:{gold.parent}", "--split", str(gold),
                      "--encoder", "zero-shot", "--limit", "50")
    counts = report["counts"]
    assert counts["queries"] == 50 and counts["listings_with_image"] == 0
    assert report["protocol"]["products"] == "closed set"  # 000un: every gold-standard product has training offers
    assert "Products: **closed set**, new offers of trained products" in (tmp_path / "metrics.md").read_text()
    assert counts["listings_embedded"] == counts["gallery_identical_product"] == 1000  # all offers of the file
    check_retrieval(report["metrics"]["identical_product"], 50)
    # Titles find the same product far above chance (about 1 in 500 products).
    assert report["metrics"]["identical_product"]["recall@10"] > 0.5


def test_scores_of_a_builtin_plan_with_product_embeddings():
    plan = plan_evaluation("builtin:families=1,siblings=2,listings=2,lines=tops+mugs")
    assert len(plan.listings) == 8 and set(plan.images) == set(plan.listings["listing_id"].to_list())
    # One axis per product plus a shared axis per line: the twin is nearest, then the line.
    products = sorted(set(plan.listings["product_id"].to_list()))
    lines = sorted(set(plan.listings["product_line"].to_list()))
    embeddings = np.concatenate([
        np.eye(len(products))[[products.index(p) for p in plan.listings["product_id"]]],
        0.5 * np.eye(len(lines))[[lines.index(line) for line in plan.listings["product_line"]]],
    ], axis=1)
    metrics = score_plan(plan, embeddings)
    assert metrics["identical_product"]["recall@1"] == 1.0 and metrics["identical_product"]["num_queries"] == 8
    # k=5 of 7 candidates: the twin and 2 same-line listings outvote 2 of the other line.
    assert metrics["knn_product_line"]["accuracy"] == 1.0
    assert metrics["clustering_product_id"]["nmi"] == pytest.approx(1.0)


def test_missing_split_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--catalog", f"grocery:{tmp_path}", "--split", "nope.txt", "--encoder", "zero-shot",
              "--out", str(tmp_path / "m.json")])
    assert exit_info.value.code == 2
    assert "split file 'nope.txt' not found" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_a_vlm2vec_encoder_folder_is_evaluated_from_photos_and_titles(tmp_path):
    """An encoder of another backend (here a VLM2Vec LoRA over a tiny random Qwen2-VL) reads the
    catalog's photos and titles itself; the towers are not loaded for it."""
    from afmrl_dagster.encoders.vlm2vec import new_vlm2vec_encoder
    from afmrl_dagster.vlm.tiny_models import build_tiny_qwen2_vl

    model = build_tiny_qwen2_vl(tmp_path / "tiny-qwen2-vl")
    new_vlm2vec_encoder(str(model), lora_rank=2, image_size=16).save(tmp_path / "encoder")
    report = evaluate(tmp_path, "--catalog", "builtin:families=1,siblings=2,listings=2,lines=mugs", "--encoder", str(tmp_path / "encoder"))
    assert report["counts"]["listings_embedded"] == 4 and report["counts"]["listings_with_image"] == 4
    check_retrieval(report["metrics"]["identical_product"], report["counts"]["queries"])


def test_bad_encoders_are_named(tmp_path):
    with pytest.raises(EvaluationError, match="not-a-folder"):
        resolve_encoder(str(tmp_path / "not-a-folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="lacks head.safetensors, config.json"):
        resolve_encoder(str(tmp_path / "empty"))


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh sqlite tracking store as MLFLOW_TRACKING_URI; the process-wide URI is put back after."""
    mlflow = pytest.importorskip("mlflow")
    previous = mlflow.get_tracking_uri()
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    yield mlflow
    mlflow.set_tracking_uri(previous)


def test_registered_encoder_from_mlflow(tmp_path, mlflow_store):
    from afmrl_dagster.registry import ENCODER_MODEL_NAME, log_model

    mlflow = mlflow_store
    experiment = mlflow.create_experiment("evaluate-test", artifact_location=(tmp_path / "artifacts").as_uri())
    folder = save_head(DualTowerHead(DualTowerConfig(embed_dim=64)), tmp_path / "head")
    with mlflow.start_run(experiment_id=experiment):
        version = log_model("encoder", str(folder), ENCODER_MODEL_NAME).registered_model_version
    mlflow.MlflowClient().set_registered_model_alias(ENCODER_MODEL_NAME, "champion", version)
    encoder = resolve_encoder(f"models:/{ENCODER_MODEL_NAME}@champion")
    assert encoder.head.config.embed_dim == 64
    with pytest.raises(EvaluationError, match="models:/no-such-model@champion"):
        resolve_encoder("models:/no-such-model@champion")


def _parquet_catalog(folder, change=None) -> str:
    """The tiny built-in catalog written as ``<line>.parquet`` files, after ``change(frame)``."""
    import polars as pl

    from afmrl_dagster.evaluation.protocols import builtin_or_parquet

    catalog, _ = builtin_or_parquet("builtin:families=2,siblings=2,listings=2,lines=mugs")
    catalog = change(catalog) if change else catalog
    folder.mkdir(parents=True, exist_ok=True)
    for (line,), frame in catalog.group_by(["product_line"]):
        frame.with_columns(pl.col("image_uri").fill_null("")).write_parquet(folder / f"{line}.parquet")
    return f"parquet:{folder}"


def test_a_bad_catalog_or_destination_is_one_clear_line_and_exit_2_before_any_work(tmp_path, capsys):
    import polars as pl

    def refused(catalog: str, out=None) -> str:
        out = out or tmp_path / "m.json"
        with pytest.raises(SystemExit) as exit_info:
            main(["evaluate", "--catalog", catalog, "--encoder", "zero-shot", "--out", str(out)])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert "afmrl evaluate: error:" in error and "Traceback" not in error
        assert "queries," not in error  # refused before planning or embedding
        return error

    no_products = _parquet_catalog(tmp_path / "no-products", lambda frame: frame.with_columns(pl.lit(None, pl.Utf8).alias("product_id")))
    assert "field 'product_id': required field is missing or blank" in refused(no_products)
    twice = _parquet_catalog(tmp_path / "twice", lambda frame: pl.concat([frame, frame.head(1)]))
    assert "field 'listing_id': duplicate of row 0" in refused(twice)
    (tmp_path / "not-parquet").mkdir()
    (tmp_path / "not-parquet" / "mugs.parquet").write_text("listing_id,title\n1,mug\n")
    assert "mugs.parquet cannot be read as a parquet table" in refused(f"parquet:{tmp_path / 'not-parquet'}")
    (tmp_path / "empty").mkdir()
    assert "holds no product line" in refused(f"parquet:{tmp_path / 'empty'}")
    good = _parquet_catalog(tmp_path / "good")
    (tmp_path / "a-file").write_text("")
    assert "cannot write" in refused(good, tmp_path / "a-file" / "m.json")
    assert "is a folder" in refused(good, tmp_path)
    assert not (tmp_path / "m.json").exists()
    report = evaluate(tmp_path, "--catalog", good, "--encoder", "zero-shot")  # the same catalog, unbroken, is scored
    check_retrieval(report["metrics"]["identical_product"], report["counts"]["queries"])


def test_an_image_uri_outside_the_catalogs_folder_is_refused_unread_unless_its_root_is_declared(tmp_path, capsys, monkeypatch):
    """``/etc/passwd``, a ``file://`` URI and a ``..`` escape are named with their listing and
    never read; the same photo outside the catalog folder is scored once its folder is declared."""
    import os

    import polars as pl
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    photo = images / "mug.jpg"
    Image.new("RGB", (48, 48), (30, 90, 160)).save(photo, format="JPEG")
    opened = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: opened.append(str(path)) or real_stat(path, *a, **k))

    def first_image(uri: str):
        return lambda frame: frame.with_columns(
            pl.when(pl.int_range(pl.len()) == 0).then(pl.lit(uri)).otherwise(pl.col("image_uri")).alias("image_uri"))

    for name, uri in (("absolute", "/etc/passwd"), ("file-uri", "file:///etc/passwd"), ("escape", f"{tmp_path}/{{}}/../images/mug.jpg")):
        folder = tmp_path / name
        catalog = _parquet_catalog(folder, first_image(uri.format(name)))
        first = pl.read_parquet(folder / "mugs.parquet")["listing_id"][0]
        with pytest.raises(SystemExit) as exit_info:
            main(["evaluate", "--catalog", catalog, "--encoder", "zero-shot", "--out", str(tmp_path / "m.json")])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert f"listing '{first}', field image_uri" in error and "outside the catalog's image roots" in error, error
        assert "Traceback" not in error
    assert not [path for path in opened if path == "/etc/passwd" or path.endswith("mug.jpg")]
    catalog = _parquet_catalog(tmp_path / "declared", first_image(str(photo)))
    report = evaluate(tmp_path, "--catalog", catalog, "--encoder", "zero-shot", "--image-root", str(images))
    check_retrieval(report["metrics"]["identical_product"], report["counts"]["queries"])
