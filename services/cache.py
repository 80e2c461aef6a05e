"""The encoder output cache: embedding blocks keyed by what determines them.

A key (:func:`cache_key`) covers the model version (its encoder and projector), the SHA-256 of the media bytes, the
preprocessing parameters (frames to sample, geometry and length limits) and the output dtype, so a hit is exactly
the block the encoder would compute. Values are :class:`CachedBlock`: the (N, C) tensor plus a little JSON metadata
(a video's frame count and size, an audio clip's duration).

Two implementations of the :class:`EncoderCache` protocol, chosen by :class:`CacheConfig` (:func:`make_cache`):

- :class:`InProcessCache` (the embedded default, no Redis): LRU with a TTL per entry and a cap on the total bytes;
- :class:`RedisCache` (``redis_url`` set): entries are ``SET key value PX ttl`` on a real Redis, so every replica
  shares them and Redis expires them. A value is a small header (magic, dtype, shape, metadata) followed by the
  tensor's raw little-endian bytes (:mod:`services.wire` layout). Entries over ``max_entry_bytes`` are not stored;
  the total size is Redis's job: run it with ``maxmemory`` and an eviction policy such as ``allkeys-lru`` (or
  ``volatile-lru``, since every entry has a TTL), so a full cache evicts instead of refusing writes.

A cache never fails a request: a Redis error is logged and counted (``stats.errors``), and the lookup is a miss.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field

from services.gen.ola.common.v1 import tensor_pb2
from services.wire import tensor_from_proto, tensor_to_proto

log = logging.getLogger(__name__)

_MAGIC = b"OLAEMB1\n"  # value format version: bump when the layout changes
_HEADER_LEN = struct.Struct("<I")


@dataclass
class CachedBlock:
    """One cached encoder output: ``embeddings`` (N, C) and JSON-serializable ``meta``."""

    embeddings: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.embeddings.numel() * self.embeddings.element_size()


@dataclass
class CacheStats:
    """Counters of one cache (the servicers also export hits / misses as Prometheus metrics)."""

    hits: int = 0
    misses: int = 0
    stores: int = 0
    too_large: int = 0  # entries not stored because they are over max_entry_bytes
    evictions: int = 0  # in-process only: entries dropped for the byte cap
    errors: int = 0  # Redis failures (each counted as a miss or a skipped store)


def cache_key(model_version: str, content_sha256: str, kind: str, params: Mapping[str, Any], dtype: torch.dtype) -> str:
    """The key of one encoder output (without the cache's prefix).

    Args:
        model_version: the version whose encoder + projector produce the block.
        content_sha256: hex SHA-256 of the encoded media bytes.
        kind: ``image`` / ``video`` / ``audio``.
        params: every preprocessing parameter that changes the output (JSON-serializable).
        dtype: the dtype the block is returned in.
    """
    canonical = json.dumps(
        {"v": model_version, "sha256": content_sha256, "kind": kind, "params": dict(params), "dtype": str(dtype)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return f"{kind}:{model_version}:{hashlib.sha256(canonical.encode()).hexdigest()}"


def encode_value(block: CachedBlock) -> bytes:
    """Serialize a block: magic, header length, JSON header (dtype, shape, meta), raw tensor bytes."""
    proto = tensor_to_proto(block.embeddings)
    header = json.dumps(
        {"dtype": tensor_pb2.DType.Name(proto.dtype), "shape": list(proto.shape), "meta": block.meta},
        separators=(",", ":"),
    ).encode()
    return b"".join((_MAGIC, _HEADER_LEN.pack(len(header)), header, proto.data))


def decode_value(value: bytes) -> CachedBlock:
    """Inverse of :func:`encode_value`; ``ValueError`` for a value of another format or a truncated one."""
    if not value.startswith(_MAGIC):
        raise ValueError("not an encoder cache value (bad magic)")
    offset = len(_MAGIC)
    (length,) = _HEADER_LEN.unpack_from(value, offset)
    offset += _HEADER_LEN.size
    header = json.loads(value[offset : offset + length])
    proto = tensor_pb2.Tensor(
        dtype=tensor_pb2.DType.Value(header["dtype"]), shape=header["shape"], data=value[offset + length :]
    )
    return CachedBlock(tensor_from_proto(proto, "cached block"), header.get("meta", {}))


@runtime_checkable
class EncoderCache(Protocol):
    """Where encoder outputs are kept. Methods never raise for backend failures."""

    stats: CacheStats

    async def get(self, key: str) -> CachedBlock | None:
        """The block under ``key``, or None (absent, expired or unreadable)."""
        ...

    async def put(self, key: str, block: CachedBlock) -> bool:
        """Store ``block``; False when it was not stored (over the entry size cap, disabled, backend error)."""
        ...

    async def close(self) -> None: ...


class NullCache:
    """No caching (``CacheConfig.enabled = False``): every lookup is a miss."""

    def __init__(self) -> None:
        self.stats = CacheStats()

    async def get(self, key: str) -> CachedBlock | None:
        self.stats.misses += 1
        return None

    async def put(self, key: str, block: CachedBlock) -> bool:
        return False

    async def close(self) -> None:
        return None


class InProcessCache:
    """LRU cache in this process's memory, with a TTL per entry and a cap on the bytes of all entries.

    Args:
        max_bytes: total tensor bytes kept; least recently used entries are evicted beyond it.
        ttl_s: seconds an entry lives after it is stored.
        max_entry_bytes: larger entries are not stored at all.
    """

    def __init__(self, max_bytes: int, ttl_s: float, max_entry_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.max_entry_bytes = min(max_entry_bytes or max_bytes, max_bytes)
        self.stats = CacheStats()
        self._entries: OrderedDict[str, tuple[float, CachedBlock]] = OrderedDict()  # key -> (expiry, block)
        self._bytes = 0
        self._lock = threading.Lock()  # servicers may run in several threads (Ray Serve replicas' executors)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> CachedBlock | None:
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] <= now:
                self._drop(key)
                entry = None
            if entry is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry[1]

    async def put(self, key: str, block: CachedBlock) -> bool:
        size = block.nbytes
        if size > self.max_entry_bytes:
            self.stats.too_large += 1
            return False
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (time.monotonic() + self.ttl_s, block)
            self._bytes += size
            self.stats.stores += 1
            while self._bytes > self.max_bytes:
                oldest = next(iter(self._entries))
                self._drop(oldest)
                self.stats.evictions += 1
        return True

    def _drop(self, key: str) -> None:
        _, block = self._entries.pop(key)
        self._bytes -= block.nbytes

    async def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


class RedisCache:
    """Encoder outputs in Redis (shared by every replica), each with a TTL.

    Args:
        url: ``redis://host:port/db`` (``rediss://`` for TLS; a password in the URL or ``password``).
        ttl_s: seconds an entry lives (sent as milliseconds, ``PX``).
        max_entry_bytes: larger values are not stored (the total is bounded by Redis's ``maxmemory``).
        key_prefix: prepended to every key.
        timeout_s: socket connect / read timeout, so a Redis outage costs a request little time.
    """

    def __init__(
        self,
        url: str,
        ttl_s: float,
        max_entry_bytes: int,
        key_prefix: str = "ola:emb:",
        timeout_s: float = 1.0,
        password: str | None = None,
    ) -> None:
        self.url = url
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.max_entry_bytes = max_entry_bytes
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self.password = password
        self.stats = CacheStats()
        # redis.asyncio connections belong to the event loop that made them: one client per loop.
        self._clients: dict[asyncio.AbstractEventLoop, Any] = {}

    def _client(self) -> Any:
        import redis.asyncio as aioredis

        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            for old in [lp for lp in self._clients if lp.is_closed()]:
                del self._clients[old]
            client = aioredis.Redis.from_url(
                self.url,
                password=self.password,
                socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s,
            )
            self._clients[loop] = client
        return client

    async def get(self, key: str) -> CachedBlock | None:
        from redis.exceptions import RedisError

        try:
            value = await self._client().get(self.key_prefix + key)
        except (RedisError, OSError) as exc:
            self.stats.errors += 1
            self.stats.misses += 1
            log.warning("encoder cache: Redis GET failed (%s); treating as a miss", exc)
            return None
        if value is None:
            self.stats.misses += 1
            return None
        try:
            block = decode_value(value)
        except (ValueError, KeyError, struct.error) as exc:
            self.stats.errors += 1
            self.stats.misses += 1
            log.warning("encoder cache: unreadable value under %s (%s); treating as a miss", key, exc)
            return None
        self.stats.hits += 1
        return block

    async def put(self, key: str, block: CachedBlock) -> bool:
        from redis.exceptions import RedisError

        value = encode_value(block)
        if len(value) > self.max_entry_bytes:
            self.stats.too_large += 1
            return False
        try:
            await self._client().set(self.key_prefix + key, value, px=self.ttl_ms)
        except (RedisError, OSError) as exc:
            self.stats.errors += 1
            log.warning("encoder cache: Redis SET failed (%s); not cached", exc)
            return False
        self.stats.stores += 1
        return True

    async def close(self) -> None:
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()


class CacheConfig(BaseModel):
    """Which encoder cache a servicer uses. ``redis_url`` set: :class:`RedisCache`; else :class:`InProcessCache`."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    redis_url: str | None = Field(None, description="redis://host:port/db; None: the in-process cache")
    ttl_s: float = Field(3600.0, gt=0, description="Seconds an entry lives.")
    max_bytes: int = Field(1 << 30, gt=0, description="In-process cache: total bytes kept (LRU beyond).")
    max_entry_bytes: int = Field(128 << 20, gt=0, description="Entries larger than this are not cached.")
    key_prefix: str = "ola:emb:"
    redis_timeout_s: float = Field(1.0, gt=0)


def make_cache(config: CacheConfig | None = None) -> EncoderCache:
    """The cache ``config`` describes (the in-process default when None)."""
    config = config or CacheConfig()
    if not config.enabled:
        return NullCache()
    if config.redis_url:
        return RedisCache(
            config.redis_url,
            ttl_s=config.ttl_s,
            max_entry_bytes=config.max_entry_bytes,
            key_prefix=config.key_prefix,
            timeout_s=config.redis_timeout_s,
        )
    return InProcessCache(max_bytes=config.max_bytes, ttl_s=config.ttl_s, max_entry_bytes=config.max_entry_bytes)
