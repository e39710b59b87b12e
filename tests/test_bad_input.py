"""Bad listings are named and quarantined; too many fail the run; stored data survives."""

from __future__ import annotations

import io

import dagster as dg
import polars as pl
import pytest
from PIL import Image

from afmrl_dagster.assets.catalog import RawCatalogConfig, raw_catalog
from afmrl_dagster.catalog.schema import make_catalog

from afmrl_dagster.apps.demo import failure_messages

from pipeline_fixtures import tiny_resources


def jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_line(source_dir, rows) -> None:
    make_catalog(rows).write_parquet(source_dir / "mugs.parquet")


def good_rows(images_dir, count=8) -> list[dict]:
    rows = []
    for i in range(count):
        path = images_dir / f"mug-{i}.jpg"
        path.write_bytes(jpeg((20 * i, 80, 120)))
        rows.append({
            "listing_id": f"mug-{i}", "product_id": f"mug-p{i // 2}", "product_line": "mugs", "title": f"Blue mug {i}",
            "image_uri": str(path), "seller_attributes": {"colour": "blue"}, "source": "test",
        })
    return rows


def run_raw_catalog(resources, instance, max_bad_share):
    return dg.materialize(
        [raw_catalog], partition_key="mugs", resources=resources, instance=instance, raise_on_error=False,
        run_config=dg.RunConfig(ops={"raw_catalog": RawCatalogConfig(max_bad_share=max_bad_share)}),
    )


@pytest.fixture
def setup(tmp_path):
    source, images = tmp_path / "source", tmp_path / "images"
    source.mkdir()
    images.mkdir()
    resources = tiny_resources(tmp_path, catalog_spec=f"parquet:{source}", image_roots=[str(images)])
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("product_lines", ["mugs"])
        yield source, images, resources, instance


def bad_rows(images, rows):
    corrupt = images / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows[1]["image_uri"] = str(corrupt)
    rows[2]["title"] = None
    rows[3]["listing_id"] = "mug-0"  # duplicate
    rows[4]["title"] = b"caf\xe9 mug".decode("utf-8", errors="replace")  # was not UTF-8
    return rows


def test_bad_listings_are_quarantined_with_listing_and_field(setup):
    source, images, resources, instance = setup
    write_line(source, bad_rows(images, good_rows(images)))
    result = run_raw_catalog(resources, instance, max_bad_share=0.6)
    assert result.success
    stored = resources["artifact_store"].open()
    quarantine = stored.read_parquet("quarantine/raw_catalog/mugs.parquet")
    problems = {(r["listing_id"], r["field"]) for r in quarantine.iter_rows(named=True)}
    assert problems == {("mug-1", "image_uri"), ("mug-2", "title"), ("mug-0", "listing_id"), ("mug-4", "title")}
    catalog = stored.read_parquet("tables/raw_catalog/mugs.parquet")
    assert catalog.height == 4 and "mug-1" not in catalog["listing_id"].to_list()


def test_too_many_bad_listings_fail_the_run_and_keep_stored_data(setup):
    source, images, resources, instance = setup
    write_line(source, good_rows(images))
    assert run_raw_catalog(resources, instance, max_bad_share=0.0).success
    stored = resources["artifact_store"].open()
    before = stored.get_bytes("tables/raw_catalog/mugs.parquet")

    write_line(source, bad_rows(images, good_rows(images)))
    result = run_raw_catalog(resources, instance, max_bad_share=0.1)
    assert not result.success
    message = failure_messages(result)
    assert "listing_id='mug-1'" in message and "'image_uri'" in message
    assert stored.get_bytes("tables/raw_catalog/mugs.parquet") == before
    assert pl.read_parquet(io.BytesIO(before)).height == 8


