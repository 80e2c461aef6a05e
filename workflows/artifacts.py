"""An artifact store for stage checkpoints: a local directory, an S3 bucket (MinIO), or an MLflow artifact location.

A checkpoint directory is stored under a *key* (``tiny/3f2a.../1a/model``) as its files plus a manifest,
``OLA_ARTIFACT.json``, that lists every file with its size and sha256. The manifest is written **last**, after the
files are uploaded and their sizes checked, so it is the ``COMPLETE`` marker: a key without it (an interrupted
upload) is never listed, never ``exists``, and never downloaded. A download fetches exactly the files the manifest
names into a temporary directory next to the destination, checks every size and sha256, and only then renames it
into place, so the destination is either absent or a complete, verified copy.

Store URIs:

- ``s3://bucket/prefix``: S3 or MinIO through boto3. The endpoint comes from the caller (the config's
  ``artifacts.endpoint_url``), else ``OLA_S3_ENDPOINT_URL``, else ``MLFLOW_S3_ENDPOINT_URL``, else AWS; credentials
  from the standard AWS chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, profiles, roles).
- a directory path or ``file://`` URI: a local directory (uploads there are staged and renamed, so atomic).
- ``mlflow-artifacts:/...`` (and ``http(s)://`` artifact roots): a location behind an MLflow tracking server that
  proxies artifacts; the client needs no storage credentials.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

MANIFEST = "OLA_ARTIFACT.json"
FORMAT = "ola-artifact/1"
S3_ENDPOINT_ENV = ("OLA_S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+=-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ArtifactError(RuntimeError):
    """An artifact store operation failed; the message names the store URI and key."""


class ArtifactNotFound(ArtifactError):
    """No complete artifact (manifest + every listed file) under a key."""


class ArtifactIncomplete(ArtifactError):
    """An artifact is half-written or damaged: no manifest, a missing file, or a size / sha256 mismatch."""


class ArtifactConflict(ArtifactError):
    """A complete artifact with different content already exists under the key (and overwrite was not asked)."""


# ------------------------------------------------------------------------------------------------ manifests
def check_key(key: str) -> str:
    """A store key: '' (the store root) or '/'-separated segments of ``[A-Za-z0-9._@+=-]`` not starting with '.'.

    Raises:
        ArtifactError: naming the key and the rule.
    """
    if not isinstance(key, str):
        raise ArtifactError(f"artifact key must be a string, got {type(key).__name__}")
    key = key.strip("/")
    if key and not all(_SEGMENT.match(part) for part in key.split("/")):
        raise ArtifactError(
            f"artifact key {key!r}: every '/'-separated part must match {_SEGMENT.pattern} (no '..', no hidden names)"
        )
    return key


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _local_files(local_dir: Path) -> list[str]:
    """Relative POSIX paths of every file under ``local_dir`` (sorted), without a manifest at its top."""
    files = []
    for path in sorted(local_dir.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(local_dir).as_posix()
        if rel != MANIFEST:
            files.append(rel)
    return files


def build_manifest(local_dir: str | Path) -> dict[str, Any]:
    """The manifest of a local directory: ``{"format", "files": {rel: {"size", "sha256"}}, "total_bytes"}``.

    Raises:
        ArtifactError: ``local_dir`` is not a directory, or is empty.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise ArtifactError(f"{local_dir} is not a directory")
    files = {
        rel: {"size": (local_dir / rel).stat().st_size, "sha256": _sha256(local_dir / rel)}
        for rel in _local_files(local_dir)
    }
    if not files:
        raise ArtifactError(f"{local_dir} holds no files; nothing to upload")
    return {"format": FORMAT, "files": files, "total_bytes": sum(f["size"] for f in files.values())}


def validate_manifest(data: Any, where: str) -> dict[str, Any]:
    """Check a manifest's structure. Raises ArtifactIncomplete naming ``where`` and the field."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactIncomplete(f"{where}: not an {FORMAT} manifest")
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactIncomplete(f"{where}: 'files' must be a non-empty object")
    for rel, meta in files.items():
        parts = PurePosixPath(rel).parts
        if not rel or rel.startswith("/") or ".." in parts or rel == MANIFEST:
            raise ArtifactIncomplete(f"{where}: file path {rel!r} must be relative and stay inside the artifact")
        if not isinstance(meta, dict) or not isinstance(meta.get("size"), int) or meta["size"] < 0:
            raise ArtifactIncomplete(f"{where}: files[{rel!r}].size must be a non-negative integer")
        if not isinstance(meta.get("sha256"), str) or not _SHA256.match(meta["sha256"]):
            raise ArtifactIncomplete(f"{where}: files[{rel!r}].sha256 must be a sha256 hex digest")
    return data


def same_content(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two manifests describe the same files (sizes and hashes)."""
    return a.get("files") == b.get("files")


