"""One storage interface for tables, images and model artefacts: a local folder or S3.

Keys are '/'-separated paths relative to the store root (``tables/x.parquet``). Every write
is atomic: a reader sees the old object or the new one, never a half-written file. Folders of
files (model weights) are uploaded with a ``_COMPLETE`` manifest written last, so a crash
mid-upload never looks like a finished artefact.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import stat
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO, Callable
from urllib.parse import unquote, urlparse

import boto3
import polars as pl
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, NoCredentialsError, PartialCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError

from .settings import MAX_IMAGE_BYTES

_log = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE"
VERSIONS_FOLDER = "versions"  # an uploaded folder's files: key_prefix/versions/<version>/...
MANIFEST_FORMAT = 2  # 1: files directly under the prefix (still read)
# Local writes go to a hidden sibling ending in this suffix, then os.replace it into place.
TEMP_SUFFIX = ".afmrl-partial"
_CHUNK = 1024 * 1024
_DEFAULT_MULTIPART_THRESHOLD = 64 * 1024 * 1024


class StorageError(RuntimeError):
    """A storage operation failed for a reason the user can act on (names the bucket/key/endpoint)."""


def content_hash(*parts: bytes | str) -> str:
    """SHA-256 hex digest of ``parts``, for content-addressed artefact paths.

    Each part is length-prefixed, so ``("ab", "c")`` and ``("a", "bc")`` hash differently.
    Strings are encoded as UTF-8.
    """
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, str):
            part = part.encode("utf-8")
        elif not isinstance(part, (bytes, bytearray, memoryview)):
            raise TypeError(f"content_hash parts must be bytes or str, got {type(part).__name__}")
        data = bytes(part)
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def validate_key(key: str, *, what: str = "key") -> str:
    """Return ``key`` when it is a safe relative '/'-separated path, else raise ValueError naming it."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"storage {what} must be a non-empty string, got {key!r}")
    if key.startswith("/"):
        raise ValueError(f"storage {what} {key!r} must be relative (no leading '/')")
    if "\\" in key or "\x00" in key:
        raise ValueError(f"storage {what} {key!r} must not contain backslashes or NUL bytes")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"storage {what} {key!r} must not contain '..', '.' or empty path segments")
        if segment.endswith(TEMP_SUFFIX):
            raise ValueError(f"storage {what} {key!r} must not end a segment with the reserved suffix {TEMP_SUFFIX!r}")
    return key


def _validate_prefix(prefix: str) -> str:
    # A prefix is a plain string prefix, as on S3; only its completed segments are validated.
    if prefix == "":
        return prefix
    if not isinstance(prefix, str):
        raise ValueError(f"storage prefix must be a string, got {prefix!r}")
    validate_key(prefix.rstrip("/") or "/", what="prefix")
    return prefix


def _folder_key(key_prefix: str) -> str:
    # Folder prefixes are keys; a trailing '/' is tolerated and dropped.
    if not isinstance(key_prefix, str):
        raise ValueError(f"storage key prefix must be a string, got {key_prefix!r}")
    return validate_key(key_prefix.rstrip("/"), what="key prefix")


