"""Catalog sources: where product lines come from, behind one small interface.

A source is named by a spec string:

- ``builtin``: the project's own rendered catalog (the default); its size and lines can be
  given inline: ``builtin:families=2,siblings=3,listings=4,seed=1,lines=tops+mugs``;
- ``<loader>:<root>``: a real dataset in its own layout (``grocery:../shared/data/grocery_store``,
  ``wdc:...``, ``amazon_google:...``, ``abo:...``);
- ``parquet:<location>``: a folder or ``s3://bucket/prefix`` holding one ``<product_line>.parquet``
  per product line in the catalog schema — the layout for your own catalog.
"""

from __future__ import annotations

import dataclasses
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
        if kind == "builtin":
            return cls("builtin", location or None)
        if not sep or not location:
            raise ValueError(f"catalog source {spec!r}: expected 'builtin', 'parquet:<location>' or '<loader>:<root folder>'")
        return cls(kind, location)


_BUILTIN_PARAMETERS = {
    "families": "families_per_line",
    "siblings": "siblings_per_family",
    "listings": "listings_per_product",
    "seed": "seed",
    "size": "image_size",
}


def catalog_roots(spec: str) -> list[str]:
    """The location a source declares for its listings' images: a loader's root folder or a
    ``parquet:`` folder / S3 prefix; none for ``builtin`` (its images are rendered into the store)."""
    parsed = CatalogSourceSpec.parse(spec)
    return [] if parsed.kind == "builtin" else [parsed.location]


def builtin_config(spec: str, base: BuiltinCatalogConfig | None = None) -> BuiltinCatalogConfig:
    """``base`` with the inline parameters of a ``builtin:...`` spec applied."""
    base = base or BuiltinCatalogConfig()
    parameters = CatalogSourceSpec.parse(spec).location
    if not parameters:
        return base
    changes: dict = {}
    for item in parameters.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if name == "lines" and sep:
            changes["product_lines"] = tuple(line.strip() for line in value.split("+") if line.strip())
        elif name in _BUILTIN_PARAMETERS and sep and value.strip().isdigit():
            changes[_BUILTIN_PARAMETERS[name]] = int(value)
        else:
            raise ValueError(
                f"catalog source {spec!r}: cannot read {item!r}; expected name=integer with name in "
                f"{sorted(_BUILTIN_PARAMETERS)}, or lines=a+b"
            )
    return dataclasses.replace(base, **changes)


@functools.lru_cache(maxsize=4)
def _loaded_catalog(spec: str) -> pl.DataFrame:
    return load_catalog(spec)


def _parquet_store(location: str, s3_options: dict):
    from ..storage import open_store

    return open_store(location, **s3_options)


def list_product_lines(spec: str, s3_options: dict | None = None, builtin: BuiltinCatalogConfig | None = None) -> list[str]:
    """Every product line the source holds, sorted."""
    parsed = CatalogSourceSpec.parse(spec)
    if parsed.kind == "builtin":
        return sorted(builtin_config(spec, builtin).product_lines)
    if parsed.kind == "parquet":
        keys = _parquet_store(parsed.location, s3_options or {}).list_keys()
        return sorted(key.removesuffix(".parquet") for key in keys if key.endswith(".parquet") and "/" not in key)
    return sorted(_loaded_catalog(spec)["product_line"].unique().to_list())


def load_product_line(
    spec: str, line: str, s3_options: dict | None = None, builtin: BuiltinCatalogConfig | None = None
) -> CatalogBatch:
    """The listings of one product line, in the catalog schema (not yet validated)."""
    parsed = CatalogSourceSpec.parse(spec)
    if parsed.kind == "builtin":
        return generate_product_line(line, builtin_config(spec, builtin))
    if parsed.kind == "parquet":
        frame = _parquet_store(parsed.location, s3_options or {}).read_parquet(f"{line}.parquet")
        return CatalogBatch(conform(frame))
    frame = _loaded_catalog(spec).filter(pl.col("product_line") == line)
    if frame.is_empty():
        raise CatalogValidationError(f"catalog source {spec!r} has no product line {line!r}")
    return CatalogBatch(frame)
