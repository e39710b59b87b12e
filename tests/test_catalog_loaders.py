"""Loaders of the real datasets: identities, counts, validation, and strict errors on malformed input."""

import gzip
import json
import os
import time
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from afmrl_dagster.catalog.loaders import (
    CATALOG_LOADERS,
    CatalogLoadError,
    grocery_split_listing_ids,
    load_abo,
    load_amazon_google,
    load_catalog,
    load_grocery,
    load_wdc_products,
    parse_catalog_spec,
)
from afmrl_dagster.catalog.schema import CATALOG_SCHEMA, seller_attributes_dict, validate_catalog


@pytest.fixture(scope="module")
def shared_data() -> Path:
    default = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    root = Path(os.environ.get("AFMRL_SHARED_DATA", default))
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root} (set AFMRL_SHARED_DATA)")
    return root


def _dataset(shared_data: Path, name: str) -> Path:
    path = shared_data / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


def _assert_valid(frame: pl.DataFrame) -> None:
    assert list(frame.schema.items()) == list(CATALOG_SCHEMA.items())
    report = validate_catalog(frame)
    assert report.issues.height == 0, report.describe()


def _split_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- grocery ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grocery(shared_data):
    root = _dataset(shared_data, "grocery_store")
    started = time.perf_counter()
    frame = load_grocery(root)
    return root, frame, time.perf_counter() - started


def test_grocery_counts_identities_and_speed(grocery):
    root, frame, seconds = grocery
    lists = [root / name for name in ("train.txt", "val.txt", "test.txt") if (root / name).is_file()]
    photos = sum(len(_split_lines(path)) for path in lists)
    iconic = frame.filter(pl.col("listing_id").str.starts_with("grocery-iconic-"))
    assert iconic.height == 81 and frame["product_id"].n_unique() == 81
    assert frame.height == photos + 81
    assert seconds < 3.0, f"loading grocery took {seconds:.2f}s"
    # every product has its catalog image and store photos, in one product line
    per_product = frame.group_by("product_id").agg(
        pl.col("listing_id").str.starts_with("grocery-iconic-").sum().alias("iconic"),
        pl.len().alias("listings"), pl.col("product_line").n_unique().alias("lines"))
    assert per_product["iconic"].to_list() == [1] * 81
    assert per_product["listings"].min() >= 2 and per_product["lines"].max() == 1
    milk = frame.filter(pl.col("product_line") == "milk")
    assert milk["product_id"].n_unique() == 6 and "arla-standard-milk" in milk["product_id"].to_list()
    _assert_valid(frame)


def test_grocery_images_titles_and_attributes(grocery):
    root, frame, _ = grocery
    assert all(Path(uri).is_absolute() and Path(uri).is_file() for uri in frame["image_uri"])
    photos = frame.filter(~pl.col("listing_id").str.starts_with("grocery-iconic-"))
    assert photos.filter(pl.col("product_line") == "passion-fruit")["title"].unique().to_list() == ["Passion Fruit"]
    assert photos["seller_attributes"].null_count() == photos.height
    assert photos["description"].null_count() == photos.height
    standard = frame.filter(pl.col("listing_id") == "grocery-iconic-arla-standard-milk").row(0, named=True)
    assert standard["title"] == "Mjölk 3%" and standard["description"].startswith("Fresh standard milk")
    assert seller_attributes_dict(standard["seller_attributes"]) == {
        "brand": "ARLA KO", "volume": "1l", "country": "Sweden"}
    apple = frame.filter(pl.col("listing_id") == "grocery-iconic-granny-smith").row(0, named=True)
    assert apple["title"] == "Apple Granny Smith Class 1"  # the file starts with a BOM
    assert seller_attributes_dict(apple["seller_attributes"]) == {"country": "Italy", "weight": "180g"}
    cabbage = frame.filter(pl.col("product_id") == "cabbage").filter(pl.col("listing_id").str.contains("iconic"))
    assert cabbage["title"][0] == "Cabbage White Import Class 1"  # its file is named Cabbage-Information.txt


def test_grocery_split_listing_ids(grocery):
    root, frame, _ = grocery
    train, val = grocery_split_listing_ids(root, "train.txt"), grocery_split_listing_ids(root, root / "val.txt")
    assert len(train) == len(_split_lines(root / "train.txt")) and len(val) == len(_split_lines(root / "val.txt"))
    assert not train & val and (train | val) <= set(frame["listing_id"])
    only_val = load_catalog(f"grocery:{root}", split_files=["val.txt"])
    assert only_val.height == len(val) + 81
    iconic = set(frame.filter(pl.col("listing_id").str.contains("iconic"))["listing_id"])
    assert set(only_val["listing_id"]) - val == iconic