def _file_digest(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _atomic_local_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write`` into a temp file beside ``path``, then rename it over ``path``."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
    for attempt in range(5):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            handle = open(temp, "wb")
            break
        except FileNotFoundError:
            # Another writer tidying this prefix removed the folder while it was still empty
            # (it deletes the folders its deletions emptied): make it again.
            if attempt == 4:
                raise
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


class ObjectStore(ABC):
    """Keys → bytes, with parquet tables and complete-or-absent folders on top."""

    root_uri: str

    @abstractmethod
    def uri(self, key: str) -> str:
        """The URI of ``key`` (an absolute path for local stores, ``s3://bucket/key`` on S3)."""

    def key_of(self, uri: str) -> str:
        """The key behind ``uri`` (the inverse of :meth:`uri`); StorageError when ``uri`` lies outside this store.

        Artefacts are referenced by URI in manifests and the serving record; this is how a
        reader turns one back into a key without rebuilding paths from fingerprints.
        """
        root = self.root_uri.rstrip("/") + "/"
        if not isinstance(uri, str) or not uri.startswith(root):
            raise StorageError(f"{uri!r} is not inside the artefact store {self.root_uri}")
        return validate_key(uri[len(root):].rstrip("/"), what=f"key of {uri!r}")

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored at ``key``."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> str:
        """Store ``data`` at ``key`` atomically, replacing any previous object; return its URI."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The bytes at ``key``; StorageError naming the key when absent."""

    @abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]:
        """Sorted keys (relative to the root) that start with ``prefix``; a plain string prefix, as on S3.

        Pass a trailing '/' to list one folder only (``"models/a/"`` does not match ``models/ab``).
        """

    @abstractmethod
    def _delete_keys(self, keys: list[str]) -> int:
        """Delete exactly these keys; return how many were deleted."""

    @abstractmethod
    def _put_file(self, key: str, path: Path) -> None:
        """Upload the local file ``path`` to ``key`` atomically."""

    @abstractmethod
    def _get_file(self, key: str, path: Path) -> None:
        """Download ``key`` into the local file ``path`` (which it may overwrite)."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with ``prefix`` (a string prefix, as in ``list_keys``); return the count."""
        if not _validate_prefix(prefix):
            raise ValueError("delete_prefix needs a non-empty prefix; refusing to delete the whole store")
        return self._delete_keys(self.list_keys(prefix))

    def write_parquet(self, key: str, frame: pl.DataFrame) -> str:
        """Write ``frame`` as parquet at ``key`` atomically; return its URI.

        The frame is serialised completely before anything is stored, so a serialisation
        failure leaves the previous object untouched.
        """
        buffer = io.BytesIO()
        frame.write_parquet(buffer)
        return self.put_bytes(key, buffer.getvalue())

    def read_parquet(self, key: str) -> pl.DataFrame:
        """The parquet table stored at ``key``."""
        return pl.read_parquet(io.BytesIO(self.get_bytes(key)))

    def upload_directory(self, local_dir: str | os.PathLike, key_prefix: str) -> str:
        """Upload every file under ``local_dir`` as a new version of ``key_prefix``; return the prefix's URI.

        Each upload writes its files under a folder of its own, ``key_prefix/versions/<id>/…``,
        never over files a reader may be fetching, and then the manifest ``_COMPLETE`` (the
        version, every path, size and SHA-256) in one put: readers see the previous complete
        version until that moment, and a crash or a concurrent writer leaves it intact (two
        writers: the manifest written last wins, and each names only its own files). The version
        just replaced is kept for readers still fetching it; older ones, and files of the
        unversioned layout, are removed after the new manifest is written.
        """
        key_prefix = _folder_key(key_prefix)
        source = Path(local_dir)
        if not source.is_dir():
            raise StorageError(f"cannot upload {source}: not a directory")
        entries = []
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            relative = path.relative_to(source).as_posix()
            validate_key(relative, what="file path")
            if relative == COMPLETE_MARKER:
                raise ValueError(f"{path} is named {COMPLETE_MARKER!r}, which is reserved for the upload manifest")
            size, sha256 = _file_digest(path)
            entries.append({"path": relative, "size": size, "sha256": sha256})

        marker = f"{key_prefix}/{COMPLETE_MARKER}"
        previous = json.loads(self.get_bytes(marker)) if self.exists(marker) else None
        previous_version = previous.get("version") if previous else None
        # Sortable by time, unique across writers: tidying compares versions by their id.
        now = time.time_ns()
        version = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now // 10**9))}.{now % 10**9:09d}Z-{uuid.uuid4().hex[:8]}"
        for entry in entries:
            self._put_file(f"{key_prefix}/{VERSIONS_FOLDER}/{version}/{entry['path']}", source / entry["path"])
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": version,
            "previous_version": previous_version,
            "files": entries,
            "total_bytes": sum(entry["size"] for entry in entries),
        }
        self.put_bytes(marker, json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
        self._tidy_versions(key_prefix, keep=previous_version)
        return self.uri(key_prefix)

    def _tidy_versions(self, key_prefix: str, keep: str | None) -> None:
        """Remove the version folders older than ``keep`` (none when ``keep`` is None) and the files
        of the unversioned layout. Newer folders stay: they may be a concurrent writer's upload,
        not yet published."""
        stale = []
        for key in self.list_keys(f"{key_prefix}/"):
            relative = key[len(key_prefix) + 1 :]
            if relative == COMPLETE_MARKER:
                continue
            parts = relative.split("/")
            if parts[0] == VERSIONS_FOLDER and len(parts) > 2 and (keep is None or parts[1] >= keep):
                continue
            stale.append(key)
        self._delete_keys(stale)
        self._abort_stale_uploads(f"{key_prefix}/{VERSIONS_FOLDER}/", keep)

    def _abort_stale_uploads(self, versions_prefix: str, keep: str | None) -> int:
        """Abort unfinished multipart uploads of version folders older than ``keep`` (a writer
        killed mid-upload leaves its parts stored and billed); a store without multipart
        uploads has none."""
        return 0

    def _version_prefix(self, key_prefix: str, manifest: dict) -> str:
        """Where the manifest's files are: their version folder, or the prefix itself (format 1)."""
        version = manifest.get("version")
        return f"{key_prefix}/{VERSIONS_FOLDER}/{validate_key(version, what='manifest version')}" if version else key_prefix

    def is_complete_directory(self, key_prefix: str) -> bool:
        """Whether ``key_prefix`` holds a finished ``upload_directory``: its ``_COMPLETE`` manifest
        exists and every file it names is present (sizes and checksums are verified on download)."""
        key_prefix = _folder_key(key_prefix)
        marker = f"{key_prefix}/{COMPLETE_MARKER}"
        if not self.exists(marker):
            return False
        try:
            manifest = json.loads(self.get_bytes(marker))
            files = self._version_prefix(key_prefix, manifest)
            present = set(self.list_keys(f"{files}/"))
            return all(f"{files}/{entry['path']}" in present for entry in manifest["files"])
        except (ValueError, KeyError, TypeError):
            return False

    def read_manifest(self, key_prefix: str) -> dict:
        """The ``_COMPLETE`` manifest of an uploaded folder; StorageError when the upload is incomplete."""
        key_prefix = _folder_key(key_prefix)
        if not self.is_complete_directory(key_prefix):
            raise StorageError(
                f"{self.uri(key_prefix)} is not a complete upload (no {COMPLETE_MARKER} marker, or files it names are missing): "
                "the upload never finished or the prefix is wrong"
            )
        return json.loads(self.get_bytes(f"{key_prefix}/{COMPLETE_MARKER}"))

    def read_directory_file(self, key_prefix: str, relative: str) -> bytes:
        """One file of the published version of an uploaded folder, verified against its manifest."""
        key_prefix = _folder_key(key_prefix)
        manifest = self.read_manifest(key_prefix)
        entry = next((e for e in manifest["files"] if e["path"] == relative), None)
        if entry is None:
            raise StorageError(f"{self.uri(key_prefix)} has no file {relative!r} in its {COMPLETE_MARKER} manifest")
        key = f"{self._version_prefix(key_prefix, manifest)}/{relative}"
        data = self.get_bytes(key)
        if (len(data), hashlib.sha256(data).hexdigest()) != (entry["size"], entry["sha256"]):
            raise StorageError(f"{self.uri(key)} does not match its {COMPLETE_MARKER} manifest")
        return data

    def download_directory(self, key_prefix: str, local_dir: str | os.PathLike) -> Path:
        """Download a complete upload into ``local_dir`` and verify every file's size and SHA-256.

        Refuses (StorageError) when ``_COMPLETE`` is missing. Each file is verified in a temp
        file before it is renamed into place. Returns ``local_dir`` as a Path.
        """
        key_prefix = _folder_key(key_prefix)
        manifest = self.read_manifest(key_prefix)
        files = self._version_prefix(key_prefix, manifest)
        target = Path(local_dir)
        target.mkdir(parents=True, exist_ok=True)
        for entry in manifest["files"]:
            relative = validate_key(entry["path"], what="manifest path")  # never write outside target
            key = f"{files}/{relative}"
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            temp = destination.with_name(f".{destination.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
            try:
                self._get_file(key, temp)
                size, sha256 = _file_digest(temp)
                if (size, sha256) != (entry["size"], entry["sha256"]):
                    raise StorageError(
                        f"{self.uri(key)} does not match its {COMPLETE_MARKER} manifest: "
                        f"expected {entry['size']} bytes sha256 {entry['sha256']}, got {size} bytes sha256 {sha256}"
                    )
                os.replace(temp, destination)
            finally:
                temp.unlink(missing_ok=True)
        return target


class LocalObjectStore(ObjectStore):
    """Objects as files under a root folder (created on first write)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.root_uri = str(self.root)

    def __repr__(self) -> str:
        return f"LocalObjectStore({self.root_uri!r})"

    def path(self, key: str) -> Path:
        """The local file path of ``key``."""
        return self.root / validate_key(key)

    def uri(self, key: str) -> str:
        return str(self.path(key))

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def put_bytes(self, key: str, data: bytes) -> str:
        path = self.path(key)
        try:
            _atomic_local_write(path, lambda handle: handle.write(data))
        except OSError as error:
            raise StorageError(f"cannot write {path}: {error}") from error
        return str(path)

    def get_bytes(self, key: str) -> bytes:
        return _read_local_file(self.path(key), f"key {key!r} in {self.root_uri}")

    def list_keys(self, prefix: str = "") -> list[str]:
        _validate_prefix(prefix)
        # Walk only the deepest folder the prefix names, not the whole store.
        folder = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        if not folder.is_dir():
            return []
        keys = []
        for directory, _, files in os.walk(folder):
            relative_dir = Path(directory).relative_to(self.root).as_posix()
            for name in files:
                if name.endswith(TEMP_SUFFIX):
                    continue
                key = name if relative_dir == "." else f"{relative_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def _abort_stale_uploads(self, versions_prefix: str, keep: str | None) -> int:
        """A local writer killed mid-file leaves its hidden temp file (never listed as a key) in
        its version folder: removed, with the folder, once that version is older than ``keep``."""
        if keep is None:
            return 0
        versions = self.path(versions_prefix.rstrip("/"))
        if not versions.is_dir():
            return 0
        removed = 0
        try:
            folders = list(versions.iterdir())
        except FileNotFoundError:  # a concurrent writer's tidying removed it
            return 0
        for folder in folders:
            if folder.is_dir() and folder.name < keep:
                try:
                    removed += sum(1 for path in folder.rglob(f"*{TEMP_SUFFIX}") if path.is_file())
                except FileNotFoundError:  # a concurrent writer is removing the same stale folder
                    pass
                shutil.rmtree(folder, ignore_errors=True)
        return removed

    def _delete_keys(self, keys: list[str]) -> int:
        deleted = 0
        for key in keys:
            path = self.path(key)
            try:
                path.unlink()
                deleted += 1
            except FileNotFoundError:
                continue
            except OSError as error:
                raise StorageError(f"cannot delete {path}: {error}") from error
            # Remove folders the deletion emptied, up to (not including) the root.
            parent = path.parent
            while parent != self.root and parent.is_relative_to(self.root):
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent
        return deleted

    def write_parquet(self, key: str, frame: pl.DataFrame) -> str:
        # Stream into the temp file instead of holding the serialised table in memory.
        path = self.path(key)
        try:
            _atomic_local_write(path, frame.write_parquet)
        except OSError as error:
            raise StorageError(f"cannot write {path}: {error}") from error
        return str(path)

    def read_parquet(self, key: str) -> pl.DataFrame:
        path = self.path(key)
        if not path.is_file():
            raise StorageError(f"no object at key {key!r} in {self.root_uri} ({path} does not exist)")
        return pl.read_parquet(path)

    def _put_file(self, key: str, path: Path) -> None:
        destination = self.path(key)

        def copy(handle: BinaryIO) -> None:
            with open(path, "rb") as source:
                shutil.copyfileobj(source, handle, _CHUNK)

        try:
            _atomic_local_write(destination, copy)
        except OSError as error:
            raise StorageError(f"cannot copy {path} to {destination}: {error}") from error

    def _get_file(self, key: str, path: Path) -> None:
        source = self.path(key)
        try:
            shutil.copyfile(source, path)
        except FileNotFoundError as error:
            raise StorageError(f"no object at key {key!r} in {self.root_uri} ({source} does not exist)") from error


def make_s3_client(
    endpoint_url: str | None = None,
    region_name: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    connect_timeout: float = 3.0,
    read_timeout: float = 30.0,
    total_attempts: int = 2,
):
    """A boto3 S3 client that fails fast: short timeouts, one retry, path-style addressing on custom endpoints.

    Without keys, boto3's default chain (environment variables, config files, ...) supplies them.
    """
    if (access_key_id is None) != (secret_access_key is None):
        raise ValueError("give both access_key_id and secret_access_key, or neither (boto3's default chain)")
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": total_attempts, "mode": "standard"},  # first try included
        # Self-hosted servers (SeaweedFS, MinIO) rarely resolve bucket.host names.
        s3={"addressing_style": "path"} if endpoint_url else {},
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region_name,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=config,
    )


class S3ObjectStore(ObjectStore):
    """Objects under ``s3://bucket/prefix`` through boto3; each write is one atomic PUT (or multipart upload)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region_name: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        client=None,
        multipart_threshold: int = _DEFAULT_MULTIPART_THRESHOLD,
    ):
        """Keys live under ``prefix`` in ``bucket``.

        ``client`` (a boto3 S3 client) takes precedence over the endpoint/region/key
        arguments; without both keys, boto3's default credential chain is used. Files of at
        least ``multipart_threshold`` bytes are uploaded in parts of that size (S3 minimum 5 MiB).
        """
        if not bucket or "/" in bucket:
            raise ValueError(f"S3 bucket name {bucket!r} must be non-empty and contain no '/'")
        self.bucket = bucket
        self.prefix = validate_key(prefix.strip("/"), what="S3 prefix") if prefix.strip("/") else ""
        self.client = client or make_s3_client(endpoint_url, region_name, access_key_id, secret_access_key)
        self.endpoint = endpoint_url or self.client.meta.endpoint_url
        self.root_uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=max(multipart_threshold, 5 * 1024 * 1024)
        )
        self._bucket_confirmed = False

    def __repr__(self) -> str:
        return f"S3ObjectStore({self.root_uri!r}, endpoint={self.endpoint!r})"

    def _full_key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full_key(key)}"

    def _error(self, error: Exception, action: str, full_key: str | None = None) -> StorageError:
        """Translate a boto3/botocore failure into a StorageError naming the endpoint, bucket and key."""
        target = f"s3://{self.bucket}/{full_key}" if full_key is not None else f"bucket {self.bucket!r}"
        where = f"at endpoint {self.endpoint}"
        if isinstance(error, ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            message = error.response.get("Error", {}).get("Message", "")
            if code == "InvalidAccessKeyId":
                text = f"S3 {where} does not know the access key id (InvalidAccessKeyId) while {action} {target}: check the access key"
            elif code == "SignatureDoesNotMatch":
                text = f"S3 {where} rejected the request signature (SignatureDoesNotMatch) while {action} {target}: the secret key is wrong"
            elif code in ("AccessDenied", "403", "Forbidden"):
                text = f"S3 {where} denied access (wrong credentials or missing permission) while {action} {target}"
            elif code == "NoSuchBucket":
                text = f"S3 bucket {self.bucket!r} does not exist {where} (while {action} {target})"
            elif code in ("NoSuchKey", "404", "NotFound"):
                text = f"no object at {target} {where} (while {action})"
            else:
                text = f"S3 error {code or '?'} {where} while {action} {target}: {message or error}"
        elif isinstance(error, (NoCredentialsError, PartialCredentialsError)):
            text = (
                f"no usable S3 credentials for {target} {where}: pass access_key_id/secret_access_key "
                f"or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY ({error})"
            )
        elif isinstance(error, (BotoConnectionError, HTTPClientError)):  # refused, timed out, dropped
            text = f"cannot reach S3 endpoint {self.endpoint} while {action} {target}: {error}"
        elif isinstance(error, BotoCoreError):
            text = f"S3 request failed {where} while {action} {target}: {error}"
        else:  # S3UploadFailedError wraps the ClientError text
            text = f"S3 upload failed {where} while {action} {target}: {error}"
        return StorageError(text)

    def _probe_with_list(self, full_key: str) -> None:
        # HEAD answers carry no error body (a bare 403/404); a one-key LIST of the same name
        # raises the real code: NoSuchBucket, InvalidAccessKeyId, SignatureDoesNotMatch, ...
        self.client.list_objects_v2(Bucket=self.bucket, Prefix=full_key, MaxKeys=1)

    def exists(self, key: str) -> bool:
        full_key = self._full_key(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=full_key)
            self._bucket_confirmed = True
            return True
        except ClientError as error:
            missing = str(error.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound")
            if missing and self._bucket_confirmed:
                return False
            try:
                self._probe_with_list(full_key)
            except (ClientError, BotoCoreError) as detailed:
                raise self._error(detailed, "checking", full_key) from error
            if not missing:
                raise self._error(error, "checking", full_key) from error
            self._bucket_confirmed = True
            return False
        except BotoCoreError as error:
            raise self._error(error, "checking", full_key) from error

    def put_bytes(self, key: str, data: bytes) -> str:
        full_key = self._full_key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=full_key, Body=bytes(data))
        except (ClientError, BotoCoreError) as error:
            raise self._error(error, "writing", full_key) from error
        return f"s3://{self.bucket}/{full_key}"

    def _get_object_bytes(self, full_key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=full_key)["Body"].read()
        except (ClientError, BotoCoreError) as error:
            raise self._error(error, "reading", full_key) from error

    def get_bytes(self, key: str) -> bytes:
        return self._get_object_bytes(self._full_key(key))

    def _listing_prefix(self, prefix: str) -> str:
        if not self.prefix:
            return prefix
        return f"{self.prefix}/{prefix}"

    def list_keys(self, prefix: str = "") -> list[str]:
        full_prefix = self._listing_prefix(_validate_prefix(prefix))
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full_prefix):
                for item in page.get("Contents", []):
                    if not item["Key"].endswith("/"):  # folder placeholders some tools create
                        keys.append(item["Key"][strip:])
        except (ClientError, BotoCoreError) as error:
            raise self._error(error, "listing", full_prefix + "*") from error
        self._bucket_confirmed = True
        return sorted(keys)

    def _abort_stale_uploads(self, versions_prefix: str, keep: str | None) -> int:
        if keep is None:  # as for the folders: with no published version to compare with, nothing is stale
            return 0
        root = self._full_key(versions_prefix.rstrip("/")) + "/"
        aborted = 0
        try:
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=root):
                for upload in page.get("Uploads", []):
                    if upload["Key"][len(root):].split("/")[0] < keep:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                        aborted += 1
        except (ClientError, BotoCoreError) as error:  # the new version is published: tidying is best effort
            _log.warning("%s; left for the bucket's AbortIncompleteMultipartUpload lifecycle rule", self._error(error, "aborting stale uploads under", root))
        return aborted

    def _delete_keys(self, keys: list[str]) -> int:
        full_keys = [self._full_key(key) for key in keys]
        deleted = 0
        for start in range(0, len(full_keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = full_keys[start : start + 1000]
            try:
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True}
                )
            except (ClientError, BotoCoreError) as error:
                raise self._error(error, "deleting", batch[0]) from error
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                raise StorageError(
                    f"S3 at endpoint {self.endpoint} failed to delete {len(errors)} object(s), e.g. "
                    f"s3://{self.bucket}/{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )
            deleted += len(batch)
        return deleted

    def _put_file(self, key: str, path: Path) -> None:
        full_key = self._full_key(key)
        try:
            # A multipart upload becomes visible only when completed, so large files stay atomic.
            self.client.upload_file(str(path), self.bucket, full_key, Config=self._transfer)
        except S3UploadFailedError as error:
            cause = error.__cause__ or error.__context__
            raise self._error(cause if isinstance(cause, (ClientError, BotoCoreError)) else error, "uploading", full_key) from error
        except (ClientError, BotoCoreError) as error:
            raise self._error(error, "uploading", full_key) from error

    def _get_file(self, key: str, path: Path) -> None:
        full_key = self._full_key(key)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=full_key)["Body"]
            with open(path, "wb") as handle:
                for chunk in body.iter_chunks(_CHUNK):
                    handle.write(chunk)
        except (ClientError, BotoCoreError) as error:
            raise self._error(error, "downloading", full_key) from error


