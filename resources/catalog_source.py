"""The catalog source resource: which catalog the pipeline ingests."""

import dagster as dg
from pydantic import Field

from afmrl_dagster.catalog.schema import CatalogBatch
from afmrl_dagster.catalog.source import list_product_lines, load_product_line
from afmrl_dagster.settings import DEFAULT_CATALOG

from .storage import ArtifactStore


class CatalogSource(dg.ConfigurableResource):
    """``builtin`` (default; inline size as ``builtin:families=2,siblings=3,listings=4``),
    ``<loader>:<root>`` for a real dataset, or ``parquet:<folder or s3://...>`` for your own catalog."""

    spec: str = Field(default=DEFAULT_CATALOG, description="Catalog source spec, e.g. builtin, grocery:/data/grocery_store, parquet:s3://bucket/catalog")
    store: ArtifactStore = Field(description="Gives the S3 endpoint and credentials for parquet:s3://... sources.")

    def _s3_options(self) -> dict:
        return {
            "endpoint_url": self.store.endpoint_url,
            "region_name": self.store.region_name,
            "access_key_id": self.store.access_key_id,
            "secret_access_key": self.store.secret_access_key,
        }

    def product_lines(self) -> list[str]:
        return list_product_lines(self.spec, s3_options=self._s3_options())

    def load_line(self, line: str) -> CatalogBatch:
        return load_product_line(self.spec, line, s3_options=self._s3_options())