# -------------------------------------------------------------------------------------------------- stores
class ArtifactStore(ABC):
    """Checkpoint directories under keys, with a manifest written last. Subclasses implement five primitives on
    paths relative to the store root; the protocol (upload, verify, download, list) is shared."""

    uri: str

    # ---- primitives
    @abstractmethod
    def _put(self, local: Path, rel: str) -> None:
        """Upload one local file to ``rel``."""

    @abstractmethod
    def _get(self, rel: str, local: Path) -> None:
        """Download ``rel`` to the local file ``local`` (its directory exists)."""

    @abstractmethod
    def _read(self, rel: str) -> bytes | None:
        """The bytes of ``rel``, or None when there is no such object."""

    @abstractmethod
    def _sizes(self, prefix: str) -> dict[str, int]:
        """Size of every object under ``prefix`` (a key; '' = all), by path relative to the store root."""

    @abstractmethod
    def _delete(self, rel: str) -> None:
        """Delete the object ``rel`` (no error when absent)."""

    def _delete_prefix(self, prefix: str) -> None:
        for rel in self._sizes(prefix):
            self._delete(rel)

    # ---- the protocol
    def uri_for(self, key: str) -> str:
        """The URI of ``key`` (a store URI itself: ``open_store(uri_for(k))`` has the artifact at key '')."""
        key = check_key(key)
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri

    def _manifest_at(self, key: str) -> tuple[dict[str, Any] | None, str | None]:
        """(manifest, None) for a complete artifact, else (None, why not)."""
        where = f"{self.uri_for(key)}/{MANIFEST}"
        raw = self._read(_join(key, MANIFEST))
        if raw is None:
            return None, f"no {MANIFEST} (an interrupted or unfinished upload)"
        try:
            manifest = validate_manifest(json.loads(raw), where)
        except (ValueError, ArtifactIncomplete) as exc:
            return None, f"{MANIFEST} is damaged: {exc}"
        return manifest, self._missing(key, manifest, self._sizes(key))

    def _missing(self, key: str, manifest: dict[str, Any], sizes: dict[str, int]) -> str | None:
        for rel, meta in manifest["files"].items():
            size = sizes.get(_join(key, rel))
            if size is None:
                return f"{rel} is listed in {MANIFEST} but missing"
            if size != meta["size"]:
                return f"{rel} has {size} bytes, {MANIFEST} says {meta['size']}"
        return None

    def manifest(self, key: str = "") -> dict[str, Any]:
        """The manifest of the complete artifact at ``key``.

        Raises:
            ArtifactNotFound: nothing complete is there (the message says why: no manifest, a missing file, ...).
        """
        key = check_key(key)
        manifest, problem = self._manifest_at(key)
        if manifest is None or problem is not None:
            raise ArtifactNotFound(f"no complete artifact at {self.uri_for(key)}: {problem}")
        return manifest

    def exists(self, key: str = "") -> bool:
        """Whether a complete artifact (manifest written, every listed file present with its size) is at ``key``."""
        key = check_key(key)
        manifest, problem = self._manifest_at(key)
        return manifest is not None and problem is None

    def list(self, prefix: str = "") -> list[str]:
        """Keys of the complete artifacts under ``prefix`` (sorted); half-uploaded ones are left out."""
        prefix = check_key(prefix)
        sizes = self._sizes(prefix)
        keys = []
        for rel in sizes:
            if rel == MANIFEST or rel.endswith("/" + MANIFEST):
                key = rel[: -len(MANIFEST)].rstrip("/")
                try:
                    manifest = validate_manifest(json.loads(self._read(rel) or b"null"), rel)
                except (ValueError, ArtifactIncomplete):
                    continue
                if self._missing(key, manifest, sizes) is None:
                    keys.append(key)
        return sorted(keys)

    def upload_dir(self, local_dir: str | Path, key: str = "", *, overwrite: bool = False) -> str:
        """Upload a directory to ``key``: every file, a size check, then the manifest. Idempotent: when the same
        content is already complete there, nothing is sent.

        Returns:
            the artifact's URI (``uri_for(key)``).
        Raises:
            ArtifactConflict: a complete artifact with other content is there and ``overwrite`` is false.
            ArtifactError: the upload failed (what was sent is removed, best effort; without the manifest it is never
                taken for complete in any case).
        """
        key = check_key(key)
        local_dir = Path(local_dir)
        manifest = build_manifest(local_dir)
        existing, problem = self._manifest_at(key)
        if existing is not None and problem is None:
            if same_content(existing, manifest):
                log.info("artifact %s is already complete with the same content", self.uri_for(key))
                return self.uri_for(key)
            if not overwrite:
                raise ArtifactConflict(
                    f"{self.uri_for(key)} already holds a complete artifact with other content; "
                    "upload to another key or pass overwrite=True"
                )
        self._delete(_join(key, MANIFEST))  # an overwrite in progress is not complete
        t0 = time.perf_counter()
        try:
            self._upload_files(local_dir, key, manifest)
        except BaseException as exc:
            if key:
                try:
                    self._delete_prefix(key)
                except Exception:  # the manifest is absent, so leftovers are never taken for complete
                    log.warning("could not remove the partial upload at %s", self.uri_for(key), exc_info=True)
            if isinstance(exc, Exception) and not isinstance(exc, ArtifactError):
                raise ArtifactError(f"upload of {local_dir} to {self.uri_for(key)} failed: {exc}") from exc
            raise
        log.info(
            "uploaded %s (%d files, %.1f MB) to %s in %.1f s",
            local_dir,
            len(manifest["files"]),
            manifest["total_bytes"] / 1e6,
            self.uri_for(key),
            time.perf_counter() - t0,
        )
        return self.uri_for(key)

    def _upload_files(self, local_dir: Path, key: str, manifest: dict[str, Any]) -> None:
        for rel in manifest["files"]:
            self._put(local_dir / rel, _join(key, rel))
        problem = self._missing(key, manifest, self._sizes(key))
        if problem is not None:
            raise ArtifactIncomplete(f"after uploading to {self.uri_for(key)}: {problem}")
        with tempfile.TemporaryDirectory(prefix="ola-manifest-") as tmp:
            path = Path(tmp) / MANIFEST
            path.write_text(json.dumps({**manifest, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
            self._put(path, _join(key, MANIFEST))

    def download_dir(self, key: str = "", dest: str | Path = ".", *, overwrite: bool = False) -> Path:
        """Download the complete artifact at ``key`` into ``dest``, atomically and verified.

        Returns:
            ``dest``, holding exactly the manifest's files (the manifest itself is not copied).
        Raises:
            ArtifactNotFound: no complete artifact at ``key``.
            ArtifactIncomplete: a downloaded file's size or sha256 differs from the manifest (``dest`` is untouched).
            FileExistsError: ``dest`` exists and ``overwrite`` is false.
        """
        key = check_key(key)
        dest = Path(dest)
        if dest.exists() and not overwrite:
            raise FileExistsError(f"download destination {dest} exists; remove it or pass overwrite=True")
        manifest = self.manifest(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            for rel, meta in manifest["files"].items():
                local = tmp / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                self._get(_join(key, rel), local)
                size = local.stat().st_size
                if size != meta["size"] or _sha256(local) != meta["sha256"]:
                    raise ArtifactIncomplete(
                        f"{self.uri_for(key)}/{rel}: downloaded {size} bytes whose sha256 does not match "
                        f"{MANIFEST} ({meta['size']} bytes, {meta['sha256'][:12]}...); the stored artifact is damaged"
                    )
            _replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    def delete(self, key: str) -> None:
        """Remove the artifact at ``key``: the manifest first (so it stops being complete), then its files."""
        key = check_key(key)
        if not key:
            raise ArtifactError(f"refusing to delete the whole store {self.uri}; name a key")
        self._delete(_join(key, MANIFEST))
        self._delete_prefix(key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def _replace_dir(src: Path, dest: Path) -> None:
    """Move a finished directory into place; an existing ``dest`` is swapped out first, then removed."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(dest, old)
    os.rename(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class LocalArtifactStore(ArtifactStore):
    """A directory: ``root/<key>/...``. Uploads are staged next to the key and renamed into place."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def _put(self, local: Path, rel: str) -> None:
        target = self._path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(fd)
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _get(self, rel: str, local: Path) -> None:
        shutil.copyfile(self._path(rel), local)

    def _read(self, rel: str) -> bytes | None:
        path = self._path(rel)
        return path.read_bytes() if path.is_file() else None

    def _sizes(self, prefix: str) -> dict[str, int]:
        base = self._path(prefix)
        if not base.is_dir():
            return {}
        out = {}
        for path in base.rglob("*"):
            rel = path.relative_to(self.root).as_posix()
            if path.is_file() and not any(part.startswith(".") for part in rel.split("/")):
                out[rel] = path.stat().st_size
        return out

    def _delete(self, rel: str) -> None:
        self._path(rel).unlink(missing_ok=True)

    def _delete_prefix(self, prefix: str) -> None:
        if prefix:
            shutil.rmtree(self._path(prefix), ignore_errors=True)

    def _upload_files(self, local_dir: Path, key: str, manifest: dict[str, Any]) -> None:
        """Stage the whole directory (files + manifest) next to the key, then rename it into place."""
        if not key:
            super()._upload_files(local_dir, key, manifest)
            return
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = LocalArtifactStore(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            super(LocalArtifactStore, staging)._upload_files(local_dir, "", manifest)
            _replace_dir(staging.root, target)
        except BaseException:
            shutil.rmtree(staging.root, ignore_errors=True)
            raise


class S3ArtifactStore(ArtifactStore):
    """``s3://bucket/prefix`` through boto3 (S3 or MinIO); large files go up in multipart uploads."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client: Any = None) -> None:
        if not bucket:
            raise ArtifactError("s3 artifact store: the bucket name is empty (expected s3://bucket/prefix)")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or s3_endpoint_from_env()
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10),
            )
        self.client = client

    def _key(self, rel: str) -> str:
        return _join(self.prefix, rel)

    @contextmanager
    def _errors(self, what: str, rel: str) -> Iterator[None]:
        """S3 client errors (unreachable endpoint, denied, no bucket) as ArtifactError naming the object."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            raise ArtifactError(f"S3 {what} of s3://{self.bucket}/{self._key(rel)} failed: {exc}") from exc

    def _put(self, local: Path, rel: str) -> None:
        with self._errors("upload", rel):
            self.client.upload_file(str(local), self.bucket, self._key(rel))

    def _get(self, rel: str, local: Path) -> None:
        with self._errors("download", rel):
            self.client.download_file(self.bucket, self._key(rel), str(local))

    def _read(self, rel: str) -> bytes | None:
        from botocore.exceptions import ClientError

        with self._errors("read", rel):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise

    def _objects(self, prefix: str) -> list[dict[str, Any]]:
        full = self._key(prefix)
        objects: list[dict[str, Any]] = []
        with self._errors("listing", prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{full}/" if full else ""):
                objects.extend(page.get("Contents", []))
        return objects

    def _sizes(self, prefix: str) -> dict[str, int]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        return {obj["Key"][strip:]: int(obj["Size"]) for obj in self._objects(prefix)}

    def _delete(self, rel: str) -> None:
        with self._errors("delete", rel):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(rel))

    def _delete_prefix(self, prefix: str) -> None:
        keys = [{"Key": obj["Key"]} for obj in self._objects(prefix)]
        with self._errors("delete", prefix):
            for start in range(0, len(keys), 1000):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[start : start + 1000]})


class MlflowArtifactStore(ArtifactStore):
    """An artifact location an MLflow tracking server proxies (``mlflow-artifacts:/...``), through MLflow's client."""

    def __init__(self, uri: str, *, tracking_uri: str | None = None) -> None:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        self.uri = uri.rstrip("/")
        self.tracking_uri = tracking_uri
        self.repo = get_artifact_repository(self.uri, tracking_uri=tracking_uri)

    @contextmanager
    def _errors(self, what: str, rel: str) -> Iterator[None]:
        """MLflow client errors (server unreachable, refused) as ArtifactError naming the object."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except (MlflowException, OSError) as exc:
            raise ArtifactError(f"MLflow artifact {what} of {self.uri}/{rel} failed: {exc}") from exc

    def _put(self, local: Path, rel: str) -> None:
        if local.name != PurePosixPath(rel).name:  # MLflow keeps the local file's name
            with tempfile.TemporaryDirectory() as tmp:
                renamed = Path(tmp) / PurePosixPath(rel).name
                shutil.copyfile(local, renamed)
                self._put(renamed, rel)
            return
        parent = str(PurePosixPath(rel).parent)
        with self._errors("upload", rel):
            self.repo.log_artifact(str(local), None if parent == "." else parent)

    def _get(self, rel: str, local: Path) -> None:
        with tempfile.TemporaryDirectory(dir=local.parent) as tmp, self._errors("download", rel):
            got = self.repo.download_artifacts(rel, dst_path=tmp)
            os.replace(got, local)

    def _read(self, rel: str) -> bytes | None:
        parent = str(PurePosixPath(rel).parent)
        with self._errors("read", rel):
            names = {info.path for info in self.repo.list_artifacts(None if parent == "." else parent)}
            if rel not in names:
                return None
            with tempfile.TemporaryDirectory() as tmp:
                return Path(self.repo.download_artifacts(rel, dst_path=tmp)).read_bytes()

    def _sizes(self, prefix: str) -> dict[str, int]:
        out: dict[str, int] = {}
        pending = [prefix or None]
        with self._errors("listing", prefix):
            while pending:
                for info in self.repo.list_artifacts(pending.pop()):
                    if info.is_dir:
                        pending.append(info.path)
                    else:
                        out[info.path] = int(info.file_size or 0)
        return out

    def _delete(self, rel: str) -> None:
        try:
            self.repo.delete_artifacts(rel)
        except Exception as exc:  # absent objects: the servers differ in how they say so
            log.debug("delete of %s/%s: %s", self.uri, rel, exc)

    def _delete_prefix(self, prefix: str) -> None:
        if prefix:
            self._delete(prefix)


# ---------------------------------------------------------------------------------------------------- opening
def s3_endpoint_from_env() -> str | None:
    """The S3 endpoint from ``OLA_S3_ENDPOINT_URL``, else ``MLFLOW_S3_ENDPOINT_URL``; None: AWS."""
    for name in S3_ENDPOINT_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix). Raises ArtifactError naming the URI."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ArtifactError(f"artifact URI {uri!r}: expected s3://bucket/prefix")
    return parsed.netloc, parsed.path.strip("/")


def open_store(uri: str | Path, *, endpoint_url: str | None = None, tracking_uri: str | None = None) -> ArtifactStore:
    """The store for a URI: ``s3://bucket/prefix``, a directory (``/path``, ``file:///path``), or an MLflow
    artifact location (``mlflow-artifacts:/...``, ``http(s)://``).

    Raises:
        ArtifactError: an empty URI or an unsupported scheme.
    """
    uri = str(uri)
    if not uri:
        raise ArtifactError("artifact URI is empty; give s3://bucket/prefix or a directory")
    scheme = urlparse(uri).scheme
    if scheme == "s3":
        bucket, prefix = parse_s3_uri(uri)
        return S3ArtifactStore(bucket, prefix, endpoint_url=endpoint_url)
    if scheme == "file":
        return LocalArtifactStore(urlparse(uri).path)
    if scheme in ("mlflow-artifacts", "http", "https"):
        return MlflowArtifactStore(uri, tracking_uri=tracking_uri)
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        return LocalArtifactStore(uri)
    raise ArtifactError(
        f"artifact URI {uri!r}: unsupported scheme {scheme!r}; "
        "expected s3://, a directory, file:// or mlflow-artifacts:/"
    )


__all__ = [
    "MANIFEST",
    "ArtifactConflict",
    "ArtifactError",
    "ArtifactIncomplete",
    "ArtifactNotFound",
    "ArtifactStore",
    "LocalArtifactStore",
    "MlflowArtifactStore",
    "S3ArtifactStore",
    "build_manifest",
    "check_key",
    "open_store",
    "parse_s3_uri",
    "s3_endpoint_from_env",
]
