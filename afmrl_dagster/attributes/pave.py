"""WDC-PAVE: product offers with gold attribute values, an external check of the attribute
step (how well a generator writes the attributes people annotated)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from ..catalog.loaders import CatalogLoadError, load_error, read_lines, require_path
from .format import normalize_attributes

PAVE_FILE = "train_large.jsonl"
NOT_APPLICABLE = "n/a"


def load_wdc_pave(path: str | Path) -> pl.DataFrame:
    """One row per offer: ``listing_id``, ``product_id`` (cluster), ``category``, ``title``,
    ``description`` and ``gold_json`` (normalised ``{key: value}``; keys marked ``n/a`` are
    left out, and of several annotated values the first is kept).

    ``path`` is the JSON-lines file or the folder holding ``train_large.jsonl``.
    """
    path = Path(path)
    file = require_path(path / PAVE_FILE if path.is_dir() else path, "WDC-PAVE file")
    rows = []
    for number, text in read_lines(file):
        if not text.strip():
            continue
        try:
            offer = json.loads(text)
            scores = offer["target_scores"]
            title = offer["input_title"]
        except (ValueError, KeyError, TypeError) as error:
            raise load_error(file, number, f"not a WDC-PAVE offer ({error!r})") from None
        gold = {key: next(iter(values)) for key, values in scores.items()
                if isinstance(values, dict) and values and next(iter(values)) != NOT_APPLICABLE}
        rows.append({
            "listing_id": f"pave-{offer.get('id', number)}",
            "product_id": str(offer.get("cluster_id", offer.get("id", number))),
            "category": offer.get("category") or "unknown",
            "title": title,
            "description": offer.get("input_description"),
            "gold_json": json.dumps(normalize_attributes(gold), sort_keys=True),
        })
    if not rows:
        raise CatalogLoadError(f"{file}: no offers")
    return pl.DataFrame(rows)
