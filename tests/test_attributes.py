"""Teacher annotations and the generator's token vocabulary."""

import json

import polars as pl
import pytest

from afmrl_dagster.attributes.format import attributes_to_json, normalize_attributes, parse_attributes
from afmrl_dagster.attributes.teacher import (
    ATTRIBUTE_TABLE_SCHEMA,
    AttributeTeacher,
    SellerAttributeTeacher,
    annotate_listings,
)
from afmrl_dagster.attributes.vocabulary import AttributeVocabulary
from afmrl_dagster.catalog.schema import make_catalog


def _listing(listing_id, title, attributes=None):
    return {
        "listing_id": listing_id,
        "product_id": f"p-{listing_id}",
        "product_line": "tops",
        "title": title,
        "source": "test",
        "seller_attributes": attributes,
    }


@pytest.fixture()
def catalog():
    return make_catalog(
        [
            _listing("a", "Red V-neck tee", {"Color": "Red", "Neck": "V Neck", "Size": "M"}),
            _listing("b", "Blue crew neck tee", [{"key": "colour", "value": "blue"}, {"key": "neckline", "value": "round-neck"}]),
            _listing("c", "Oversized tee, BLUE, v-neck, 500 ML bottle"),  # no seller attributes: title matching
            _listing("d", "Mystery item"),  # nothing known in the title
            _listing("e", "Tee with a novel", {"printed_text": "x" * 80}),  # value too long: invalid
        ]
    )


def test_seller_teacher_annotates_valid_missing_and_invalid_listings(catalog):
    teacher = SellerAttributeTeacher()
    assert isinstance(teacher, AttributeTeacher)
    table = annotate_listings(teacher, catalog)

    assert table.schema == pl.Schema(ATTRIBUTE_TABLE_SCHEMA)
    assert table["listing_id"].to_list() == ["a", "b", "c", "d", "e"]
    rows = {row["listing_id"]: row for row in table.iter_rows(named=True)}
    assert rows["a"]["attributes_json"] == '{"colour": "red", "neckline": "v-neck", "size": "m"}'
    assert rows["a"]["raw_text"] == rows["a"]["attributes_json"]
    assert rows["a"]["num_attributes"] == 3 and rows["a"]["error"] is None
    assert json.loads(rows["b"]["attributes_json"]) == {"colour": "blue", "neckline": "round-neck"}
    # Found in the title among the values other listings use; "m" is too short to be trusted.
    assert json.loads(rows["c"]["attributes_json"]) == {"colour": "blue", "neckline": "v-neck"}
    assert rows["d"]["attributes_json"] == "{}" and rows["d"]["is_valid"] and rows["d"]["num_attributes"] == 0
    assert not rows["e"]["is_valid"]
    assert rows["e"]["attributes_json"] is None and rows["e"]["num_attributes"] == 0
    assert "longer than" in rows["e"]["error"]
    assert set(table["teacher"]) == {f"seller-attributes@{teacher.version}"}


def test_title_matching_can_be_turned_off_and_changes_the_version(catalog):
    teacher = SellerAttributeTeacher(match_titles=False)
    assert teacher.version != SellerAttributeTeacher().version
    table = annotate_listings(teacher, catalog)
    assert table.filter(pl.col("listing_id") == "c")["attributes_json"].item() == "{}"


def test_known_values_extend_title_matching(catalog):
    teacher = SellerAttributeTeacher(known_values={"Volume": {"500ml"}})
    table = annotate_listings(teacher, catalog)
    found = json.loads(table.filter(pl.col("listing_id") == "c")["attributes_json"].item())
    assert found == {"colour": "blue", "neckline": "v-neck", "volume": "500 ml"}


def test_key_vocabulary_makes_unknown_keys_invalid(catalog):
    table = annotate_listings(SellerAttributeTeacher(), catalog, vocabulary={"colour", "neckline"})
    rows = {row["listing_id"]: row for row in table.iter_rows(named=True)}
    assert not rows["a"]["is_valid"] and "size" in rows["a"]["error"]
    assert rows["b"]["is_valid"]


class _CannedTeacher:
    """Replays fixed outputs, as recorded from a chat model: fenced, broken, not an object."""

    name, version = "canned", "1"

    def __init__(self, outputs):
        self.outputs = outputs

    def annotate(self, listings):
        return self.outputs[: listings.height]


def test_annotate_listings_parses_raw_model_text(catalog):
    outputs = ['```json\n{"Color": "Grey"}\n```', '{"colour": "red"', "[1, 2]", "", '{"size": "L"}']
    table = annotate_listings(_CannedTeacher(outputs), catalog)
    assert table["is_valid"].to_list() == [True, False, False, False, True]
    assert table["attributes_json"].to_list() == ['{"colour": "gray"}', None, None, None, '{"size": "l"}']
    assert table["raw_text"].to_list() == outputs
    assert table["error"][3] == "empty output"
    with pytest.raises(ValueError, match="4 outputs for 5 listings"):
        annotate_listings(_CannedTeacher(outputs[:4]), catalog)


def test_vocabulary_round_trip_and_counts():
    sets = [
        {"Color": "Red", "Neck": "V Neck", "size": "M"},
        {"colour": "blue", "pattern": "striped"},
        {"colour": "red", "brand": 'Ärla "Gold"'},
        {},
    ]
    vocab = AttributeVocabulary.from_attribute_sets(sets)
    for attributes in sets:
        text = vocab.decode(vocab.encode(attributes))
        assert text == attributes_to_json(attributes)
        assert parse_attributes(text, vocab.keys).attributes == normalize_attributes(attributes)
    assert vocab.keys == {"colour", "neckline", "size", "pattern", "brand"}
    assert AttributeVocabulary.from_json(vocab.to_json()) == vocab

    ids, skipped = vocab.encode_counting({"colour": "purple", "size": "m", "fabric": "silk"})
    assert skipped == 2 and vocab.decode(ids) == '{"size": "m"}'
    limited, skipped = vocab.encode_counting(sets[0], max_tokens=10)  # "{" + 2 pairs (7) + "}" + <eos> = 10
    assert vocab.decode(limited) == '{"colour": "red", "neckline": "v-neck"}' and skipped == 1

    rare = AttributeVocabulary.from_attribute_sets(sets, min_count=2)
    assert rare.keys == {"colour"} and rare.values == {"red"}


def test_broken_token_sequences_decode_to_invalid_text():
    vocab = AttributeVocabulary.from_attribute_sets([{"colour": "red", "size": "m"}])
    key, value = vocab.encode({"colour": "red"})[1], vocab.encode({"colour": "red"})[3]
    broken = [
        [vocab.open_id, key, vocab.colon_id, value, vocab.eos_id],  # no closing brace
        [vocab.open_id, key, value, vocab.close_id],  # no colon
        [vocab.open_id, value, vocab.colon_id, key, vocab.close_id],  # {"red": "colour"}: JSON, but "red" is no key
        [key, vocab.colon_id, value],  # no braces
        [vocab.open_id, key, vocab.colon_id, value, vocab.comma_id, vocab.close_id],  # trailing comma
    ]
    results = [parse_attributes(vocab.decode(ids), vocab.keys) for ids in broken]
    assert [r.is_valid for r in results] == [False, False, False, False, False]
    # Decoding stops at <eos> and skips padding.
    assert vocab.decode(vocab.encode({"colour": "red"}) + [vocab.eos_id, vocab.open_id, vocab.pad_id]) == '{"colour": "red"}'