def _tiny_grocery(root: Path, split_text: bytes) -> Path:
    folder = root / "iconic-images-and-descriptions" / "Packages" / "Milk" / "Arla-Milk"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8), "white").save(folder / "Arla-Milk_Iconic.jpg")
    (folder / "Arla-Milk_Description.txt").write_text("Fresh milk.", encoding="utf-8")
    (folder / "Arla-Milk_Information.txt").write_text(
        "Title: Mjölk 3% \nManufacturer and volume: ARLA\u00a0,\u00a01l \n"
        "Nutrition values per 100 gram: \n   fett 3 gram\n",
        encoding="utf-8")
    photos = root / "train" / "Packages" / "Milk" / "Arla-Milk"
    photos.mkdir(parents=True)
    Image.new("RGB", (8, 8), "white").save(photos / "Arla-Milk_001.jpg")
    (root / "classes.csv").write_text(
        "Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int),Iconic Image Path (str),"
        "Product Description Path (str)\nArla-Milk,0,Milk,0,/iconic-images-and-descriptions/Packages/Milk/Arla-Milk/"
        "Arla-Milk_Iconic.jpg,/iconic-images-and-descriptions/Packages/Milk/Arla-Milk/Arla-Milk_Description.txt\n",
        encoding="utf-8")
    (root / "train.txt").write_bytes(split_text)
    return root


def test_grocery_on_a_tiny_copy(tmp_path):
    root = _tiny_grocery(tmp_path, b"train/Packages/Milk/Arla-Milk/Arla-Milk_001.jpg, 0, 0\n")
    frame = load_grocery(root)
    assert frame["product_id"].to_list() == ["arla-milk", "arla-milk"] and frame["product_line"][0] == "milk"
    assert seller_attributes_dict(frame["seller_attributes"].to_list()[0]) == {"brand": "ARLA", "volume": "1l"}
    _assert_valid(frame)


@pytest.mark.parametrize("split_text, problem", [
    (b"train/Packages/Milk/Arla-Milk/Arla-Milk_001.jpg, 0, 0\ntrain/Milk/caf\xe9.jpg, 0, 0\n",
     "train.txt:2: not valid UTF-8"),
    (b"train/Packages/Milk/Arla-Milk/Arla-Milk_001.jpg, 0\n", "train.txt:1: expected 'path, fine_class_id"),
    (b"train/Packages/Milk/Arla-Milk/Arla-Milk_001.jpg, 0, 7\n", "train.txt:1: class ids (0, 7)"),
    (b"\ntrain/Packages/Milk/Arla-Milk/Arla-Milk_404.jpg, 0, 0\n", "train.txt:2: photo"),
])
def test_grocery_malformed_input_names_file_and_line(tmp_path, split_text, problem):
    root = _tiny_grocery(tmp_path, split_text)
    with pytest.raises(CatalogLoadError) as error:
        load_grocery(root)
    assert problem in str(error.value)


# ---- WDC Products ----------------------------------------------------------------------------


def test_wdc_products(shared_data):
    root = _dataset(shared_data, "wdc_products")
    frame = load_wdc_products(root)
    offers = {}
    for path in root.glob("*.json.gz"):
        for line in gzip.open(path, "rt", encoding="utf-8"):
            pair = json.loads(line)
            for side in ("left", "right"):
                offers[str(pair[f"id_{side}"])] = str(pair[f"cluster_id_{side}"])
    assert frame.height == len(offers) and frame["listing_id"].n_unique() == frame.height
    assert frame["product_id"].n_unique() == len(set(offers.values()))
    assert dict(zip(frame["listing_id"].str.strip_prefix("wdc-"), frame["product_id"])) == offers
    assert frame["product_id"].value_counts()["count"].min() >= 2
    assert frame["product_line"].unique().to_list() == ["wdc-products"]
    assert frame["image_uri"].null_count() == frame.height
    brands = [seller_attributes_dict(value).get("brand") for value in frame["seller_attributes"].to_list()]
    assert sum(brand is not None for brand in brands) > 0.2 * frame.height
    _assert_valid(frame)
    gold = load_wdc_products(root, files=["wdcproducts80cc20rnd000un_gs.json.gz"])
    assert 0 < gold.height < frame.height and set(gold["listing_id"]) <= set(frame["listing_id"])


