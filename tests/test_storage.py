"""The storage layer against the local filesystem and a real S3 server (SeaweedFS), no mocks."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from afmrl_dagster.catalog.schema import make_catalog
from afmrl_dagster.storage import (
    COMPLETE_MARKER,
    LocalObjectStore,
    ObjectStore,
    S3ObjectStore,
    StorageError,
    content_hash,
    make_s3_client,
    open_store,
    read_uri_bytes,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3_server import running_s3_server  # noqa: E402

os.environ["AWS_EC2_METADATA_DISABLED"] = "true"


def sample_catalog() -> pl.DataFrame:
    return make_catalog(
        [
            {
                "listing_id": "l1",
                "product_id": "p1",
                "product_line": "tops",
                "title": "Linen shirt",
                "seller_attributes": {"colour": "white", "sleeve": "long"},
                "source": "test",
            },
            {"listing_id": "l2", "product_id": "p1", "product_line": "tops", "title": "Shirt, linen", "source": "test"},
        ]
    )


def unwritable_frame() -> pl.DataFrame:
    # Parquet has no type for arbitrary Python objects, so serialising this frame raises.
    return pl.DataFrame({"x": [object()]}, schema={"x": pl.Object})


def make_model_folder(root: Path, big_bytes: int = 0) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"dim": 8}')
    (root / "sub" / "weights.bin").write_bytes(os.urandom(big_bytes or 1000))
    return root


@pytest.fixture(scope="module")
def s3_bucket(s3_server) -> str:
    bucket = "storage-tests"
    s3_server.client().create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def s3_store(s3_server, s3_bucket, request) -> S3ObjectStore:
    """A store under a prefix of its own, so tests never see each other's keys."""
    safe_name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)
    return S3ObjectStore(s3_bucket, prefix=f"tests/{safe_name}", **s3_server.store_options())


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path) -> ObjectStore:
    if request.param == "local":
        return LocalObjectStore(tmp_path / "store")
    return request.getfixturevalue("s3_store")


# --- behaviour shared by both stores ------------------------------------------------------


def test_bytes_round_trip_exists_list_delete(any_store: ObjectStore):
    uri = any_store.put_bytes("a/b/one.txt", b"one")
    any_store.put_bytes("a/b/two.txt", b"two")
    any_store.put_bytes("a/bc.txt", b"bc")
    any_store.put_bytes("z.txt", b"z")

    assert uri == any_store.uri("a/b/one.txt")
    assert uri.startswith(any_store.root_uri)
    assert any_store.get_bytes("a/b/one.txt") == b"one"
    assert any_store.exists("a/b/one.txt") and not any_store.exists("a/b/three.txt")
    assert not any_store.exists("a/b")  # a folder is not an object
    assert any_store.list_keys() == ["a/b/one.txt", "a/b/two.txt", "a/bc.txt", "z.txt"]
    assert any_store.list_keys("a/b") == ["a/b/one.txt", "a/b/two.txt", "a/bc.txt"]  # string prefix, as on S3
    assert any_store.list_keys("a/b/") == ["a/b/one.txt", "a/b/two.txt"]
    assert any_store.list_keys("nothing/") == []

    any_store.put_bytes("a/b/one.txt", b"replaced")
    assert any_store.get_bytes("a/b/one.txt") == b"replaced"

    assert any_store.delete_prefix("a/b/") == 2
    assert any_store.list_keys() == ["a/bc.txt", "z.txt"]
    assert any_store.delete_prefix("a/b/") == 0
    with pytest.raises(ValueError, match="whole store"):
        any_store.delete_prefix("")


def test_parquet_round_trip_keeps_list_of_struct_column(any_store: ObjectStore):
    catalog = sample_catalog()
    assert catalog.schema["seller_attributes"] == pl.List(pl.Struct({"key": pl.Utf8, "value": pl.Utf8}))
    any_store.write_parquet("tables/tops.parquet", catalog)
    loaded = any_store.read_parquet("tables/tops.parquet")
    assert loaded.schema == catalog.schema
    assert loaded.to_dicts() == catalog.to_dicts()
    assert loaded["seller_attributes"][0].to_list() == [
        {"key": "colour", "value": "white"},
        {"key": "sleeve", "value": "long"},
    ]


