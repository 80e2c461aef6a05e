"""Resolving ``ola.common.v1.MediaRef``: inline bytes or ``s3://bucket/key`` objects, size-limited and hashed.

The resolved bytes carry their SHA-256, which keys the encoder cache (:mod:`services.cache`). A ``sha256`` the
client sends is verified (mismatch: INVALID_ARGUMENT). Payloads over ``MediaConfig.max_payload_bytes`` get
RESOURCE_EXHAUSTED naming the limit, before an object larger than it is downloaded.

The object store is any S3-compatible server (MinIO in production, moto in tests), configured by
:class:`S3Config` or, field by field, by the environment: ``OLA_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` (boto3's own credential chain applies to whatever is unset).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from services.errors import InvalidArgument, PayloadTooLarge, Unavailable
from services.gen.ola.common.v1 import errors_pb2, media_pb2

log = logging.getLogger(__name__)

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_S3_URI = re.compile(r"^s3://(?P<bucket>[^/]+)/(?P<key>.+)$")
_INLINE_HASH_IN_THREAD = 1 << 20  # hash inline payloads above 1 MiB off the event loop


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _env_secret(name: str) -> SecretStr | None:
    value = _env(name)
    return SecretStr(value) if value else None


class S3Config(BaseModel):
    """Where ``s3://`` media references are read from. Unset fields fall back to the environment."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = Field(
        default_factory=lambda: _env("OLA_S3_ENDPOINT_URL"),
        description="S3 endpoint, e.g. http://minio:9000 (env OLA_S3_ENDPOINT_URL); None: AWS S3.",
    )
    access_key_id: SecretStr | None = Field(default_factory=lambda: _env_secret("AWS_ACCESS_KEY_ID"))
    secret_access_key: SecretStr | None = Field(default_factory=lambda: _env_secret("AWS_SECRET_ACCESS_KEY"))
    region: str = Field(default_factory=lambda: _env("AWS_DEFAULT_REGION") or "us-east-1")
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)


class MediaConfig(BaseModel):
    """Media resolution: the payload limit and the object store."""

    model_config = ConfigDict(extra="forbid")

    max_payload_bytes: int = Field(64 << 20, gt=0, description="Largest media item accepted, inline or by reference.")
    s3: S3Config = Field(default_factory=S3Config)


@dataclass(frozen=True)
class ResolvedMedia:
    """The bytes of one media item and what is known about them."""

    data: bytes
    sha256: str  # lowercase hex SHA-256 of ``data``
    mime_type: str  # as the client sent it ("" when not given)
    source: str  # "inline" or the s3:// URI, for logs and messages
    fetch_seconds: float  # time spent reading and hashing


class MediaResolver:
    """Turns MediaRefs into bytes. Thread-safe; the boto3 client is made on first use of an ``s3://`` reference."""

    def __init__(self, config: MediaConfig | None = None) -> None:
        self.config = config or MediaConfig()
        self._client: Any = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ S3
    def _s3(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                s3 = self.config.s3
                self._client = boto3.client(
                    "s3",
                    endpoint_url=s3.endpoint_url,
                    aws_access_key_id=s3.access_key_id.get_secret_value() if s3.access_key_id else None,
                    aws_secret_access_key=s3.secret_access_key.get_secret_value() if s3.secret_access_key else None,
                    region_name=s3.region,
                    config=Config(
                        connect_timeout=s3.connect_timeout_s,
                        read_timeout=s3.read_timeout_s,
                        retries={"max_attempts": 2, "mode": "standard"},
                        s3={"addressing_style": "path"},  # MinIO and moto serve buckets by path
                    ),
                )
            return self._client

    def _read_s3(self, uri: str, field: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

        match = _S3_URI.match(uri)
        if match is None:
            raise InvalidArgument(
                f"uri {uri!r} is not an s3://bucket/key reference; only s3:// is supported",
                field=field,
                reason=errors_pb2.ERROR_REASON_MEDIA_UNSUPPORTED,
            )
        limit = self.config.max_payload_bytes
        try:
            response = self._s3().get_object(Bucket=match["bucket"], Key=match["key"])
            body = response["Body"]
            try:
                size = int(response.get("ContentLength") or 0)
                if size > limit:
                    raise self._too_large(field, size, uri)
                data = body.read(limit + 1)  # never hold more than the limit, whatever the header said
            finally:
                body.close()
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
                raise Unavailable(f"the object store failed reading {uri}: {code or status}", field=field) from exc
            raise InvalidArgument(
                f"cannot read {uri}: {code or status} {error.get('Message', '')}".rstrip(), field=field
            ) from exc
        except (EndpointConnectionError, BotoCoreError) as exc:
            raise Unavailable(f"the object store is unreachable reading {uri}: {exc}", field=field) from exc
        if len(data) > limit:
            raise self._too_large(field, len(data), uri)
        return data

    def _too_large(self, field: str, size: int, what: str) -> PayloadTooLarge:
        limit = self.config.max_payload_bytes
        return PayloadTooLarge(
            f"{what} is {size} bytes, over the limit of {limit} bytes (MediaConfig.max_payload_bytes)",
            field=field,
            value=size,
            limit=limit,
            unit="bytes",
        )

    # ------------------------------------------------------------------------------------------------ public
    def resolve_sync(self, ref: media_pb2.MediaRef, field: str) -> ResolvedMedia:
        """Read and check one MediaRef (blocking). ``field`` names it in errors (``images[1]``, ``video``)."""
        start = time.perf_counter()
        expected = ref.sha256.strip().lower()
        if expected and not _SHA256_HEX.match(expected):
            raise InvalidArgument("sha256 must be 64 hex digits", field=f"{field}.sha256")
        source = ref.WhichOneof("source")
        if source == "inline_data":
            data, what = ref.inline_data, "inline data"
            if len(data) > self.config.max_payload_bytes:
                raise self._too_large(field, len(data), what)
        elif source == "uri":
            data, what = self._read_s3(ref.uri.strip(), field), ref.uri.strip()
        else:
            raise InvalidArgument("a media item needs inline_data or uri", field=field)
        if not data:
            raise InvalidArgument(
                f"{what} is empty (0 bytes)", field=field, reason=errors_pb2.ERROR_REASON_MEDIA_CORRUPT
            )
        digest = hashlib.sha256(data).hexdigest()
        if expected and digest != expected:
            raise InvalidArgument(
                f"sha256 mismatch: the {len(data)} bytes of {what} hash to {digest}, not {expected}",
                field=field,
                reason=errors_pb2.ERROR_REASON_MEDIA_CORRUPT,
            )
        source_name = "inline" if source == "inline_data" else what
        return ResolvedMedia(data, digest, ref.mime_type.strip(), source_name, time.perf_counter() - start)

    async def resolve(self, ref: media_pb2.MediaRef, field: str) -> ResolvedMedia:
        """:meth:`resolve_sync` without blocking the event loop (object-store reads and large hashes in a thread)."""
        if ref.WhichOneof("source") == "inline_data" and len(ref.inline_data) <= _INLINE_HASH_IN_THREAD:
            return self.resolve_sync(ref, field)
        return await asyncio.to_thread(self.resolve_sync, ref, field)

    async def resolve_all(self, refs: list[media_pb2.MediaRef], field: str) -> list[ResolvedMedia]:
        """Resolve ``refs`` concurrently; the error of the first failing item (in request order) is raised."""
        results = await asyncio.gather(
            *(self.resolve(ref, f"{field}[{i}]") for i, ref in enumerate(refs)), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)  # type: ignore[arg-type]
