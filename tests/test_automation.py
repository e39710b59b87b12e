"""A new product line dropped into the S3 catalog source flows on by itself: `dagster dev`'s
daemon runs the new-product-line sensor (partition added, line ingested) and declarative
automation (its attributes and embeddings, then the index, the evaluation and the promotion
decision), against a real S3 server and a real MLflow server, with nobody clicking."""

from __future__ import annotations

import time

import dagster as dg
import polars as pl

from afmrl_dagster.catalog.builtin import generate_product_line
from afmrl_dagster.catalog.source import builtin_config
from afmrl_dagster.definitions import build_definitions
from afmrl_dagster.apps.demo import materialize_pipeline
from afmrl_dagster.storage import open_store

from conftest import REPO_ROOT
from dagster_server import running_dagster_dev
from mlflow_server import running_mlflow_server
from pipeline_fixtures import TINY_CONFIG

LINES = "builtin:families=3,siblings=3,listings=3,lines=mugs+tops"


def publish_line(catalog_store, line: str) -> int:
    """Write one product line as a retailer would: images and a parquet file in the bucket."""
    batch = generate_product_line(line, builtin_config(LINES))
    uris = []
    for listing_id in batch.listings["listing_id"].to_list():
        key = f"images/{line}/{listing_id}.jpg"
        catalog_store.put_bytes(key, batch.images[listing_id])
        uris.append(catalog_store.uri(key))
    catalog_store.write_parquet(f"{line}.parquet", batch.listings.with_columns(pl.Series("image_uri", uris)))
    return batch.listings.height


def latest_storage_id(instance, asset: str, partition: str | None = None) -> int | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None), limit=1
    ).records
    return records[0].storage_id if records else None


def test_new_line_in_s3_flows_to_the_index_and_evaluation_without_a_click(s3_server, tmp_path, monkeypatch):
    bucket = "automation-test"
    s3_server.client().create_bucket(Bucket=bucket)
    catalog_store = open_store(f"s3://{bucket}/catalog", **s3_server.store_options())
    first = publish_line(catalog_store, "mugs")

    with running_mlflow_server(tmp_path / "mlflow") as mlflow_server:
        env = {
            "AFMRL_CATALOG": f"parquet:s3://{bucket}/catalog",
            "AFMRL_STORE": f"s3://{bucket}/afmrl",
            "AFMRL_S3_ENDPOINT_URL": s3_server.endpoint_url,
            "AWS_ACCESS_KEY_ID": s3_server.access_key,
            "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
            "AWS_REGION": s3_server.region_name,
            "MLFLOW_TRACKING_URI": mlflow_server.url,
            "AFMRL_AUTOMATION": "on",
            "AFMRL_SENSOR_INTERVAL_SECONDS": "5",
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        home = tmp_path / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
        definitions = build_definitions()  # what `dagster dev` loads from the same environment

        with dg.instance_for_test(temp_dir=str(home)) as instance:
            # The first line, trained and indexed as a team would before switching automation on.
            materialize_pipeline(definitions, instance, TINY_CONFIG, log=lambda _: None)
            before = {asset: latest_storage_id(instance, asset) for asset in ("retrieval_index", "retrieval_evaluation", "encoder_promotion")}
            trained = {asset: latest_storage_id(instance, asset) for asset in ("agcl_encoder", "attribute_generator")}

            second = publish_line(catalog_store, "tops")  # the retailer adds a product line
            with running_dagster_dev(home, env, tmp_path, timeout=180):
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    done = "tops" in instance.get_dynamic_partitions("product_lines") and all(
                        (latest_storage_id(instance, asset) or -1) > (before[asset] or -1) for asset in before
                    ) and latest_storage_id(instance, "catalog_embeddings", "tops") is not None
                    failed = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
                    assert not failed, f"a run failed: {[run.job_name for run in failed]} (see {tmp_path / 'dagster-dev.log'})"
                    if done:
                        break
                    time.sleep(3)
                else:
                    raise AssertionError(f"the new line did not reach the evaluation within 10 min; runs: "
                                         f"{[(r.job_name, r.status.value) for r in instance.get_runs()]}")
                # Let the evaluation's run finish writing (the promotion follows it in the same run).
                while instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.QUEUED])):
                    assert time.monotonic() < deadline + 120, "runs still in progress"
                    time.sleep(2)
                # A run that failed after the loop saw its asset materialised (a blocking check fails the step
                # after the materialisation is recorded) fails the test too.
                failed = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
                assert not failed, f"a run failed: {[run.job_name for run in failed]} (see {tmp_path / 'dagster-dev.log'})"

            index = definitions.load_asset_value("retrieval_index", instance=instance)
            assert index["rows"] == first + second  # the served index gained the new line's listings
            evaluation = instance.get_latest_materialization_event(dg.AssetKey("retrieval_evaluation")).asset_materialization
            assert evaluation.metadata["gallery"].value == first + second
            promotion = definitions.load_asset_value("encoder_promotion", instance=instance)
            assert promotion["evaluation_set"] == evaluation.metadata["evaluation_set"].value
            # No model was retrained: the new line went through the current ones.
            assert {asset: latest_storage_id(instance, asset) for asset in trained} == trained
            sensor_runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/sensor_name": "new_product_line_sensor"}))
            assert [run.tags.get("dagster/partition") for run in sensor_runs] == ["tops"]
