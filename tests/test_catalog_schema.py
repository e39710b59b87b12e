"""validate_catalog on hand-made frames: each problem names its row, listing and field."""

import polars as pl
import pytest

from afmrl_dagster.catalog.schema import (
    CATALOG_SCHEMA,
    CatalogValidationError,
    conform,
    make_catalog,
    seller_attributes_dict,
    slugify,
    validate_catalog,
)


def _row(listing_id: str, **overrides) -> dict:
    row = {
        "listing_id": listing_id,
        "product_id": "p-1",
        "product_line": "tops",
        "title": "Navy v-neck tee",
        "description": "Soft cotton.",
        "image_uri": None,
        "seller_attributes": {"colour": "navy"},
        "source": "test",
    }
    return row | overrides


def _issues(frame: pl.DataFrame) -> list[tuple[int, str, str]]:
    return [(r["row"], r["listing_id"], r["field"]) for r in validate_catalog(frame).issues.iter_rows(named=True)]


def test_clean_catalog_has_no_issues():
    frame = make_catalog([_row("a"), _row("b", product_id="p-2", seller_attributes=None, description=None)])
    report = validate_catalog(frame)
    assert report.issues.height == 0
    assert report.valid.height == 2 and report.bad_rows == 0 and report.bad_share == 0.0
    report.raise_if_above(0.0)


@pytest.mark.parametrize("field", ["title", "product_id", "product_line", "source"])
def test_missing_or_blank_required_field_is_named(field):
    frame = make_catalog([_row("a"), _row("b", **{field: None}), _row("c", **{field: "   "})])
    # a blank product_line is also not a slug: one row may carry several issues on one field
    assert sorted(set(_issues(frame))) == [(1, "b", field), (2, "c", field)]


def test_missing_listing_id_is_named():
    frame = make_catalog([_row("a"), _row(None)])
    assert _issues(frame) == [(1, None, "listing_id")]


def test_duplicate_listing_id_flags_every_later_occurrence():
    frame = make_catalog([_row("a"), _row("b"), _row("a"), _row("a")])
    report = validate_catalog(frame)
    assert _issues(frame) == [(2, "a", "listing_id"), (3, "a", "listing_id")]
    assert report.issues["problem"].to_list() == ["duplicate of row 0", "duplicate of row 0"]
    assert report.valid["listing_id"].to_list() == ["a", "b"]


@pytest.mark.parametrize("line", ["Tops", "tops & tees", "tops,bags", "-tops", "tôps"])
def test_non_slug_product_line_is_named(line):
    frame = make_catalog([_row("a"), _row("b", product_line=line)])
    report = validate_catalog(frame)
    assert _issues(frame) == [(1, "b", "product_line")]
    assert line in report.issues["problem"][0]


@pytest.mark.parametrize("field", ["title", "description", "product_id"])
def test_replacement_character_text_is_named(field):
    broken = b"caf\xe9 mug".decode("utf-8", errors="replace")
    frame = make_catalog([_row("a", **{field: broken})])
    report = validate_catalog(frame)
    assert _issues(frame) == [(0, "a", field)]
    assert "UTF-8" in report.issues["problem"][0]


@pytest.mark.parametrize("item", [
    {"key": "", "value": "red"}, {"key": None, "value": "red"}, {"key": "colour", "value": None}])
def test_seller_attribute_without_key_or_value_is_named(item):
    frame = make_catalog([_row("a"), _row("b", seller_attributes=[{"key": "size", "value": "m"}, item])])
    assert _issues(frame) == [(1, "b", "seller_attributes")]


def test_one_row_with_several_problems_counts_once():
    frame = make_catalog([_row("a", title=None, product_line="Bad Line"), _row("b")])
    report = validate_catalog(frame)
    assert {issue[2] for issue in _issues(frame)} == {"title", "product_line"}
    assert report.bad_rows == 1 and report.bad_share == 0.5


def test_describe_names_row_listing_and_field():
    frame = make_catalog([_row("a"), _row("b", title="")])
    text = validate_catalog(frame).describe()
    assert "row 1" in text and "'b'" in text and "'title'" in text


def test_raise_if_above_thresholds():
    frame = make_catalog([_row("a"), _row("b"), _row("c"), _row("d", title=None)])
    report = validate_catalog(frame)
    assert report.bad_share == pytest.approx(0.25)
    report.raise_if_above(0.25)
    report.raise_if_above(0.5)
    with pytest.raises(CatalogValidationError, match=r"(?s)1 of 4 listings .*'d'.*'title'"):
        report.raise_if_above(0.2)
    with pytest.raises(CatalogValidationError):
        report.raise_if_above(0.0)


def test_extra_issues_mark_their_rows_bad():
    frame = make_catalog([_row("a"), _row("b")])
    extra = [{"row": 0, "listing_id": "a", "field": "image_uri", "problem": "image does not decode"}]
    report = validate_catalog(frame, extra_issues=extra)
    assert _issues(frame) == [] and report.issues["field"].to_list() == ["image_uri"]
    assert report.valid["listing_id"].to_list() == ["b"]


def test_conform_orders_casts_and_names_missing_columns():
    frame = make_catalog([_row("a")])
    shuffled = frame.select(list(reversed(frame.columns))).with_columns(pl.lit("x").alias("extra"))
    assert conform(shuffled).columns == list(CATALOG_SCHEMA)
    with pytest.raises(CatalogValidationError, match="title"):
        conform(frame.drop("title"))
    with pytest.raises(CatalogValidationError, match="missing"):
        validate_catalog(frame.drop("source"))


def test_slugify_and_seller_attributes_dict():
    assert slugify("Sour-Cream") == "sour-cream"
    assert slugify("Tops & Tees / 2024") == "tops-tees-2024"
    assert slugify("???") == "unnamed"
    frame = make_catalog([_row("a", seller_attributes={"colour": "navy", "size": 3})])
    assert seller_attributes_dict(frame["seller_attributes"][0].to_list()) == {"colour": "navy", "size": "3"}
    assert seller_attributes_dict(None) == {}
