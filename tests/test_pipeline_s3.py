"""A product line ingested, annotated and featurised with every table, image and cache in a
real S3 server (SeaweedFS on loopback), through the same resources users configure."""

import dagster as dg

from afmrl_dagster.definitions import build_definitions
from afmrl_dagster.resources.storage import ArtifactStore
from pipeline_fixtures import tiny_resources


def test_catalog_refresh_runs_against_real_s3(s3_server, tmp_path):
    s3_server.client().create_bucket(Bucket="catalog-s3-test")
    store = ArtifactStore(location="s3://catalog-s3-test/afmrl", **s3_server.store_options())
    definitions = build_definitions(tiny_resources(tmp_path, store=store))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("product_lines", ["mugs"])
        result = definitions.resolve_job_def("catalog_refresh_job").execute_in_process(instance=instance, partition_key="mugs")
        assert result.success

    keys = set(store.open().list_keys())
    assert {"tables/raw_catalog/mugs.parquet", "tables/teacher_attributes/mugs.parquet", "tables/listing_features/mugs.parquet"} <= keys
    catalog = store.open().read_parquet("tables/raw_catalog/mugs.parquet")
    assert catalog["image_uri"].str.starts_with("s3://catalog-s3-test/afmrl/images/mugs/").all()
    assert sum(key.startswith("images/mugs/") for key in keys) == catalog.height
    features = store.open().read_parquet("tables/listing_features/mugs.parquet")
    assert features["has_image"].all() and features.height == catalog.height
    objects = s3_server.client().list_objects_v2(Bucket="catalog-s3-test", Prefix="afmrl/tables/")
    assert objects["KeyCount"] >= 3