def _write_gz(path: Path, lines: list[bytes]) -> None:
    with gzip.open(path, "wb") as handle:
        handle.write(b"\n".join(lines) + b"\n")


def _pair(left: int, right: int, cluster_left: int = 1, cluster_right: int = 1) -> bytes:
    return json.dumps({"id_left": left, "cluster_id_left": cluster_left, "title_left": "Sandisk 16GB",
                       "brand_left": None, "price_left": "1.3494E2", "priceCurrency_left": "NZD", "id_right": right,
                       "cluster_id_right": cluster_right, "title_right": "SanDisk Cruzer 16 GB", "label": 1}).encode()


def test_wdc_products_malformed_input(tmp_path):
    _write_gz(tmp_path / "a.json.gz", [_pair(1, 2), _pair(2, 3)])
    frame = load_wdc_products(tmp_path)
    assert frame["listing_id"].to_list() == ["wdc-1", "wdc-2", "wdc-3"]
    assert seller_attributes_dict(frame["seller_attributes"].to_list()[0]) == {"price": "134.94 NZD"}
    _write_gz(tmp_path / "b.json.gz", [_pair(4, 5), b'{"id_left": 6, "title_left": "x"'])
    with pytest.raises(CatalogLoadError, match=r"b\.json\.gz:2: not JSON"):
        load_wdc_products(tmp_path)
    _write_gz(tmp_path / "b.json.gz", [_pair(4, 5), b'{"id_left": 6, "title_left": "x", "id_right": 7}'])
    with pytest.raises(CatalogLoadError, match=r"b\.json\.gz:2: missing field"):
        load_wdc_products(tmp_path)
    _write_gz(tmp_path / "b.json.gz", [_pair(1, 5, cluster_left=9)])
    with pytest.raises(CatalogLoadError, match=r"b\.json\.gz:1: offer 1 has cluster 9"):
        load_wdc_products(tmp_path)
    _write_gz(tmp_path / "b.json.gz", [_pair(4, 5).replace(b"Sandisk", b"Sand\xffisk")])
    with pytest.raises(CatalogLoadError, match=r"b\.json\.gz:1: not valid UTF-8"):
        load_wdc_products(tmp_path)


# ---- Amazon-GoogleProducts ---------------------------------------------------------------------


def test_amazon_google(shared_data):
    root = _dataset(shared_data, "amazon_google")
    frame = load_amazon_google(root)
    amazon, gp = (len(_split_lines(root / name)) - 1 for name in ("amazon.csv", "gp.csv"))
    matches = [line.split("#") for line in _split_lines(root / "gt.csv")[1:]]
    assert frame.height == amazon + gp and frame["listing_id"].n_unique() == frame.height
    product = dict(zip(frame["listing_id"], frame["product_id"]))
    assert all(product[f"amazon-{a}"] == product[f"gp-{b}"] for a, b in matches)
    groups = frame["product_id"].value_counts()
    assert groups.filter(pl.col("count") >= 2)["count"].sum() == 2 * len(matches)  # the shared file is 1:1
    assert frame["product_id"].n_unique() == frame.height - len(matches)
    assert frame["product_line"].unique().to_list() == ["amazon-google"]
    first = frame.filter(pl.col("listing_id") == "gp-0").row(0, named=True)
    assert first["title"] == "learning quickbooks 2007"
    assert seller_attributes_dict(first["seller_attributes"]) == {"manufacturer": "intuit", "price": "38.99"}
    unknown_price = frame.filter(pl.col("listing_id") == "amazon-0")["seller_attributes"].to_list()[0]
    assert "price" not in seller_attributes_dict(unknown_price)
    assert frame["description"].str.contains("\u00ae").any()  # UTF-8 text (®) read as such
    _assert_valid(frame)


def _tiny_amazon_google(root: Path, amazon: bytes, gt: bytes = b"D1#D2\n0#0\n") -> Path:
    (root / "amazon.csv").write_bytes(b"id#title#description#manufacturer#price\r\n" + amazon)
    (root / "gp.csv").write_bytes(b"id#title#description#manufacturer#price\r\n0#learning quickbooks#x#intuit#38.99\r\n"
                                  b"1#photoshop cs3##adobe#599.0\r\n")
    (root / "gt.csv").write_bytes(gt)
    return root


