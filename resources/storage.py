"""The artefact store resource: one place for tables, images and model artefacts."""


import functools
from typing import Optional

import dagster as dg
from pydantic import Field

from afmrl_dagster.settings import DEFAULT_STORE
from afmrl_dagster.storage import ObjectStore, open_store, read_uri_bytes


@functools.lru_cache(maxsize=8)
def _open_cached(location, endpoint_url, region_name, access_key_id, secret_access_key) -> ObjectStore:
    return open_store(
        location,
        endpoint_url=endpoint_url,
        region_name=region_name,
        access_key_id=access_key_id,
        secret_access_key=secret_access_key,
    )


class ArtifactStore(dg.ConfigurableResource):
    """A local folder (the default) or an S3 prefix (``s3://bucket/prefix``) reached through boto3.

    Credentials come from ``dg.EnvVar`` values or boto3's default chain; nothing secret is
    stored in run configuration.
    """

    location: str = Field(default=DEFAULT_STORE, description="Local folder or s3://bucket/prefix.")
    endpoint_url: Optional[str] = Field(default=None, description="S3 endpoint (MinIO, SeaweedFS, ...); None = AWS.")
    region_name: Optional[str] = Field(default=None, description="S3 region.")
    access_key_id: Optional[str] = Field(default=None, description="S3 access key; None = boto3's default chain.")
    secret_access_key: Optional[str] = Field(default=None, description="S3 secret key.")

    def open(self) -> ObjectStore:
        return _open_cached(self.location, self.endpoint_url, self.region_name, self.access_key_id, self.secret_access_key)

    def read_uri(self, uri: str) -> bytes:
        """Bytes of a local path or an ``s3://`` URI (with this store's endpoint and credentials)."""
        return read_uri_bytes(uri, s3_client=getattr(self.open(), "client", None))
