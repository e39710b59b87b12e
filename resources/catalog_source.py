"""The catalog source resource: which catalog the pipeline ingests."""


import dagster as dg
from pydantic import Field

from afmrl_dagster.catalog.builtin import BuiltinCatalogConfig
from afmrl_dagster.catalog.schema import CatalogBatch
from afmrl_dagster.catalog.source import list_product_lines, load_product_line

from .storage import ArtifactStore


class CatalogSource(dg.ConfigurableResource):
    """``builtin`` (default), ``<loader>:<root>`` for a real dataset, or ``parquet:<folder or s3://...>``."""

    spec: str = Field(default="builtin", description="Catalog source spec, e.g. builtin, grocery:/data/grocery_store, parquet:s3://bucket/catalog")
    builtin_seed: int = Field(default=0, description="Seed of the built-in catalog.")
    builtin_families_per_line: int = Field(default=6, description="Built-in catalog: design families per product line.")
    builtin_siblings_per_family: int = Field(default=5, description="Built-in catalog: near-identical products per family.")
    builtin_listings_per_product: int = Field(default=5, description="Built-in catalog: listings (photos + titles) per product.")
    store: ArtifactStore = Field(description="Gives the S3 endpoint and credentials for parquet:s3://... sources.")

    def builtin_config(self) -> BuiltinCatalogConfig:
        return BuiltinCatalogConfig(
            seed=self.builtin_seed,
            families_per_line=self.builtin_families_per_line,
            siblings_per_family=self.builtin_siblings_per_family,
            listings_per_product=self.builtin_listings_per_product,
        )

    def _s3_options(self) -> dict:
        return {
            "endpoint_url": self.store.endpoint_url,
            "region_name": self.store.region_name,
            "access_key_id": self.store.access_key_id,
            "secret_access_key": self.store.secret_access_key,
        }

    def product_lines(self) -> list[str]:
        return list_product_lines(self.spec, self.builtin_config(), self._s3_options())

    def load_line(self, line: str) -> CatalogBatch:
        return load_product_line(self.spec, line, self.builtin_config(), self._s3_options())
