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


def test_server_gone_mid_run_fails_clearly_and_a_retry_completes(tmp_path):
    """SeaweedFS is killed while raw_catalog uploads a line's images: the run fails naming the
    endpoint, no table is left half-written, and once the server is back a retry completes."""
    import contextlib
    import os
    import signal
    import threading
    import time

    from afmrl_dagster.apps.demo import failure_messages
    from s3_server import running_s3_server

    folder, bucket = tmp_path / "weed", "flaky-s3-test"
    spec = "builtin:families=8,siblings=3,listings=4,lines=mugs"
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(running_s3_server(folder))
        server.client().create_bucket(Bucket=bucket)
        store = ArtifactStore(location=f"s3://{bucket}/afmrl", **server.store_options())
        definitions = build_definitions(tiny_resources(tmp_path, catalog_spec=spec, store=store))
        killed = threading.Event()

        def kill_after_first_image() -> None:
            client, deadline = server.client(), time.monotonic() + 120
            while time.monotonic() < deadline:
                listed = client.list_objects_v2(Bucket=bucket, Prefix="afmrl/images/mugs/")
                if listed["KeyCount"] >= 1:
                    os.kill(server.pid, signal.SIGKILL)
                    killed.set()
                    return
                time.sleep(0.02)

        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions("product_lines", ["mugs"])
            job = definitions.resolve_job_def("catalog_refresh_job")
            killer = threading.Thread(target=kill_after_first_image, daemon=True)
            killer.start()
            result = job.execute_in_process(instance=instance, partition_key="mugs", raise_on_error=False)
            killer.join(timeout=30)
            assert killed.is_set() and not result.success
            message = failure_messages(result)
            assert f"cannot reach S3 endpoint {server.endpoint_url}" in message, message[-2000:]
            assert instance.get_latest_materialization_event(dg.AssetKey("raw_catalog")) is None
            stack.close()  # the dead server's cleanup

            with running_s3_server(folder, ports=server.ports) as again:
                assert again.endpoint_url == server.endpoint_url
                keys = set(store.open().list_keys())
                assert not any(key.startswith("tables/") for key in keys), sorted(keys)[:5]  # nothing half-written
                retried = job.execute_in_process(instance=instance, partition_key="mugs", raise_on_error=False)
                assert retried.success, failure_messages(retried)
                catalog = store.open().read_parquet("tables/raw_catalog/mugs.parquet")
                assert catalog.height == 8 * 3 * 4
                assert store.open().read_parquet("tables/listing_features/mugs.parquet").height == catalog.height