def test_a_failed_catalog_stops_attributes_and_features_downstream(setup):
    """The catalog refresh job: when the line fails validation, nothing downstream materialises."""
    from afmrl_dagster.definitions import build_definitions

    source, images, resources, instance = setup
    write_line(source, bad_rows(images, good_rows(images)))
    job = build_definitions(resources).resolve_job_def("catalog_refresh_job")
    config = {"ops": {"raw_catalog": {"config": RawCatalogConfig(max_bad_share=0.1).model_dump()}}}
    result = job.execute_in_process(instance=instance, partition_key="mugs", run_config=config, raise_on_error=False)
    assert not result.success
    assert not result.get_asset_materialization_events()
    for asset in ("raw_catalog", "teacher_attributes", "listing_features"):
        assert instance.get_latest_materialization_event(dg.AssetKey(asset)) is None, asset
    stored = resources["artifact_store"].open()
    assert not stored.exists("tables/teacher_attributes/mugs.parquet") and not stored.exists("tables/listing_features/mugs.parquet")


def test_images_that_would_hang_or_flood_the_run_are_quarantined_with_their_listing(setup):
    """A device that never ends, a FIFO (inside the image root) that blocks its reader and a small PNG
    that claims 144 megapixels: each listing is quarantined by name on its image_uri, and the run finishes."""
    import os

    source, images, resources, instance = setup
    rows = good_rows(images)
    fifo = images / "pipe.jpg"
    os.mkfifo(fifo)
    bomb = images / "bomb.png"
    Image.new("L", (12000, 12000), 0).save(bomb, format="PNG")
    rows[1]["image_uri"], rows[2]["image_uri"], rows[3]["image_uri"] = "/dev/zero", str(fifo), str(bomb)
    write_line(source, rows)
    result = run_raw_catalog(resources, instance, max_bad_share=0.5)
    assert result.success
    quarantine = resources["artifact_store"].open().read_parquet("quarantine/raw_catalog/mugs.parquet")
    problems = {r["listing_id"]: r["problem"] for r in quarantine.iter_rows(named=True)}
    assert set(problems) == {"mug-1", "mug-2", "mug-3"}
    assert "outside the catalog's image roots" in problems["mug-1"]  # /dev is no image root (a device inside one: test_storage)
    assert "not a regular file" in problems["mug-2"]
    assert "12000x12000 pixels" in problems["mug-3"]


def test_image_uris_outside_the_catalogs_roots_are_quarantined_and_never_read(setup, monkeypatch):
    """An absolute path, a file:// URI, a ``..`` escape, a symlink out of the declared image root and
    another bucket: each listing is quarantined on its image_uri, and no byte behind it is read."""
    import os

    import afmrl_dagster.resources.storage as storage_resource

    source, images, resources, instance = setup
    read = []
    real_read = storage_resource.read_uri_bytes
    monkeypatch.setattr(storage_resource, "read_uri_bytes", lambda uri, **kw: read.append(uri) or real_read(uri, **kw))
    secret = images.parent / "secret.jpg"  # beside the declared root, not under it
    secret.write_bytes(jpeg((1, 2, 3)))
    os.symlink(secret, images / "link.jpg")
    rows = good_rows(images)
    outside = ["/etc/passwd", "file:///etc/passwd", f"{images}/../secret.jpg", str(images / "link.jpg"), "s3://someone-elses-bucket/a.jpg"]
    for row, uri in zip(rows[1:], outside):
        row["image_uri"] = uri
    write_line(source, rows)
    result = run_raw_catalog(resources, instance, max_bad_share=0.9)
    assert result.success
    quarantine = resources["artifact_store"].open().read_parquet("quarantine/raw_catalog/mugs.parquet")
    problems = {r["listing_id"]: (r["field"], r["problem"]) for r in quarantine.iter_rows(named=True)}
    assert set(problems) == {f"mug-{i}" for i in range(1, 6)}
    for field, problem in problems.values():
        assert field == "image_uri" and "outside the catalog's image roots" in problem, problem
    assert not [uri for uri in read if uri in outside], read
    assert sorted(read) == sorted(str(images / f"mug-{i}.jpg") for i in (0, 6, 7))  # the listings inside the root
