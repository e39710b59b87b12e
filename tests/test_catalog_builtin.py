"""The built-in catalog: deterministic, hard (siblings 1-2 attributes apart), visible, noisy but normalisable."""

import io
import itertools
import re

import numpy as np
import polars as pl
import pytest
from PIL import Image

from afmrl_dagster.attributes.format import normalize_attributes, normalize_key, normalize_value
from afmrl_dagster.catalog.builtin import (
    BUILTIN_PRODUCT_LINES,
    NEAR_COLOURS,
    BuiltinCatalogConfig,
    design_distance,
    generate_builtin_catalog,
    generate_product_line,
    product_attributes,
    product_designs,
)
from afmrl_dagster.catalog.schema import CATALOG_SCHEMA, SLUG_PATTERN, seller_attributes_dict, validate_catalog

DEFAULT = BuiltinCatalogConfig()
SMALL = BuiltinCatalogConfig(product_lines=("caps",), families_per_line=2, siblings_per_family=3,
                             listings_per_product=4, image_size=96)


@pytest.fixture(scope="module")
def default_catalog():
    return generate_builtin_catalog(DEFAULT), None


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    image.load()
    return image


def test_config_validation():
    for bad in (dict(product_lines=("tops", "shoes")), dict(product_lines=()), dict(product_lines=("tops", "tops")),
                dict(listings_per_product=1), dict(families_per_line=0), dict(siblings_per_family=0),
                dict(siblings_per_family=13), dict(image_size=0), dict(jpeg_quality_range=(90, 40)),
                dict(jpeg_quality_range=(0, 50)), dict(seed=1.5)):
        with pytest.raises(ValueError):
            BuiltinCatalogConfig(**bad)
    assert {"tops", "bags", "mugs", "caps"} <= set(BUILTIN_PRODUCT_LINES)
    with pytest.raises(ValueError, match="shoes"):
        generate_product_line("shoes", SMALL)


def test_default_sizes(default_catalog):
    catalog, _ = default_catalog
    assert set(catalog) == set(DEFAULT.product_lines)
    for line, batch in catalog.items():
        frame = batch.listings
        products = DEFAULT.families_per_line * DEFAULT.siblings_per_family
        assert frame.height == products * DEFAULT.listings_per_product and frame["product_id"].n_unique() == products
        assert frame.group_by("product_id").len()["len"].to_list() == [DEFAULT.listings_per_product] * products
        assert set(batch.images) == set(frame["listing_id"])
        assert frame["product_line"].unique().to_list() == [line]


def test_every_image_decodes_at_the_configured_size(default_catalog):
    catalog, _ = default_catalog
    for batch in catalog.values():
        for data in batch.images.values():
            image = _decode(data)
            assert image.size == (224, 224) and image.mode == "RGB"


def test_same_bytes_every_time(default_catalog):
    catalog, _ = default_catalog
    again = generate_product_line("mugs", DEFAULT)
    assert again.images == catalog["mugs"].images
    assert again.listings.equals(catalog["mugs"].listings)
    small_a, small_b = generate_product_line("caps", SMALL), generate_product_line("caps", SMALL)
    assert small_a.images == small_b.images and small_a.listings.equals(small_b.listings)


def test_other_seed_other_catalog_and_more_families_keep_the_first():
    other = generate_product_line("caps", BuiltinCatalogConfig(**{**SMALL.__dict__, "seed": 1}))
    assert other.images != generate_product_line("caps", SMALL).images
    few = product_attributes("tops", BuiltinCatalogConfig(families_per_line=2))
    many = product_attributes("tops", BuiltinCatalogConfig(families_per_line=5))
    assert all(many[pid] == attributes for pid, attributes in few.items())