def _local_path(location: str) -> Path:
    if location.startswith("file://"):
        parsed = urlparse(location)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URI {location!r} names a remote host; only local files are supported")
        return Path(unquote(parsed.path))
    return Path(location)


def _split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"S3 URI {uri!r} has no bucket")
    return bucket, key


class UriRoots:
    """Where a catalog's image URIs may point: local folders and ``s3://bucket/prefix`` roots.

    A local URI is compared after resolving symlinks and ``..`` (so ``root/../etc/passwd`` and a
    link out of the root are outside); an S3 URI must name the root's bucket and lie under its
    prefix, with no ``.`` or ``..`` key segment (some servers normalise them away).
    """

    def __init__(self, roots) -> None:
        self.roots = tuple(dict.fromkeys(str(root).strip() for root in roots if root and str(root).strip()))
        self._local: list[Path] = []
        self._s3: list[tuple[str, str]] = []
        for root in self.roots:
            if root.startswith("s3://"):
                bucket, prefix = _split_s3_uri(root)
                self._s3.append((bucket, prefix.strip("/")))
            elif "://" in root and not root.startswith("file://"):
                raise ValueError(f"image root {root!r}: only local folders, file:// and s3://bucket/prefix are supported")
            else:
                self._local.append(Path(os.path.realpath(_local_path(root))))

    def __str__(self) -> str:
        return ", ".join(self.roots) if self.roots else "none declared"

    def problem(self, uri: str) -> str | None:
        """None when ``uri`` lies under one of the roots, else why not (nothing is read)."""
        if not isinstance(uri, str) or not uri:
            return f"image_uri {uri!r} is not a non-empty string"
        try:
            if uri.startswith("s3://"):
                bucket, key = _split_s3_uri(uri)
                if any(part in (".", "..") for part in key.split("/")):
                    return f"image_uri {uri!r} has a '.' or '..' key segment"
                inside = any(bucket == b and (not p or key.startswith(p + "/")) for b, p in self._s3)
            elif "://" in uri and not uri.startswith("file://"):
                return f"image_uri {uri!r}: only local paths, file:// and s3:// are supported"
            else:
                path = Path(os.path.realpath(_local_path(uri)))
                inside = any(path == root or path.is_relative_to(root) for root in self._local)
        except ValueError as error:
            return f"image_uri {uri!r}: {error}"
        if inside:
            return None
        return (f"image_uri {uri!r} is outside the catalog's image roots ({self}); declare the folder or "
                "s3://bucket/prefix that holds the images as a root (AFMRL_IMAGE_ROOTS; afmrl evaluate --image-root)")