def test_failed_parquet_write_keeps_previous_table(any_store: ObjectStore):
    catalog = sample_catalog()
    any_store.write_parquet("tables/tops.parquet", catalog)
    with pytest.raises(pl.exceptions.ComputeError):
        any_store.write_parquet("tables/tops.parquet", unwritable_frame())
    assert any_store.read_parquet("tables/tops.parquet").to_dicts() == catalog.to_dicts()
    assert any_store.list_keys() == ["tables/tops.parquet"]


def test_missing_key_is_a_storage_error_naming_it(any_store: ObjectStore):
    with pytest.raises(StorageError, match="missing/thing.bin"):
        any_store.get_bytes("missing/thing.bin")
    with pytest.raises(StorageError, match="missing/table.parquet"):
        any_store.read_parquet("missing/table.parquet")


@pytest.mark.parametrize("bad_key", ["../escape.txt", "a/../../b", "/abs/key", "", "a//b", "a/./b", "a\\b"])
def test_unsafe_keys_are_rejected(any_store: ObjectStore, bad_key: str):
    with pytest.raises(ValueError) as raised:
        any_store.put_bytes(bad_key, b"x")
    assert repr(bad_key) in str(raised.value)
    with pytest.raises(ValueError):
        any_store.get_bytes(bad_key)
    with pytest.raises(ValueError):
        any_store.exists(bad_key)


def _version_keys(store: ObjectStore, prefix: str) -> tuple[str, list[str]]:
    """The published version of ``prefix`` and its files' paths."""
    version = json.loads(store.get_bytes(f"{prefix}/{COMPLETE_MARKER}"))["version"]
    folder = f"{prefix}/versions/{version}/"
    return version, [key.removeprefix(folder) for key in store.list_keys(folder)]


def test_directory_upload_download_and_reupload(any_store: ObjectStore, tmp_path: Path):
    source = make_model_folder(tmp_path / "model")
    uri = any_store.upload_directory(source, "models/encoder/abc")
    assert uri == any_store.uri("models/encoder/abc")
    assert any_store.is_complete_directory("models/encoder/abc")
    first, paths = _version_keys(any_store, "models/encoder/abc")
    assert paths == ["config.json", "sub/weights.bin"]
    manifest = json.loads(any_store.get_bytes(f"models/encoder/abc/{COMPLETE_MARKER}"))
    weights = (source / "sub" / "weights.bin").read_bytes()
    assert {entry["path"]: entry["size"] for entry in manifest["files"]} == {"config.json": 10, "sub/weights.bin": 1000}
    assert manifest["files"][1]["sha256"] == hashlib.sha256(weights).hexdigest()

    downloaded = any_store.download_directory("models/encoder/abc", tmp_path / "copy")
    assert downloaded == tmp_path / "copy"
    assert (downloaded / "sub" / "weights.bin").read_bytes() == weights
    assert (downloaded / "config.json").read_text() == '{"dim": 8}'
    assert not [p for p in downloaded.rglob("*") if p.name.startswith(".")]  # no temp files left

    # A new version without sub/weights.bin is what readers get; the version it replaced stays for
    # readers still fetching it, and the one before that is removed.
    (source / "sub" / "weights.bin").unlink()
    (source / "head.safetensors").write_bytes(b"new")
    any_store.upload_directory(source, "models/encoder/abc/")
    second, paths = _version_keys(any_store, "models/encoder/abc")
    assert second > first and paths == ["config.json", "head.safetensors"]
    assert any_store.read_directory_file("models/encoder/abc", "head.safetensors") == b"new"  # the published version's file
    with pytest.raises(StorageError, match="has no file 'sub/weights.bin'"):
        any_store.read_directory_file("models/encoder/abc", "sub/weights.bin")
    assert sorted(p.name for p in any_store.download_directory("models/encoder/abc", tmp_path / "second").iterdir()) == [
        "config.json", "head.safetensors"]
    assert any_store.list_keys(f"models/encoder/abc/versions/{first}/")
    any_store.upload_directory(source, "models/encoder/abc/")
    assert not any_store.list_keys(f"models/encoder/abc/versions/{first}/")
    assert any_store.list_keys(f"models/encoder/abc/versions/{second}/")