@pytest.mark.parametrize("line", BUILTIN_PRODUCT_LINES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_siblings_are_one_or_two_attributes_apart(line, seed):
    designs = product_designs(line, BuiltinCatalogConfig(seed=seed, families_per_line=6, siblings_per_family=8))
    families: dict[int, list] = {}
    for design in designs:
        assert 1 <= design_distance(design.attributes, design.base_attributes) <= 2
        families.setdefault(design.family, []).append(design)
    for siblings in families.values():
        assert len({sibling.brand for sibling in siblings}) == 1
        for a, b in itertools.combinations(siblings, 2):
            assert 1 <= design_distance(a.attributes, b.attributes) <= 2, (a.values, b.values)
    brands = {family[0].brand for family in families.values()}
    assert len(brands) == len(families), "a brand must not span two families"


def test_colour_siblings_mostly_switch_to_a_look_alike():
    near = changed = 0
    for line in BUILTIN_PRODUCT_LINES:
        for design in product_designs(line, BuiltinCatalogConfig(families_per_line=8)):
            base, colour = design.base_values["colour"], design.values["colour"]
            if colour != base:
                changed += 1
                near += colour in NEAR_COLOURS[base]
    assert changed >= 20 and near / changed >= 0.5


def test_ground_truth_is_normalised_and_complete():
    for line in BUILTIN_PRODUCT_LINES:
        truth = product_attributes(line, DEFAULT)
        assert len(truth) == DEFAULT.families_per_line * DEFAULT.siblings_per_family
        for attributes in truth.values():
            assert normalize_attributes(attributes) == attributes
            assert {"colour", "brand", "pattern"} <= set(attributes)
            assert "none" not in attributes.values()


def test_siblings_look_different_and_size_shows_in_the_catalog_shot(default_catalog):
    catalog, _ = default_catalog
    for line, batch in catalog.items():
        truth = product_attributes(line, DEFAULT)
        clean = {row["product_id"]: np.asarray(_decode(batch.images[row["listing_id"]]), dtype=np.float32)
                 for row in batch.listings.iter_rows(named=True) if row["listing_id"].endswith("-0")}
        for a, b in itertools.combinations(sorted(clean), 2):
            if a.split("-s")[0] == b.split("-s")[0]:  # same family: every attribute difference must be visible
                changed = np.abs(clean[a] - clean[b]).max(axis=2) > 40
                assert changed.mean() > 0.003, (truth[a], truth[b])  # > 150 clearly changed pixels
        if line in ("bags", "mugs"):
            # the object's footprint on the white studio background grows with its size attribute
            footprint = {pid: float((np.abs(image - 250).max(axis=2) > 30).mean()) for pid, image in clean.items()}
            small_values = {"small", "250 ml"}
            small = [footprint[p] for p in clean if truth[p]["size"] in small_values]
            large = [footprint[p] for p in clean if truth[p]["size"] not in small_values]
            if small and large:
                assert np.mean(large) > 1.3 * np.mean(small)


def test_listing_photos_vary_in_conditions(default_catalog):
    catalog, _ = default_catalog
    batch = catalog["tops"]
    for product_id in batch.listings["product_id"].unique().to_list()[:4]:
        ids = batch.listings.filter(batch.listings["product_id"] == product_id)["listing_id"].to_list()
        pixels = [np.asarray(_decode(batch.images[i]), dtype=np.float32) for i in ids]
        corners = [p[:8, :8].mean(axis=(0, 1)) for p in pixels]
        assert np.all(corners[0] > 240), "listing 0 is the white catalog shot"
        assert len({tuple(np.round(c / 8)) for c in corners}) >= 3, "backgrounds should differ"
        assert len({len(batch.images[i]) for i in ids}) == len(ids)


def test_catalog_is_valid_and_ids_follow_the_scheme(default_catalog):
    catalog, _ = default_catalog
    for line, batch in catalog.items():
        frame = batch.listings
        assert list(frame.schema) == list(CATALOG_SCHEMA)
        assert validate_catalog(frame).issues.height == 0
        assert frame["image_uri"].null_count() == frame.height
        assert frame["source"].unique().to_list() == ["builtin"]
        assert all(SLUG_PATTERN.match(i) and i.startswith(f"{line}-") for i in frame["listing_id"])
        assert all(re.fullmatch(rf"{line}-f\d+-s\d+", p) for p in frame["product_id"])
        assert set(frame["product_id"]) == set(product_attributes(line, DEFAULT))


def test_no_product_id_leaks_into_text(default_catalog):
    catalog, _ = default_catalog
    for batch in catalog.values():
        for row in batch.listings.iter_rows(named=True):
            texts = [row["title"], row["description"] or ""]
            texts += [f"{item['key']} {item['value']}" for item in row["seller_attributes"] or []]
            for text in texts:
                assert row["product_id"] not in text and not re.search(r"\bf\d+-s\d+\b", text), text


def test_titles_are_noisy_and_descriptions_sometimes_missing(default_catalog):
    catalog, _ = default_catalog
    tops = catalog["tops"].listings
    titles = " ".join(tops["title"]).lower()
    assert {"tee", "t-shirt", "top"} <= set(re.findall(r"t-shirt|tee|top", titles))
    assert tops["title"].n_unique() >= 0.9 * tops.height
    for line, batch in catalog.items():
        frame = batch.listings
        per_product = frame.group_by("product_id").agg(pl.col("title").n_unique().alias("n"))
        assert per_product["n"].min() >= 3, "a product's listings should be titled differently"
        missing = frame["description"].null_count() / frame.height
        assert 0.1 <= missing <= 0.5
        truth = product_attributes(line, DEFAULT)
        brand_in_title = [truth[r["product_id"]]["brand"] in r["title"].lower() for r in frame.iter_rows(named=True)]
        assert 0.4 <= np.mean(brand_in_title) < 0.95, "the brand is sometimes omitted"


def test_seller_attributes_are_partial_synonymous_and_normalise_to_the_truth(default_catalog):
    catalog, _ = default_catalog
    for line, batch in catalog.items():
        truth = product_attributes(line, DEFAULT)
        matched = total = kept = available = 0
        raw_keys: set[str] = set()
        for row in batch.listings.iter_rows(named=True):
            given = seller_attributes_dict(row["seller_attributes"])
            expected = truth[row["product_id"]]
            assert given and all(key and value for key, value in given.items())
            raw_keys |= set(given)
            kept += len(given)
            available += len(expected)
            for key, value in given.items():
                total += 1
                matched += expected.get(normalize_key(key)) == normalize_value(value)
        assert matched / total >= 0.7, f"{line}: only {matched}/{total} seller values normalise to the truth"
        assert 0.5 <= kept / available <= 0.85, "about 30% of the keys are dropped"
        assert len(raw_keys - set(next(iter(truth.values())))) >= 3, "sellers use key synonyms"


def test_small_config_renders_caps():
    batch = generate_product_line("caps", SMALL)
    assert batch.listings.height == 2 * 3 * 4 and len(batch.images) == 24
    assert all(_decode(data).size == (96, 96) for data in batch.images.values())
    assert validate_catalog(batch.listings).issues.height == 0
