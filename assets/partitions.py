"""Product lines are the unit of ingestion, backfills and refreshes: one dynamic partition each."""

import dagster as dg

product_lines = dg.DynamicPartitionsDefinition(name="product_lines")
