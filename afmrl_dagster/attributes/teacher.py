"""Teachers write attributes for listings; ``annotate_listings`` checks what they wrote.

In the paper the teacher is a large MLLM (Qwen2.5-VL-72B) prompted for the key attributes
of a product. Any object with ``name``, ``version`` and ``annotate`` can play that role; the
built-in :class:`SellerAttributeTeacher` is an offline stand-in that reads the attributes
the seller already gave. Every raw output is kept and parsed strictly, so a teacher's
failures are counted, never silently repaired.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Protocol, runtime_checkable

import polars as pl

from ..catalog.schema import seller_attributes_dict
from .format import attributes_to_json, normalize_attributes, normalize_key, normalize_value, parse_attributes

ATTRIBUTE_TABLE_SCHEMA: dict[str, pl.DataType] = {
    "listing_id": pl.Utf8(),
    "raw_text": pl.Utf8(),
    "attributes_json": pl.Utf8(),
    "is_valid": pl.Boolean(),
    "error": pl.Utf8(),
    "num_attributes": pl.Int64(),
    "teacher": pl.Utf8(),
}

# Values this short ("s", "m", "1") match inside almost any title: too ambiguous to trust.
MIN_TITLE_VALUE_CHARS = 2


@runtime_checkable
class AttributeTeacher(Protocol):
    """Writes one raw text (a JSON object is expected) per listing.

    ``version`` must change whenever the prompt or the logic changes: it is part of the
    cache key of the annotations.
    """

    name: str
    version: str

    def annotate(self, listings: pl.DataFrame) -> list[str]: ...


# Quantities a title states, by unit family: "SanDisk 480GB SSD 2.5\"" -> storage: 480 gb.
_QUANTITY_UNITS = {
    "storage": ("tb", "gb", "mb"),
    "frequency": ("ghz", "mhz"),
    "power": ("kw", "w"),
    "battery": ("mah",),
    "voltage": ("v",),
    "resolution": ("mp",),
    "length": ("mm", "cm", "m", "in", "inch"),
    "volume": ("ml", "cl", "l"),
    "weight": ("kg", "g", "oz", "lb"),
}
_UNIT_KEY = {unit: key for key, units in _QUANTITY_UNITS.items() for unit in units}
_QUANTITY = re.compile(
    r"(?<![a-z0-9.])(\d+(?:[.,]\d+)?)\s?(" + "|".join(sorted(_UNIT_KEY, key=len, reverse=True)) + r")(?![a-z0-9])"
)
_QUANTITY_END = re.compile(r"\d(?:" + "|".join(_UNIT_KEY) + r")$")  # "1x8gb" is a quantity, not a model
# Model codes: a token mixing letters and digits ("wd40efrx", "cn-hg901", "t9161ll/a").
_CODE = re.compile(r"(?<![\w-])(?=[\w/-]*\d)(?=[\w/-]*[a-z])[a-z0-9][\w/-]{2,}(?![\w-])")
MAX_MODEL_CODES = 2


def title_facts(title: str) -> dict[str, str]:
    """Quantities with units (by family: storage, length, volume, ...) and up to two model
    codes that a title states; a rule-based reading of what a multimodal teacher would list."""
    text = " ".join((title or "").lower().split())
    facts: dict[str, list[str]] = defaultdict(list)
    spans = []
    for match in _QUANTITY.finditer(text):
        number, unit = match.group(1).replace(",", "."), match.group(2)
        value = f"{number} {unit}"
        if value not in facts[_UNIT_KEY[unit]]:
            facts[_UNIT_KEY[unit]].append(value)
        spans.append(match.span())
    for match in _CODE.finditer(text):
        inside_quantity = any(start <= match.start() < end for start, end in spans)
        if not inside_quantity and not _QUANTITY_END.search(match.group()) and len(facts["model"]) < MAX_MODEL_CODES:
            facts["model"].append(match.group().replace("-", ""))
    return {key: ", ".join(values) for key, values in facts.items() if values}


class SellerAttributeTeacher:
    """The listing's own seller attributes, normalised, as canonical JSON.

    A listing without seller attributes gets the attributes its title reveals when
    ``match_titles`` is set: each title is searched for the known values (those that the
    seller attributes of the same frame use, plus ``known_values``), longest first, one value
    per key; a value seen under several keys is attributed to the key it appears with most
    often. With ``title_facts``, every listing also gets the quantities and model codes of
    :func:`title_facts` for keys it does not have yet.
    """

    name = "seller-attributes"

    def __init__(self, match_titles: bool = True, known_values: dict[str, set[str]] | None = None, title_facts: bool = False):
        self.match_titles = match_titles
        self.title_facts = title_facts
        self.known_values = {key: set(values) for key, values in (known_values or {}).items()}

    @property
    def version(self) -> str:
        return "1" + ("+titles" if self.match_titles else "") + ("+facts" if self.title_facts else "")

    def annotate(self, listings: pl.DataFrame) -> list[str]:
        """One canonical JSON text per row of ``listings`` (a catalog frame)."""
        seller = [normalize_attributes(seller_attributes_dict(cell)) for cell in listings["seller_attributes"].to_list()]
        matcher = _TitleMatcher(seller, self.known_values) if self.match_titles else None
        outputs = []
        for attributes, title in zip(seller, listings["title"].to_list()):
            if not attributes and matcher is not None:
                attributes = matcher.find(title or "")
            if self.title_facts:
                attributes = {**normalize_attributes(title_facts(title)), **attributes}
            outputs.append(attributes_to_json(attributes))
        return outputs


class _TitleMatcher:
    """Finds known attribute values in titles with one alternation regex (longest value first)."""

    def __init__(self, attribute_sets: list[dict[str, str]], extra: dict[str, set[str]]):
        key_counts: dict[str, Counter] = defaultdict(Counter)
        for attributes in attribute_sets:
            for key, value in attributes.items():
                key_counts[value][key] += 1
        for key, values in extra.items():
            norm_key = normalize_key(key)
            for value in values:
                norm_value = normalize_value(value)
                if norm_key and norm_value:
                    key_counts[norm_value][norm_key] += 1
        # Most frequent key wins; ties go to the alphabetically first key, for stable output.
        self.key_of = {
            value: min(counts.items(), key=lambda item: (-item[1], item[0]))[0]
            for value, counts in key_counts.items()
            if len(value) >= MIN_TITLE_VALUE_CHARS
        }
        alternatives = sorted(self.key_of, key=lambda value: (-len(value), value))
        self.pattern = (
            re.compile(r"(?<![a-z0-9])(" + "|".join(re.escape(value) for value in alternatives) + r")(?![a-z0-9])")
            if alternatives
            else None
        )

    def find(self, title: str) -> dict[str, str]:
        if self.pattern is None:
            return {}
        found: dict[str, str] = {}
        for match in self.pattern.finditer(normalize_value(title)):
            found.setdefault(self.key_of[match.group(1)], match.group(1))
        return found


def annotate_listings(teacher: AttributeTeacher, listings: pl.DataFrame, vocabulary: set[str] | None = None) -> pl.DataFrame:
    """Run ``teacher`` on ``listings`` and parse every output strictly (see :func:`attribute_table`)."""
    raw_texts = teacher.annotate(listings)
    if len(raw_texts) != listings.height:
        raise ValueError(f"teacher {teacher.name}@{teacher.version} wrote {len(raw_texts)} outputs for {listings.height} listings")
    return attribute_table(listings["listing_id"].to_list(), raw_texts, f"{teacher.name}@{teacher.version}", vocabulary)


def attribute_table(
    listing_ids: list[str], raw_texts: list[str], writer: str, vocabulary: set[str] | None = None
) -> pl.DataFrame:
    """One row per listing in :data:`ATTRIBUTE_TABLE_SCHEMA`, whoever wrote the texts.

    Keeps the raw text, the canonical JSON (null when the output is invalid), the parse error
    (null when valid), the number of attributes and the writer (``name@version``). With
    ``vocabulary``, outputs using keys outside it are invalid.
    """
    rows = []
    for listing_id, raw in zip(listing_ids, raw_texts):
        parsed = parse_attributes(raw, vocabulary)
        rows.append(
            {
                "listing_id": listing_id,
                "raw_text": raw,
                "attributes_json": attributes_to_json(parsed.attributes) if parsed.is_valid else None,
                "is_valid": parsed.is_valid,
                "error": parsed.error,
                "num_attributes": len(parsed.attributes) if parsed.is_valid else 0,
                "teacher": writer,
            }
        )
    return pl.DataFrame(rows, schema=ATTRIBUTE_TABLE_SCHEMA)
