"""The canonical catalog schema, shared by every loader, asset and model.

A catalog is a polars frame with one row per *listing* (an offer, a photo, a catalog
entry). Listings of the same product share ``product_id``: that shared id is the ground
truth of identical-product retrieval. ``product_line`` is the partition key of the
pipeline (``tops``, ``bags``, ``milk`` ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import polars as pl

SELLER_ATTRIBUTE = pl.Struct({"key": pl.Utf8, "value": pl.Utf8})

CATALOG_SCHEMA: dict[str, pl.DataType] = {
    "listing_id": pl.Utf8(),
    "product_id": pl.Utf8(),
    "product_line": pl.Utf8(),
    "title": pl.Utf8(),
    "description": pl.Utf8(),
    "image_uri": pl.Utf8(),
    "seller_attributes": pl.List(SELLER_ATTRIBUTE),
    "source": pl.Utf8(),
}
REQUIRED_FIELDS: tuple[str, ...] = ("listing_id", "product_id", "product_line", "title", "source")
SLUG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")

ISSUE_SCHEMA: dict[str, pl.DataType] = {
    "row": pl.Int64(),
    "listing_id": pl.Utf8(),
    "field": pl.Utf8(),
    "problem": pl.Utf8(),
}


class CatalogValidationError(ValueError):
    """Raised when a catalog cannot be used; the message names the offending rows and fields."""


def slugify(text: str) -> str:
    """Lower-case ``text`` and keep it safe as a partition key or a file name."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")
    return re.sub(r"-{2,}", "-", slug) or "unnamed"


def empty_catalog() -> pl.DataFrame:
    return pl.DataFrame(schema=CATALOG_SCHEMA)


def make_catalog(rows: list[dict]) -> pl.DataFrame:
    """Build a catalog frame from row dicts; absent optional fields become null.

    ``seller_attributes`` may be given as a ``dict`` (key -> value) or as a list of
    ``{"key", "value"}`` records.
    """
    normalised = []
    for row in rows:
        attrs = row.get("seller_attributes")
        if isinstance(attrs, dict):
            attrs = [{"key": str(k), "value": str(v)} for k, v in attrs.items()]
        normalised.append({name: row.get(name) for name in CATALOG_SCHEMA} | {"seller_attributes": attrs})
    return pl.DataFrame(normalised, schema=CATALOG_SCHEMA)


def seller_attributes_dict(value) -> dict[str, str]:
    """Turn one ``seller_attributes`` cell (list of structs, or null) into a plain dict."""
    if not value:
        return {}
    return {item["key"]: item["value"] for item in value if item and item.get("key") and item.get("value") is not None}


def conform(frame: pl.DataFrame) -> pl.DataFrame:
    """Return ``frame`` with exactly the catalog columns, in order, cast to the catalog types.

    Raises :class:`CatalogValidationError` naming the missing columns.
    """
    missing = [name for name in CATALOG_SCHEMA if name not in frame.columns]
    if missing:
        raise CatalogValidationError(f"catalog is missing column(s) {missing}; expected {list(CATALOG_SCHEMA)}")
    try:
        return frame.select([pl.col(name).cast(dtype) for name, dtype in CATALOG_SCHEMA.items()])
    except pl.exceptions.PolarsError as error:  # a column of the wrong type
        raise CatalogValidationError(f"catalog column types do not match the schema: {error}") from error


@dataclass
class ValidationReport:
    """The outcome of :func:`validate_catalog`: the clean rows and one record per problem."""

    valid: pl.DataFrame
    issues: pl.DataFrame
    total_rows: int

    @property
    def bad_rows(self) -> int:
        return self.total_rows - self.valid.height

    @property
    def bad_share(self) -> float:
        return self.bad_rows / self.total_rows if self.total_rows else 0.0

    def describe(self, limit: int = 10) -> str:
        lines = [
            f"row {r['row']} (listing_id={r['listing_id']!r}) field {r['field']!r}: {r['problem']}"
            for r in self.issues.head(limit).iter_rows(named=True)
        ]
        if self.issues.height > limit:
            lines.append(f"... and {self.issues.height - limit} more problem(s)")
        return "\n".join(lines)

    def raise_if_above(self, max_bad_share: float) -> None:
        """Fail when more than ``max_bad_share`` of the rows are bad (0.0 = any bad row fails)."""
        if self.bad_rows and self.bad_share > max_bad_share:
            raise CatalogValidationError(
                f"{self.bad_rows} of {self.total_rows} listings ({self.bad_share:.1%}) failed validation, "
                f"above the allowed share of {max_bad_share:.1%}:\n{self.describe()}"
            )


@dataclass
class _IssueCollector:
    records: list[dict] = field(default_factory=list)

    def add(self, row: int, listing_id, field_name: str, problem: str) -> None:
        self.records.append({"row": row, "listing_id": listing_id, "field": field_name, "problem": problem})

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame(self.records, schema=ISSUE_SCHEMA)


def validate_catalog(frame: pl.DataFrame, extra_issues: list[dict] | None = None) -> ValidationReport:
    """Check every row of a catalog and name each offending row and field.

    Checks: required fields present and non-blank, unique ``listing_id`` (every
    occurrence after the first is flagged), slug-safe ``product_line``, no text field
    carrying U+FFFD (the mark of text that was not valid UTF-8 when decoded),
    seller attributes with a key and a value. ``extra_issues`` (records with ``row``,
    ``listing_id``, ``field``, ``problem``) come from checks that need I/O, such as image
    decoding, and mark their rows bad too.
    """
    frame = conform(frame)
    issues = _IssueCollector()
    seen: dict[str, int] = {}
    for row_index, row in enumerate(frame.iter_rows(named=True)):
        listing_id = row["listing_id"]
        for name in REQUIRED_FIELDS:
            value = row[name]
            if value is None or not str(value).strip():
                issues.add(row_index, listing_id, name, "required field is missing or blank")
        if listing_id is not None:
            if listing_id in seen:
                issues.add(row_index, listing_id, "listing_id", f"duplicate of row {seen[listing_id]}")
            else:
                seen[listing_id] = row_index
        line = row["product_line"]
        if line and not SLUG_PATTERN.match(line):
            issues.add(row_index, listing_id, "product_line", f"{line!r} is not a slug ([a-z0-9_-])")
        for name in ("title", "description", "product_id"):
            if row[name] and "\ufffd" in row[name]:
                issues.add(row_index, listing_id, name, "text is not valid UTF-8 (replacement character found)")
        for item in row["seller_attributes"] or []:
            if not item or not item.get("key") or item.get("value") is None:
                issues.add(row_index, listing_id, "seller_attributes", f"attribute without key or value: {item}")
    for extra in extra_issues or []:
        issues.add(extra["row"], extra["listing_id"], extra["field"], extra["problem"])
    issue_frame = issues.frame()
    bad_rows = set(issue_frame["row"].to_list())
    valid = frame.with_row_index("_row").filter(~pl.col("_row").is_in(list(bad_rows))).drop("_row")
    return ValidationReport(valid=valid, issues=issue_frame, total_rows=frame.height)


@dataclass
class CatalogBatch:
    """Listings of one product line as a source yields them.

    ``images`` holds encoded image bytes for listings whose image does not exist as a file
    yet (the built-in catalog renders its images in memory); ``raw_catalog`` stores them and
    fills in ``image_uri``.
    """

    listings: pl.DataFrame
    images: dict[str, bytes] = field(default_factory=dict)
