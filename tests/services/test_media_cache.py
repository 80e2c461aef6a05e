"""Media resolution (inline, s3:// on a moto server), the encoder caches (in-process, a real Redis), the error
mapping (also through a real grpc.aio handler) and the metrics exporter."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
import urllib.request

import grpc
import pytest
import redis
import torch
from prometheus_client import CollectorRegistry

from ola_model.errors import CheckpointError, InputError, LimitError, MediaError
from services.cache import (
    CacheConfig,
    CachedBlock,
    InProcessCache,
    NullCache,
    RedisCache,
    cache_key,
    decode_value,
    encode_value,
    make_cache,
)
from services.errors import (
    InvalidArgument,
    PayloadTooLarge,
    ServiceError,
    Unavailable,
    at_field,
    rpc_errors,
    status_of,
)
from services.gen.ola.common.v1 import errors_pb2, media_pb2
from services.media import MediaConfig, MediaResolver, S3Config
from services.metrics import ServiceMetrics, start_exporter
from services.wire import error_detail, error_metadata, read_error_detail


def _block(rows: int, width: int = 8, dtype: torch.dtype = torch.float32, seed: int = 0) -> CachedBlock:
    g = torch.Generator().manual_seed(seed)
    return CachedBlock(torch.randn(rows, width, generator=g).to(dtype), {"num_frames": rows, "times": [0.5, 1.5]})


def _reason(detail: errors_pb2.ErrorDetail) -> str:
    return errors_pb2.ErrorReason.Name(detail.reason)


# ------------------------------------------------------------------------------------------------ media
def test_inline_media_is_hashed_and_verified():
    resolver = MediaResolver(MediaConfig(max_payload_bytes=1000))
    data = b"\x89PNG fake bytes"
    digest = hashlib.sha256(data).hexdigest()
    got = resolver.resolve_sync(media_pb2.MediaRef(inline_data=data, sha256=digest.upper()), "images[0]")
    assert got.data == data and got.sha256 == digest and got.source == "inline"

    with pytest.raises(InvalidArgument) as info:
        resolver.resolve_sync(media_pb2.MediaRef(inline_data=data, sha256="0" * 64), "images[2]")
    code, detail = status_of(info.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and _reason(detail) == "ERROR_REASON_MEDIA_CORRUPT"
    assert detail.field == "images[2]" and detail.message.startswith("images[2]: sha256 mismatch")

    with pytest.raises(InvalidArgument) as info:
        resolver.resolve_sync(media_pb2.MediaRef(inline_data=data, sha256="xyz"), "video")
    assert info.value.field == "video.sha256"
    with pytest.raises(InvalidArgument, match="inline_data or uri"):
        resolver.resolve_sync(media_pb2.MediaRef(), "audio")


def test_oversized_inline_payload_is_resource_exhausted():
    resolver = MediaResolver(MediaConfig(max_payload_bytes=1000))
    with pytest.raises(PayloadTooLarge) as info:
        resolver.resolve_sync(media_pb2.MediaRef(inline_data=b"x" * 1001), "images[0]")
    code, detail = status_of(info.value)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and _reason(detail) == "ERROR_REASON_PAYLOAD_TOO_LARGE"
    assert (detail.value, detail.limit, detail.unit, detail.field) == (1001, 1000, "bytes", "images[0]")
    assert "max_payload_bytes" in detail.message


def test_s3_references(s3):
    resolver = MediaResolver(MediaConfig(max_payload_bytes=2000, s3=s3.config()))
    data = bytes(range(256)) * 4
    uri = s3.put("clips/a.bin", data)
    got = asyncio.run(resolver.resolve(media_pb2.MediaRef(uri=uri), "video"))
    assert got.data == data and got.sha256 == hashlib.sha256(data).hexdigest() and got.source == uri

    big = s3.put("clips/big.bin", b"y" * 2001)
    with pytest.raises(PayloadTooLarge) as info:
        resolver.resolve_sync(media_pb2.MediaRef(uri=big), "video")
    assert (info.value.value, info.value.limit) == (2001, 2000)

    for uri, reason in [
        (f"s3://{s3.bucket}/clips/missing.bin", "ERROR_REASON_INVALID_FIELD"),
        ("s3://no-such-bucket/x", "ERROR_REASON_INVALID_FIELD"),
        ("https://example.com/a.png", "ERROR_REASON_MEDIA_UNSUPPORTED"),
    ]:
        with pytest.raises(InvalidArgument) as info:
            resolver.resolve_sync(media_pb2.MediaRef(uri=uri), "images[1]")
        code, detail = status_of(info.value)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and _reason(detail) == reason and detail.field == "images[1]"


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_object_store_is_unavailable():
    config = S3Config(endpoint_url=f"http://127.0.0.1:{_closed_port()}", access_key_id="a", secret_access_key="b")
    resolver = MediaResolver(MediaConfig(s3=config))
    with pytest.raises(Unavailable) as info:
        resolver.resolve_sync(media_pb2.MediaRef(uri="s3://media/a.png"), "images[0]")
    assert status_of(info.value)[0] == grpc.StatusCode.UNAVAILABLE


def test_s3_config_reads_the_environment(monkeypatch):
    monkeypatch.setenv("OLA_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    config = S3Config()
    assert config.endpoint_url == "http://minio:9000"
    assert config.access_key_id.get_secret_value() == "key" and "s3cr3t-value" not in repr(config)


# ------------------------------------------------------------------------------------------------ values and keys
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cache_values_round_trip_bit_exactly(dtype):
    block = _block(5, dtype=dtype)
    back = decode_value(encode_value(block))
    assert back.embeddings.dtype == dtype and torch.equal(back.embeddings, block.embeddings)
    assert back.meta == block.meta
    with pytest.raises(ValueError, match="magic"):
        decode_value(b"something else")
    with pytest.raises(ValueError, match="bytes"):
        decode_value(encode_value(block)[:-2])  # truncated


def test_cache_keys_cover_version_content_params_and_dtype():
    base = ("v1", "ab" * 32, "video", {"max_frames": 8, "stride": 64}, torch.bfloat16)
    key = cache_key(*base)
    assert cache_key("v1", "ab" * 32, "video", {"stride": 64, "max_frames": 8}, torch.bfloat16) == key  # order-free
    variants = [
        ("v2", *base[1:]),
        (base[0], "cd" * 32, *base[2:]),
        (*base[:3], {"max_frames": 16, "stride": 64}, base[4]),
        (*base[:4], torch.float32),
    ]
    assert len({key} | {cache_key(*v) for v in variants}) == 5


# ------------------------------------------------------------------------------------------------ caches
def test_in_process_cache_lru_ttl_and_size_cap():
    async def scenario() -> None:
        one = _block(4).nbytes  # 4 x 8 float32 = 128 bytes
        cache = InProcessCache(max_bytes=3 * one, ttl_s=60, max_entry_bytes=2 * one)
        for name in "abc":
            assert await cache.put(name, _block(4))
        assert await cache.get("a") is not None  # a is now the most recently used
        await cache.put("d", _block(4))  # over the cap: evicts b, the least recently used
        assert await cache.get("b") is None and await cache.get("a") is not None
        assert cache.nbytes == 3 * one and len(cache) == 3
        assert not await cache.put("huge", _block(12))  # over max_entry_bytes
        assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions, cache.stats.too_large) == (2, 1, 1, 1)

        short = InProcessCache(max_bytes=10 * one, ttl_s=0.05)
        await short.put("k", _block(4))
        assert await short.get("k") is not None
        await asyncio.sleep(0.1)
        assert await short.get("k") is None and short.nbytes == 0  # expired and freed

    asyncio.run(scenario())


def test_make_cache_follows_the_config(redis_url):
    assert isinstance(make_cache(), InProcessCache)
    assert isinstance(make_cache(CacheConfig(enabled=False)), NullCache)
    assert isinstance(make_cache(CacheConfig(redis_url=redis_url)), RedisCache)


def test_redis_cache_round_trip_and_ttl(redis_url):
    cache = RedisCache(redis_url, ttl_s=0.8, max_entry_bytes=10_000, key_prefix="test:rt:")
    block = _block(6, dtype=torch.bfloat16)

    async def store_and_read() -> CachedBlock | None:
        assert await cache.put("k", block)
        assert not await cache.put("huge", _block(1000))  # 32 kB > max_entry_bytes: not stored
        got = await cache.get("k")
        await cache.close()
        return got

    got = asyncio.run(store_and_read())
    assert got is not None and torch.equal(got.embeddings, block.embeddings) and got.meta == block.meta
    raw = redis.Redis.from_url(redis_url)
    assert 0 < raw.pttl("test:rt:k") <= 800  # stored with its TTL (PX)
    assert not raw.exists("test:rt:huge")
    time.sleep(0.9)

    async def read() -> CachedBlock | None:
        got = await cache.get("k")
        await cache.close()
        return got

    assert asyncio.run(read()) is None  # Redis expired it
    assert (cache.stats.hits, cache.stats.misses, cache.stats.stores, cache.stats.too_large) == (1, 1, 1, 1)
    raw.close()


def test_redis_outage_is_a_miss_not_an_error():
    cache = RedisCache(f"redis://127.0.0.1:{_closed_port()}/0", ttl_s=10, max_entry_bytes=10_000, timeout_s=0.5)

    async def scenario() -> tuple[bool, CachedBlock | None]:
        stored = await cache.put("k", _block(2))
        got = await cache.get("k")
        await cache.close()
        return stored, got

    assert asyncio.run(scenario()) == (False, None)
    assert cache.stats.errors == 2 and cache.stats.misses == 1


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("exc", "field", "code", "reason", "unit"),
    [
        (LimitError("video frames", 80, 64), "max_frames", "INVALID_ARGUMENT", "TOO_MANY_FRAMES", "frames"),
        (LimitError("audio duration (seconds)", 800, 750), "audio", "INVALID_ARGUMENT", "AUDIO_TOO_LONG", "seconds"),
        (LimitError("prompt length in tokens", 20000, 16384), "", "INVALID_ARGUMENT", "CONTEXT_OVERFLOW", "tokens"),
        (MediaError("image", "<3 bytes>", "not a recognised image format"), "images[0]", "INVALID_ARGUMENT",
         "MEDIA_UNSUPPORTED", ""),
        (MediaError("video", "<3 bytes>", "no frames could be decoded"), "video", "INVALID_ARGUMENT", "MEDIA_CORRUPT",
         ""),
        (InputError("bad shape"), "blocks[0]", "INVALID_ARGUMENT", "INVALID_FIELD", ""),
        (CheckpointError("missing keys"), "", "FAILED_PRECONDITION", "BACKEND_UNAVAILABLE", ""),
        (RuntimeError("boom"), "", "INTERNAL", "ERROR_REASON_UNSPECIFIED", ""),
    ],
)  # fmt: skip
def test_status_of_maps_model_errors(exc, field, code, reason, unit):
    with pytest.raises(Exception) as info, at_field(field):
        raise exc
    got_code, detail = status_of(info.value)
    assert got_code.name == code and _reason(detail).endswith(reason) and detail.unit == unit
    assert detail.field == (field or ("context" if "CONTEXT" in reason else ""))
    if isinstance(exc, LimitError):
        assert (detail.value, detail.limit) == (exc.value, exc.limit)
    if field:
        assert detail.message.startswith(f"{field}: ")
    assert "boom" not in detail.message  # internal details stay in the server log


def test_innermost_field_wins():
    with pytest.raises(ServiceError) as info, at_field("images"), at_field("images[3]"):
        raise InvalidArgument("bad")
    assert info.value.field == "images[3]"


def test_downstream_statuses_and_replica_failures():
    detail = error_detail(errors_pb2.ERROR_REASON_TOO_MANY_FRAMES, "max_frames: too many", "max_frames", 80, 64)
    downstream = grpc.aio.AioRpcError(
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*error_metadata(detail)),
        details="max_frames: too many",
    )
    assert status_of(downstream) == (grpc.StatusCode.INVALID_ARGUMENT, detail)  # passed on unchanged
    bare = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="down")
    code, got = status_of(bare)
    assert code == grpc.StatusCode.UNAVAILABLE and _reason(got) == "ERROR_REASON_OVERLOADED"

    ray_exceptions = pytest.importorskip("ray.exceptions")
    code, got = status_of(ray_exceptions.ActorUnavailableError("replica gone", None))
    assert code == grpc.StatusCode.UNAVAILABLE and _reason(got) == "ERROR_REASON_OVERLOADED"
    assert status_of(TimeoutError("slow"))[0] == grpc.StatusCode.DEADLINE_EXCEEDED


def test_rpc_errors_ends_a_real_call_with_the_status_and_detail(aio):
    async def fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async with rpc_errors(context):
            with at_field("video"):
                raise LimitError("video frames", 80, 64)
        return b""  # pragma: no cover

    handler = grpc.method_handlers_generic_handler("test.Errors", {"Fail": grpc.unary_unary_rpc_method_handler(fail)})
    port = aio.serve(lambda server: server.add_generic_rpc_handlers((handler,)))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/test.Errors/Fail")(b"x", timeout=10)
    detail = read_error_detail(info.value.trailing_metadata())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and detail is not None
    assert (detail.field, detail.value, detail.limit, detail.unit) == ("video", 80, 64, "frames")
    assert info.value.details() == detail.message == "video: video frames is 80, over the limit of 64"


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_exporter_serves_the_registry():
    metrics = ServiceMetrics(CollectorRegistry())
    metrics.observe_rpc("vision", "EncodeImages", "OK", 0.2)
    metrics.observe_rpc("vision", "EncodeImages", "INVALID_ARGUMENT", 0.01)
    metrics.cache_lookup("vision", "image", hit=True)
    metrics.engine_step("tiny@1", batch_size=3, running=3, waiting=1)
    metrics.time_to_first_audio.labels("gateway", "tiny@1").observe(0.4)
    server, _ = start_exporter(0, addr="127.0.0.1", registry=metrics.registry)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
    assert 'ola_requests_total{code="OK",method="EncodeImages",service="vision"} 1.0' in text
    assert 'ola_request_errors_total{code="INVALID_ARGUMENT",method="EncodeImages",service="vision"} 1.0' in text
    assert 'ola_encoder_cache_lookups_total{kind="image",result="hit",service="vision"} 1.0' in text
    assert 'ola_llm_batch_size_sum{model_version="tiny@1"} 3.0' in text
    assert "ola_time_to_first_audio_seconds_count" in text
    assert metrics.sample_value("ola_llm_waiting_requests", {"model_version": "tiny@1"}) == 1
