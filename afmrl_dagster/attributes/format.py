"""Attributes as strict JSON text: the one format every teacher and generator writes.

An attribute set is a flat JSON object of short ``key: value`` facts, e.g.
``{"colour": "red", "neckline": "v-neck"}``. Keys and values are normalised (case,
whitespace, units, synonyms) so that two writers of the same fact produce the same text,
which matters both for BM25 overlap in AGCL and for exact-match accuracy of the student.
Anything that does not parse is reported with its reason, never raised.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

Attributes = dict[str, str]

MAX_KEYS = 16
MAX_VALUE_CHARS = 64

KEY_SYNONYMS = {
    "color": "colour",
    "colour_name": "colour",
    "main_colour": "colour",
    "handle_shape": "handle",
    "neck": "neckline",
    "neck_line": "neckline",
    "size_name": "size",
    "sleeve_length": "sleeve",
    "sleeves": "sleeve",
    "brand_name": "brand",
    "manufacturer": "brand",
    "print": "pattern",
    "text": "printed_text",
    "logo": "printed_text",
}
VALUE_SYNONYMS = {
    "grey": "gray",
    "vneck": "v-neck",
    "v neck": "v-neck",
    "crew neck": "round-neck",
    "crewneck": "round-neck",
    "round neck": "round-neck",
    "striped": "stripes",
    "stripe": "stripes",
    "dotted": "dots",
    "polka dots": "dots",
    "polka-dot": "dots",
    "plain": "solid",
}
_UNIT_PATTERN = re.compile(r"(\d+(?:[.,]\d+)?)\s*(ml|l|cl|g|kg|oz|cm|mm|%)\b", re.IGNORECASE)


def normalize_key(key: str) -> str:
    key = re.sub(r"[^a-z0-9]+", "_", key.strip().lower()).strip("_")
    return KEY_SYNONYMS.get(key, key)


def normalize_value(value: str) -> str:
    value = re.sub(r"\s+", " ", str(value).strip().lower())
    value = _UNIT_PATTERN.sub(lambda m: f"{m.group(1).replace(',', '.')} {m.group(2).lower()}", value)
    return VALUE_SYNONYMS.get(value, value)


def normalize_attributes(attributes: dict) -> Attributes:
    """Normalise keys and values; empty values and ``n/a`` are dropped; first key wins."""
    out: Attributes = {}
    for key, value in attributes.items():
        if value is None:
            continue
        norm_key, norm_value = normalize_key(str(key)), normalize_value(str(value))
        if norm_key and norm_value and norm_value not in {"n/a", "na", "none", "null"} and norm_key not in out:
            out[norm_key] = norm_value
    return out


def attributes_to_json(attributes: Attributes) -> str:
    """Canonical text of an attribute set: normalised, keys sorted, compact JSON."""
    normalised = normalize_attributes(attributes)
    return json.dumps(dict(sorted(normalised.items())), ensure_ascii=False, separators=(", ", ": "))


def attributes_to_text(attributes: Attributes) -> str:
    """The phrase appended to a listing's text for the encoder: ``colour: red; size: m``."""
    return "; ".join(f"{key.replace('_', ' ')}: {value}" for key, value in sorted(attributes.items()))


@dataclass(frozen=True)
class ParsedAttributes:
    """Result of :func:`parse_attributes`: ``attributes`` is ``None`` exactly when ``error`` is set."""

    attributes: Attributes | None
    error: str | None = None

    @property
    def is_valid(self) -> bool:
        return self.error is None


def parse_attributes(text: str | None, vocabulary: set[str] | frozenset[str] | None = None) -> ParsedAttributes:
    """Parse generated text into attributes, strictly.

    Valid output is one JSON object (surrounding whitespace and a Markdown code fence are
    tolerated, as chat models add them) whose values are strings or numbers, with at most
    ``MAX_KEYS`` keys; with a ``vocabulary``, every normalised key must belong to it.
    """
    if text is None or not text.strip():
        return ParsedAttributes(None, "empty output")
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.DOTALL)
    if fence:
        body = fence.group(1)
    try:
        value = json.loads(body)
    except json.JSONDecodeError as error:
        return ParsedAttributes(None, f"not JSON: {error.msg} at char {error.pos}")
    if not isinstance(value, dict):
        return ParsedAttributes(None, f"expected a JSON object, got {type(value).__name__}")
    if len(value) > MAX_KEYS:
        return ParsedAttributes(None, f"{len(value)} keys, more than {MAX_KEYS}")
    for key, item in value.items():
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            return ParsedAttributes(None, f"value of {key!r} is {type(item).__name__}, expected a string")
        if len(str(item)) > MAX_VALUE_CHARS:
            return ParsedAttributes(None, f"value of {key!r} is longer than {MAX_VALUE_CHARS} characters")
    attributes = normalize_attributes(value)
    if vocabulary is not None:
        unknown = sorted(set(attributes) - set(vocabulary))
        if unknown:
            return ParsedAttributes(None, f"key(s) {unknown} not in the vocabulary")
    return ParsedAttributes(attributes)


def listing_text(title: str, attributes: Attributes | None = None) -> str:
    """The text the encoder reads for a listing: its title, then its attributes if any."""
    title = (title or "").strip()
    if not attributes:
        return title
    return f"{title} | {attributes_to_text(attributes)}"