def test_download_refuses_incomplete_or_corrupt_directory(any_store: ObjectStore, tmp_path: Path):
    any_store.put_bytes("models/half/config.json", b"{}")  # files without a manifest: a crashed upload
    assert not any_store.is_complete_directory("models/half")
    with pytest.raises(StorageError, match=f"no {COMPLETE_MARKER} marker"):
        any_store.download_directory("models/half", tmp_path / "half")
    assert not (tmp_path / "half" / "config.json").exists()

    any_store.upload_directory(make_model_folder(tmp_path / "model"), "models/full")
    version, _ = _version_keys(any_store, "models/full")
    any_store.put_bytes(f"models/full/versions/{version}/sub/weights.bin", b"tampered")
    with pytest.raises(StorageError, match="does not match its _COMPLETE manifest"):
        any_store.download_directory("models/full", tmp_path / "full")
    assert not (tmp_path / "full" / "sub" / "weights.bin").exists()
    # A manifest whose files are gone is not complete: a cache reading the marker alone would trust it.
    any_store.delete_prefix(f"models/full/versions/{version}/sub/")
    assert not any_store.is_complete_directory("models/full")


def test_a_crash_during_reupload_keeps_the_previous_version_readable(any_store: ObjectStore, tmp_path: Path, monkeypatch):
    source = make_model_folder(tmp_path / "model")
    any_store.upload_directory(source, "models/gen")
    before, _ = _version_keys(any_store, "models/gen")

    real_put_file = type(any_store)._put_file
    uploaded = []

    def crash_after_first_file(self, key, path):
        if uploaded:
            raise OSError("simulated crash mid-upload")
        uploaded.append(key)
        real_put_file(self, key, path)

    monkeypatch.setattr(type(any_store), "_put_file", crash_after_first_file)
    (source / "config.json").write_text('{"dim": 9}')
    with pytest.raises(OSError, match="simulated crash"):
        any_store.upload_directory(source, "models/gen")
    monkeypatch.undo()

    assert len(uploaded) == 1 and "/versions/" in uploaded[0] and before not in uploaded[0]
    assert any_store.is_complete_directory("models/gen") and _version_keys(any_store, "models/gen")[0] == before
    copy = any_store.download_directory("models/gen", tmp_path / "copy")
    assert (copy / "config.json").read_text() == '{"dim": 8}'  # the previous good version, whole


def test_concurrent_writers_leave_one_complete_version(any_store: ObjectStore, tmp_path: Path):
    """Two writers to one prefix at once (threads, each its own folder): whichever manifest lands
    last names only its own files, and every download verifies."""
    import threading

    any_store.upload_directory(make_model_folder(tmp_path / "v0"), "models/race")
    sources = []
    for i in range(2):
        folder = make_model_folder(tmp_path / f"writer{i}")
        (folder / "config.json").write_text(json.dumps({"writer": i}))
        sources.append(folder)
    errors = []

    def write(folder):
        try:
            any_store.upload_directory(folder, "models/race")
        except Exception as error:  # a writer must not fail because another writes
            errors.append(error)

    # Many rounds on the local store: a writer's tidying once removed the other's empty version folder under it.
    for round_ in range(40 if isinstance(any_store, LocalObjectStore) else 3):
        threads = [threading.Thread(target=write, args=(folder,)) for folder in sources]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert any_store.is_complete_directory("models/race")
        copy = any_store.download_directory("models/race", tmp_path / f"copy{round_}")
        assert json.loads((copy / "config.json").read_text())["writer"] in (0, 1)


# --- local store only --------------------------------------------------------------------