def test_amazon_google_components_and_malformed_input(tmp_path):
    root = _tiny_amazon_google(tmp_path, b"0#quickbooks 2007##intuit#0.0\r\n1#quickbooks pro##intuit#10\r\n",
                               gt=b"D1#D2\n1#0\n0#0\n")
    frame = load_amazon_google(root)
    product = dict(zip(frame["listing_id"], frame["product_id"]))
    assert product == {"amazon-0": "amazon-0", "amazon-1": "amazon-0", "gp-0": "amazon-0", "gp-1": "gp-1"}
    _tiny_amazon_google(tmp_path, b"0#quickbooks 2007##intuit#0.0\r\n1#a#b#c\r\n")
    with pytest.raises(CatalogLoadError, match=r"amazon\.csv:3: expected 5 '#'-separated fields, got 4"):
        load_amazon_google(tmp_path)
    _tiny_amazon_google(tmp_path, b"0#caf\xe9##intuit#0.0\r\n")
    with pytest.raises(CatalogLoadError, match=r"amazon\.csv:2: not valid UTF-8"):
        load_amazon_google(tmp_path)
    _tiny_amazon_google(tmp_path, b"0#quickbooks##intuit#0.0\r\n", gt=b"D1#D2\n0#0\n5#1\n")
    with pytest.raises(CatalogLoadError, match=r"gt\.csv:3"):
        load_amazon_google(tmp_path)


# ---- ABO -------------------------------------------------------------------------------------------


def test_abo_samples(shared_data):
    root = _dataset(shared_data, "abo_samples")
    frame = load_abo(root)
    folders = [path for path in root.iterdir() if (path / "metadata.txt").is_file()]
    photos = [p for folder in folders for p in folder.iterdir() if p.suffix.lower() == ".jpg"]
    assert frame.height == len(photos) and frame["product_id"].n_unique() == len(folders)
    assert all(Path(uri).is_file() for uri in frame["image_uri"])
    bag = frame.filter(pl.col("product_id") == "B0799CK52K").row(0, named=True)
    assert bag["title"] == "Starter Yoga Bag"
    assert seller_attributes_dict(bag["seller_attributes"])["colour"] == "Iron Grey"
    assert seller_attributes_dict(bag["seller_attributes"])["fabric_type"] == "100% Polyester"  # English first
    assert frame["title"].str.len_chars().min() > 5
    _assert_valid(frame)


def test_abo_metadata_is_parsed_as_a_literal_never_evaluated(tmp_path):
    folder = tmp_path / "B000TEST01"
    folder.mkdir()
    Image.new("RGB", (8, 8), "white").save(folder / "a1.jpg")
    (folder / "metadata.txt").write_text(
        "{\n 'brand': '[{language_tag=de_DE, value=Marke}, {language_tag=en_US, value=Brand, Inc}]',\n"
        " 'item_name': '[{language_tag=en_US, value=Mug, blue}]',\n"
        " 'product_type': '[{language_tag=null, value=DRINKING_CUP}]',\n"
        " 'item_dimensions': '{height={normalized_value={unit=inches, value=3.9}, value=10.0, unit=centimeters}}'\n}",
        encoding="utf-8")
    row = load_abo(tmp_path).row(0, named=True)
    assert row["title"] == "Brand, Inc Mug, blue" and row["product_line"] == "drinking_cup"
    assert seller_attributes_dict(row["seller_attributes"]) == {
        "brand": "Brand, Inc", "dimensions": "10 centimeters (height)"}
    marker = tmp_path / "evaluated"
    code = f"{{'brand': __import__('pathlib').Path('{marker}').touch()}}"
    (folder / "metadata.txt").write_text(code, encoding="utf-8")
    with pytest.raises(CatalogLoadError, match="metadata.txt"):
        load_abo(tmp_path)
    assert not marker.exists()


# ---- by name -------------------------------------------------------------------------------------


def test_parse_catalog_spec():
    spec = "grocery:../shared/data/grocery_store"
    assert parse_catalog_spec(spec) == ("grocery", Path("../shared/data/grocery_store"))
    assert parse_catalog_spec("WDC-Products:/data/wdc") == ("wdc_products", Path("/data/wdc"))
    assert parse_catalog_spec("abo_samples:x") == ("abo", Path("x"))
    assert set(CATALOG_LOADERS) == {"grocery", "wdc_products", "amazon_google", "abo"}
    with pytest.raises(ValueError, match=r"unknown catalog 'shoes'.*grocery"):
        parse_catalog_spec("shoes:/data")
    for bad in ("grocery", "grocery:", "grocery:   "):
        with pytest.raises(ValueError, match="name:path"):
            parse_catalog_spec(bad)
    with pytest.raises(CatalogLoadError, match="not found"):
        load_catalog("amazon_google:/nonexistent/amazon_google")
