"""The token vocabulary of the compact attribute generator.

A token is a *surface string*: the JSON punctuation ``{``, ``}``, ``, ``, ``: `` or a whole
JSON-quoted key (``"colour"``) or value (``"v-neck"``). Decoding is plain concatenation, so
the generator writes exactly the canonical text of :func:`attributes_to_json` when it
follows the grammar, and text that fails :func:`parse_attributes` when it does not: invalid
outputs are real and are never repaired.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Iterable

from .format import normalize_attributes

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
OPEN, CLOSE, COMMA, COLON = "{", "}", ", ", ": "
SPECIAL_TOKENS = (PAD, BOS, EOS)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
STRUCTURE_TOKENS = (OPEN, CLOSE, COMMA, COLON)
STRUCTURE_IDS = {token: len(SPECIAL_TOKENS) + i for i, token in enumerate(STRUCTURE_TOKENS)}  # "{" 3, "}" 4, ", " 5, ": " 6
FORMAT_VERSION = 1


def _surface(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class AttributeVocabulary:
    """Tokens for the structure, every known key and every known value (keys and values apart).

    Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, then the four structure tokens, then the
    keys (sorted), then the values (sorted).
    """

    def __init__(self, keys: Iterable[str], values: Iterable[str]):
        self._keys = sorted(set(keys))
        self._values = sorted(set(values))
        self.surfaces: list[str] = [
            *SPECIAL_TOKENS,
            *STRUCTURE_TOKENS,
            *(_surface(key) for key in self._keys),
            *(_surface(value) for value in self._values),
        ]
        self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID
        self.open_id, self.close_id, self.comma_id, self.colon_id = 3, 4, 5, 6
        first_key = len(SPECIAL_TOKENS) + len(STRUCTURE_TOKENS)
        self._key_ids = {key: first_key + i for i, key in enumerate(self._keys)}
        self._value_ids = {value: first_key + len(self._keys) + i for i, value in enumerate(self._values)}

    @classmethod
    def from_attribute_sets(cls, attribute_sets: list[dict], min_count: int = 1) -> "AttributeVocabulary":
        """Keys and values (normalised) that occur in at least ``min_count`` of the training sets."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        key_counts: Counter = Counter()
        value_counts: Counter = Counter()
        for attributes in attribute_sets:
            normalised = normalize_attributes(attributes or {})
            key_counts.update(normalised.keys())
            value_counts.update(set(normalised.values()))
        return cls(
            keys=[key for key, count in key_counts.items() if count >= min_count],
            values=[value for value, count in value_counts.items() if count >= min_count],
        )

    def __len__(self) -> int:
        return len(self.surfaces)

    @property
    def keys(self) -> frozenset[str]:
        """The key vocabulary, for ``parse_attributes(text, vocabulary=...)``."""
        return frozenset(self._keys)

    @property
    def values(self) -> frozenset[str]:
        return frozenset(self._values)

    def encode_counting(self, attributes: dict, max_tokens: int | None = None) -> tuple[list[int], int]:
        """Token ids of the canonical text of ``attributes`` (no ``<bos>``/``<eos>``) and the
        number of pairs left out: pairs whose key or value is unknown, and trailing pairs that
        would make the ids plus an ``<eos>`` longer than ``max_tokens``."""
        normalised = normalize_attributes(attributes or {})
        ids = [self.open_id]
        skipped = 0
        for key, value in sorted(normalised.items()):
            if key not in self._key_ids or value not in self._value_ids:
                skipped += 1
                continue
            pair = ([self.comma_id] if len(ids) > 1 else []) + [self._key_ids[key], self.colon_id, self._value_ids[value]]
            if max_tokens is not None and len(ids) + len(pair) + 2 > max_tokens:  # + "}" + <eos>
                skipped += 1
                continue
            ids.extend(pair)
        ids.append(self.close_id)
        return ids, skipped

    def encode(self, attributes: dict, max_tokens: int | None = None) -> list[int]:
        """Token ids of the canonical text (keys sorted); unknown pairs are left out."""
        return self.encode_counting(attributes, max_tokens)[0]

    def decode(self, ids: Iterable[int]) -> str:
        """Concatenated surfaces up to the first ``<eos>``; ``<pad>`` and ``<bos>`` write nothing."""
        parts = []
        for token in ids:
            token = int(token)
            if token == self.eos_id:
                break
            if token in (self.pad_id, self.bos_id):
                continue
            parts.append(self.surfaces[token])
        return "".join(parts)

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, "keys": self._keys, "values": self._values}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "AttributeVocabulary":
        data = json.loads(text)
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"vocabulary format {data.get('format_version')!r} is not {FORMAT_VERSION}")
        return cls(keys=data["keys"], values=data["values"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AttributeVocabulary) and self.surfaces == other.surfaces

    def __repr__(self) -> str:
        return f"AttributeVocabulary({len(self._keys)} keys, {len(self._values)} values)"