def test_local_failed_replace_keeps_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch):
    store = LocalObjectStore(tmp_path / "store")
    store.put_bytes("data/x.bin", b"old")

    def failing_replace(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(StorageError, match="disk full"):
        store.put_bytes("data/x.bin", b"new")
    with pytest.raises(StorageError, match="disk full"):
        store.write_parquet("data/t.parquet", sample_catalog())
    monkeypatch.undo()

    assert store.get_bytes("data/x.bin") == b"old"
    assert store.list_keys() == ["data/x.bin"]
    assert sorted(p.name for p in (tmp_path / "store" / "data").iterdir()) == ["x.bin"]


def test_local_serialisation_failure_leaves_no_temp_file(tmp_path: Path):
    store = LocalObjectStore(tmp_path / "store")
    with pytest.raises(pl.exceptions.ComputeError):
        store.write_parquet("tables/bad.parquet", unwritable_frame())
    assert not store.exists("tables/bad.parquet")
    assert list((tmp_path / "store" / "tables").iterdir()) == []


def test_local_delete_prefix_prunes_empty_folders(tmp_path: Path):
    store = LocalObjectStore(tmp_path / "store")
    store.put_bytes("a/b/c/one.txt", b"1")
    store.put_bytes("a/keep.txt", b"k")
    assert store.delete_prefix("a/b/") == 1
    assert not (tmp_path / "store" / "a" / "b").exists()
    assert store.list_keys() == ["a/keep.txt"]


def test_open_store_and_read_uri_bytes_for_local_paths(tmp_path: Path):
    plain = open_store(str(tmp_path / "plain"))
    from_uri = open_store((tmp_path / "with space").as_uri())
    assert isinstance(plain, LocalObjectStore) and isinstance(from_uri, LocalObjectStore)
    assert from_uri.root == tmp_path / "with space"

    uri = from_uri.put_bytes("images/tops/l1.jpg", b"\xff\xd8jpeg")
    assert read_uri_bytes(uri) == b"\xff\xd8jpeg"
    assert read_uri_bytes(Path(uri).as_uri()) == b"\xff\xd8jpeg"
    with pytest.raises(StorageError, match="does not exist"):
        read_uri_bytes(str(tmp_path / "nope.jpg"))
    with pytest.raises(ValueError, match="only local paths"):
        open_store("gs://bucket/prefix")


def test_content_hash_is_stable_and_unambiguous():
    assert content_hash("config", b"\x00\x01") == content_hash(b"config", b"\x00\x01")
    assert content_hash("ab", "c") != content_hash("a", "bc")
    assert content_hash() != content_hash("")
    assert len(content_hash("x")) == 64 and int(content_hash("x"), 16) >= 0
    with pytest.raises(TypeError):
        content_hash(3)  # type: ignore[arg-type]


# --- S3 only -----------------------------------------------------------------------------


def test_open_store_s3_prefixes_do_not_leak(s3_server, s3_bucket):
    first = open_store(f"s3://{s3_bucket}/leak/a", **s3_server.store_options())
    second = open_store(f"s3://{s3_bucket}/leak/ab/", **s3_server.store_options())
    assert isinstance(first, S3ObjectStore) and first.root_uri == f"s3://{s3_bucket}/leak/a"
    assert second.root_uri == f"s3://{s3_bucket}/leak/ab"
    assert first.put_bytes("k.txt", b"1") == f"s3://{s3_bucket}/leak/a/k.txt"
    second.put_bytes("k.txt", b"2")
    assert first.list_keys() == ["k.txt"] and second.list_keys() == ["k.txt"]
    assert first.delete_prefix("k") == 1
    assert second.get_bytes("k.txt") == b"2"


def test_s3_large_file_goes_through_multipart_upload(s3_server, s3_bucket, tmp_path: Path):
    store = S3ObjectStore(s3_bucket, "multipart", multipart_threshold=5 * 1024 * 1024, **s3_server.store_options())
    source = make_model_folder(tmp_path / "model", big_bytes=6 * 1024 * 1024)
    store.upload_directory(source, "big")
    version = json.loads(store.get_bytes(f"big/{COMPLETE_MARKER}"))["version"]
    head = s3_server.client().head_object(Bucket=s3_bucket, Key=f"multipart/big/versions/{version}/sub/weights.bin")
    assert head["ContentLength"] == 6 * 1024 * 1024
    assert head["ETag"].strip('"').endswith("-2")  # two parts: the multipart path was taken
    copy = store.download_directory("big", tmp_path / "copy")
    assert (copy / "sub" / "weights.bin").read_bytes() == (source / "sub" / "weights.bin").read_bytes()


def test_s3_wrong_credentials_are_named(s3_server, s3_bucket):
    options = s3_server.store_options()
    s3_store_ok = S3ObjectStore(s3_bucket, "creds", **options)
    s3_store_ok.put_bytes("x.txt", b"x")

    unknown_key = S3ObjectStore(s3_bucket, "creds", **{**options, "access_key_id": "nobody"})
    with pytest.raises(StorageError, match="InvalidAccessKeyId") as raised:
        unknown_key.get_bytes("x.txt")
    assert s3_server.endpoint_url in str(raised.value) and f"s3://{s3_bucket}/creds/x.txt" in str(raised.value)

    wrong_secret = S3ObjectStore(s3_bucket, "creds", **{**options, "secret_access_key": "not-the-secret"})
    for attempt in (lambda: wrong_secret.put_bytes("y.txt", b"y"), lambda: wrong_secret.exists("x.txt"), wrong_secret.list_keys):
        with pytest.raises(StorageError, match="SignatureDoesNotMatch.*secret key is wrong"):
            attempt()
    assert not s3_store_ok.exists("y.txt")


def test_s3_missing_bucket_is_named(s3_server):
    store = S3ObjectStore("no-such-bucket-here", "p", **s3_server.store_options())
    for attempt in (
        lambda: store.get_bytes("k"),
        lambda: store.put_bytes("k", b"1"),  # no silent bucket creation
        lambda: store.exists("k"),
        store.list_keys,
    ):
        with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist at endpoint"):
            attempt()


def test_s3_default_credential_chain_reads_environment(s3_server, s3_bucket, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    store = open_store(f"s3://{s3_bucket}/env-chain", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    store.put_bytes("k.txt", b"via env")
    assert store.get_bytes("k.txt") == b"via env"


def test_read_uri_bytes_for_s3_uris(s3_server, s3_bucket):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="images/raw key (1).jpg", Body=b"jpeg bytes")
    assert read_uri_bytes(f"s3://{s3_bucket}/images/raw key (1).jpg", s3_client=client) == b"jpeg bytes"
    with pytest.raises(StorageError, match=f"no object at s3://{s3_bucket}/images/absent.jpg"):
        read_uri_bytes(f"s3://{s3_bucket}/images/absent.jpg", s3_client=client)
    with pytest.raises(ValueError, match="no object key"):
        read_uri_bytes(f"s3://{s3_bucket}", s3_client=client)


def test_s3_unreachable_endpoint_fails_fast(tmp_path: Path):
    with running_s3_server(tmp_path / "short-lived") as server:
        server.client().create_bucket(Bucket="short-lived")
        store = S3ObjectStore("short-lived", **server.store_options())
        store.put_bytes("k.txt", b"1")
    # The server is stopped by PID; the endpoint now refuses connections.
    for attempt in (lambda: store.get_bytes("k.txt"), lambda: store.exists("k.txt"), lambda: store.put_bytes("k", b"2")):
        started = time.monotonic()
        with pytest.raises(StorageError, match=f"cannot reach S3 endpoint {server.endpoint_url}"):
            attempt()
        elapsed = time.monotonic() - started
        print(f"unreachable endpoint reported in {elapsed:.2f} s")
        assert elapsed < 5


def test_s3_client_fails_fast_and_requires_both_keys():
    client = make_s3_client(endpoint_url="http://127.0.0.1:9", access_key_id="a", secret_access_key="b")
    # A black-holed endpoint must time out in seconds rather than hang on boto3's 60 s x 5 defaults.
    assert client.meta.config.connect_timeout <= 5
    assert client.meta.config.retries["total_max_attempts"] == 2
    assert client.meta.config.s3["addressing_style"] == "path"
    with pytest.raises(ValueError, match="both access_key_id and secret_access_key"):
        make_s3_client(endpoint_url="http://127.0.0.1:9", access_key_id="only-one")


def test_an_image_uri_never_reads_a_device_a_fifo_a_folder_or_an_oversized_file(tmp_path, monkeypatch):
    """/dev/zero would grow without end and a FIFO would block its reader: both are refused before
    they are opened, as is a file over the byte cap; each error names the URI."""
    import afmrl_dagster.storage as storage
    from afmrl_dagster.storage import StorageError, read_uri_bytes

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    for uri in ("/dev/zero", str(fifo), f"file://{tmp_path}"):
        with pytest.raises(StorageError, match="not a regular file"):
            read_uri_bytes(uri)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"x" * 2048)
    monkeypatch.setattr(storage, "MAX_IMAGE_BYTES", 1024)
    with pytest.raises(StorageError, match=r"photo\.jpg.*2048 bytes, more than the 1024 allowed"):
        read_uri_bytes(str(photo))
    photo.write_bytes(b"x" * 1024)
    assert read_uri_bytes(str(photo)) == b"x" * 1024


def test_uri_roots_admit_only_what_lies_under_a_declared_root(tmp_path):
    from afmrl_dagster.storage import UriRoots

    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "images-other").mkdir()
    os.symlink(tmp_path / "images-other", root / "out")
    roots = UriRoots([str(root), "s3://shop/catalog", ""])
    assert str(roots) == f"{root}, s3://shop/catalog"
    for inside in (str(root / "sub" / "a.jpg"), f"file://{root}/a.jpg", f"{root}/sub/../a.jpg", "s3://shop/catalog/lines/a.jpg"):
        assert roots.problem(inside) is None, inside
    for outside in (str(tmp_path / "images-other" / "a.jpg"), f"{root}/../images-other/a.jpg", str(root / "out" / "a.jpg"),
                    "/etc/passwd", "s3://shop/catalogue/a.jpg", "s3://shop/other/a.jpg", "s3://elsewhere/catalog/a.jpg"):
        assert "outside the catalog's image roots" in roots.problem(outside), outside
    assert "'..' key segment" in roots.problem("s3://shop/catalog/../private/a.jpg")
    assert "only local paths" in roots.problem("https://example.com/a.jpg")
    assert "remote host" in roots.problem("file://other-host/a.jpg")
    assert "outside" in UriRoots([]).problem(str(root / "a.jpg"))  # no root declared: nothing is admitted
    with pytest.raises(ValueError, match="only local folders"):
        UriRoots(["https://example.com/images"])