def open_store(location: str, **s3_options) -> ObjectStore:
    """``s3://bucket/prefix`` → S3ObjectStore(bucket, prefix, **s3_options); anything else → LocalObjectStore.

    Local locations may be plain paths or ``file://`` URIs; ``s3_options`` are ignored for
    them, so one configuration can carry S3 settings whatever the location.
    """
    if not isinstance(location, str) or not location.strip():
        raise ValueError(f"storage location must be a non-empty string, got {location!r}")
    location = location.strip()
    if location.startswith("s3://"):
        bucket, prefix = _split_s3_uri(location)
        return S3ObjectStore(bucket, prefix, **s3_options)
    if "://" in location and not location.startswith("file://"):
        raise ValueError(f"storage location {location!r}: only local paths, file:// and s3:// are supported")
    return LocalObjectStore(_local_path(location))


def read_uri_bytes(uri: str, s3_client=None) -> bytes:
    """The bytes behind a local path, a ``file://`` URI or ``s3://bucket/key``.

    For S3, pass ``s3_client`` (reused across calls: creating a client costs tens of ms);
    without it a fast-failing client from boto3's default chain is made for this call.
    """
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"URI must be a non-empty string, got {uri!r}")
    if uri.startswith("s3://"):
        bucket, key = _split_s3_uri(uri)
        if not key:
            raise ValueError(f"S3 URI {uri!r} names a bucket but no object key")
        # The raw key is used as is: images referenced by a catalog may not follow our key rules.
        return S3ObjectStore(bucket, client=s3_client or make_s3_client())._get_object_bytes(key)
    return _read_local_file(_local_path(uri), repr(uri), max_bytes=MAX_IMAGE_BYTES)


def _read_local_file(path: Path, what: str, max_bytes: int | None = None) -> bytes:
    """Bytes of a local regular file (at most ``max_bytes``), or a StorageError naming ``what``
    was asked for and the path. Devices, FIFOs and folders are refused before they are opened:
    ``/dev/zero`` never ends and a FIFO blocks its reader."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise StorageError(f"cannot read {what} ({path}): not a regular file (a device, FIFO, socket or folder)")
        if max_bytes is not None and info.st_size > max_bytes:
            raise StorageError(f"cannot read {what} ({path}): {info.st_size} bytes, more than the {max_bytes} allowed")
        with open(path, "rb") as handle:
            data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
    except FileNotFoundError as error:
        raise StorageError(f"nothing at {what} ({path} does not exist)") from error
    except OSError as error:
        raise StorageError(f"cannot read {what} ({path}): {error}") from error
    if max_bytes is not None and len(data) > max_bytes:  # grew after the stat
        raise StorageError(f"cannot read {what} ({path}): more than the {max_bytes} bytes allowed")
    return data

