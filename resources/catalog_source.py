"""The catalog source resource: which catalog the pipeline ingests."""

import dagster as dg
from pydantic import Field

from afmrl_dagster.catalog.schema import CatalogBatch
from afmrl_dagster.catalog.source import catalog_roots, list_product_lines, load_product_line
from afmrl_dagster.settings import DEFAULT_CATALOG
from afmrl_dagster.storage import UriRoots

from .storage import ArtifactStore


class CatalogSource(dg.ConfigurableResource):
    """``builtin`` (default; inline size as ``builtin:families=2,siblings=3,listings=4``),
    ``<loader>:<root>`` for a real dataset, or ``parquet:<folder or s3://...>`` for your own catalog."""

    spec: str = Field(default=DEFAULT_CATALOG, description="Catalog source spec, e.g. builtin, grocery:/data/grocery_store, parquet:s3://bucket/catalog")
    store: ArtifactStore = Field(description="Gives the S3 endpoint and credentials for parquet:s3://... sources.")
    image_roots: list[str] = Field(
        default_factory=list,
        description="Folders or s3://bucket/prefix that listings' image_uri may point into, besides the catalog's own "
                    "location and the store's images/ (AFMRL_IMAGE_ROOTS). Any other image_uri is quarantined unread.",
    )

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

    def uri_roots(self) -> UriRoots:
        """Where this catalog's image URIs may point: its own location, the store's rendered
        images and the declared ``image_roots``."""
        return UriRoots([*catalog_roots(self.spec), self.store.open().uri("images"), *self.image_roots])
