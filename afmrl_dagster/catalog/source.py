"""Catalog sources: where product lines come from, behind one small interface.

A source is named by a spec string:

- ``builtin``: the project's own rendered catalog (the default);
- ``<loader>:<root>``: a real dataset in its own layout (``grocery:../shared/data/grocery_store``,
  ``wdc:...``, ``amazon_google:...``, ``abo:...``);
- ``parquet:<location>``: a folder or ``s3://bucket/prefix`` holding one ``<product_line>.parquet``
  per product line in the catalog schema — the layout for your own catalog.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import polars as pl

from .builtin import BuiltinCatalogConfig, generate_product_line
from .loaders import load_catalog
from .schema import CatalogBatch, CatalogValidationError, conform


@dataclass(frozen=True)
class CatalogSourceSpec:
    kind: str  # "builtin", "parquet" or a loader name
    location: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "CatalogSourceSpec":
        spec = spec.strip()
        if spec == "builtin":
            return cls("builtin")
        kind, sep, location = spec.partition(":")
        if not sep or not location:
            raise ValueError(f"catalog source {spec!r}: expected 'builtin', 'parquet:<location>' or '<loader>:<root folder>'")
        return cls(kind, location)


@functools.lru_cache(maxsize=4)
def _loaded_catalog(spec: str) -> pl.DataFrame:
    return load_catalog(spec)


def _parquet_store(location: str, s3_options: dict):
    from ..storage import open_store

    return open_store(location, **s3_options)


def list_product_lines(spec: str, builtin: BuiltinCatalogConfig | None = None, s3_options: dict | None = None) -> list[str]:
    """Every product line the source holds, sorted."""
    parsed = CatalogSourceSpec.parse(spec)
    if parsed.kind == "builtin":
        return sorted((builtin or BuiltinCatalogConfig()).product_lines)
    if parsed.kind == "parquet":
        keys = _parquet_store(parsed.location, s3_options or {}).list_keys()
        return sorted(key.removesuffix(".parquet") for key in keys if key.endswith(".parquet") and "/" not in key)
    return sorted(_loaded_catalog(spec)["product_line"].unique().to_list())


def load_product_line(
    spec: str, line: str, builtin: BuiltinCatalogConfig | None = None, s3_options: dict | None = None
) -> CatalogBatch:
    """The listings of one product line, in the catalog schema (not yet validated)."""
    parsed = CatalogSourceSpec.parse(spec)
    if parsed.kind == "builtin":
        return generate_product_line(line, builtin or BuiltinCatalogConfig())
    if parsed.kind == "parquet":
        frame = _parquet_store(parsed.location, s3_options or {}).read_parquet(f"{line}.parquet")
        return CatalogBatch(conform(frame))
    frame = _loaded_catalog(spec).filter(pl.col("product_line") == line)
    if frame.is_empty():
        raise CatalogValidationError(f"catalog source {spec!r} has no product line {line!r}")
    return CatalogBatch(frame)
