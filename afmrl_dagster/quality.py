"""Data-quality suites run with Great Expectations 1.x on polars frames.

Each ``*_expectations`` function returns the expectations of one stage; ``validate_frame``
runs them and returns a plain report that the Dagster checks turn into check results
(dagster-ge supports only GX < 1.0, so the checks call GX directly).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import polars as pl

from .catalog.schema import CATALOG_SCHEMA, REQUIRED_FIELDS

_batch_counter = itertools.count()


@dataclass
class ExpectationOutcome:
    expectation: str
    column: str | None
    success: bool
    details: dict = field(default_factory=dict)


@dataclass
class QualityReport:
    suite: str
    outcomes: list[ExpectationOutcome]

    @property
    def passed(self) -> bool:
        return all(outcome.success for outcome in self.outcomes)

    def failures(self) -> list[ExpectationOutcome]:
        return [outcome for outcome in self.outcomes if not outcome.success]

    def as_metadata(self) -> dict:
        """Flat, readable summary for a check result."""
        return {
            "suite": self.suite,
            "expectations": len(self.outcomes),
            "failed": [f"{o.expectation}({o.column or ''}): {o.details}" for o in self.failures()],
        }


@functools.lru_cache(maxsize=1)
def _gx_context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def validate_frame(frame: pl.DataFrame, suite_name: str, expectations: list) -> QualityReport:
    """Run GX ``expectations`` against ``frame`` (converted to pandas keeping nullable types)."""
    import great_expectations as gx

    context = _gx_context()
    name = f"{suite_name}-{next(_batch_counter)}"
    source = context.data_sources.add_pandas(name)
    batch_definition = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
    # GX reads pandas only; the pyarrow-backed conversion keeps nullable ints as ints.
    scalar_columns = [c for c, dtype in frame.schema.items() if not isinstance(dtype, (pl.List, pl.Array, pl.Struct))]
    batch = batch_definition.get_batch(
        batch_parameters={"dataframe": frame.select(scalar_columns).to_pandas(use_pyarrow_extension_array=True)}
    )
    suite = gx.ExpectationSuite(name=name)
    for expectation in expectations:
        suite.add_expectation(expectation)
    result = batch.validate(suite)
    context.data_sources.delete(name)
    outcomes = []
    for item in result.results:
        config = item.expectation_config
        details = {
            key: value
            for key, value in (item.result or {}).items()
            if key in ("observed_value", "unexpected_count", "unexpected_percent", "partial_unexpected_list")
        }
        outcomes.append(ExpectationOutcome(config.type, config.kwargs.get("column"), bool(item.success), details))
    return QualityReport(suite_name, outcomes)


def catalog_expectations() -> list:
    import great_expectations as gx

    scalar_columns = [c for c, dtype in CATALOG_SCHEMA.items() if not isinstance(dtype, pl.List)]
    expectations = [
        gx.expectations.ExpectTableColumnsToMatchSet(column_set=scalar_columns, exact_match=True),
        gx.expectations.ExpectColumnValuesToBeUnique(column="listing_id"),
        gx.expectations.ExpectColumnValuesToMatchRegex(column="product_line", regex=r"^[a-z0-9][a-z0-9_-]*$"),
        gx.expectations.ExpectTableRowCountToBeBetween(min_value=1),
    ]
    expectations += [gx.expectations.ExpectColumnValuesToNotBeNull(column=name) for name in REQUIRED_FIELDS]
    return expectations


def attribute_expectations(min_valid_share: float) -> list:
    """Over an attribute table: one row per listing, at least ``min_valid_share`` parsed."""
    import great_expectations as gx

    return [
        gx.expectations.ExpectColumnValuesToBeUnique(column="listing_id"),
        gx.expectations.ExpectColumnValuesToBeInSet(column="is_valid", value_set=[True], mostly=min_valid_share),
    ]


def attribute_key_expectations(vocabulary: set[str], mostly: float = 0.99) -> list:
    """Over a frame with one ``key`` per row: keys come from the line's vocabulary."""
    import great_expectations as gx

    return [gx.expectations.ExpectColumnValuesToBeInSet(column="key", value_set=sorted(vocabulary), mostly=mostly)]


def embedding_expectations(expected_rows: int, norm_tolerance: float = 1e-3) -> list:
    """Over a frame with ``listing_id``, ``norm`` and ``is_finite`` per embedding."""
    import great_expectations as gx

    return [
        gx.expectations.ExpectTableRowCountToEqual(value=expected_rows),
        gx.expectations.ExpectColumnValuesToBeUnique(column="listing_id"),
        gx.expectations.ExpectColumnValuesToBeInSet(column="is_finite", value_set=[True]),
        gx.expectations.ExpectColumnValuesToBeBetween(column="norm", min_value=1 - norm_tolerance, max_value=1 + norm_tolerance),
    ]


def metric_expectations(bounds: dict[str, tuple[float, float]]) -> list:
    """Over a one-row frame of metrics: each metric within its (min, max) bounds."""
    import great_expectations as gx

    return [
        gx.expectations.ExpectColumnValuesToBeBetween(column=name, min_value=low, max_value=high)
        for name, (low, high) in bounds.items()
    ]