def test_a_killed_writers_multipart_upload_is_aborted_by_the_next_publish(s3_store: S3ObjectStore, tmp_path: Path):
    """A writer killed mid-upload leaves parts stored (and billed) under its version folder. The
    next publish aborts those of versions older than the one it keeps, as it deletes their files;
    a newer upload (a concurrent writer still at work) is left alone."""
    client, bucket = s3_store.client, s3_store.bucket
    source = make_model_folder(tmp_path / "model")
    s3_store.upload_directory(source, "models/big")
    versions = s3_store._full_key("models/big/versions")
    started = {}
    for name, version in (("killed", "20000101T000000.000000000Z-dead0000"), ("running", "99991231T235959.999999999Z-busy0000")):
        key = f"{versions}/{version}/weights.bin"
        upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"\0" * (5 * 1024 * 1024))
        started[name] = (key, upload)

    def open_uploads() -> set[str]:
        return {u["UploadId"] for u in client.list_multipart_uploads(Bucket=bucket, Prefix=versions + "/").get("Uploads", [])}

    assert open_uploads() == {upload for _, upload in started.values()}
    (source / "config.json").write_text('{"dim": 9}')
    s3_store.upload_directory(source, "models/big")  # a second publish: it keeps the first version, aborts what is older
    assert open_uploads() == {started["running"][1]}
    client.abort_multipart_upload(Bucket=bucket, Key=started["running"][0], UploadId=started["running"][1])
