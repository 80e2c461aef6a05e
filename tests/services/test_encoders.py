"""The vision and audio encoder services over real gRPC (grpc.aio servers on loopback): blocks equal the model's
own outputs and token counts, the caches (in-process and a real Redis, with TTL), s3:// references, error codes
with details, and health."""

from __future__ import annotations

import hashlib
import io
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import soundfile as sf
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from ola_model.processing.audio import load_audio, process_audio
from ola_model.processing.image import load_image, process_image
from ola_model.processing.video import load_video, video_frame_size
from ola_model.tokens import audio_num_tokens, image_num_tokens, video_num_tokens
from services import audio as audio_service
from services import vision as vision_service
from services.audio import AudioEncoderServicer
from services.cache import CacheConfig, InProcessCache, RedisCache, make_cache
from services.gen.ola.audio.v1 import audio_pb2, audio_pb2_grpc
from services.gen.ola.common.v1 import embedding_pb2, errors_pb2, media_pb2, tensor_pb2
from services.gen.ola.vision.v1 import vision_pb2, vision_pb2_grpc
from services.media import MediaConfig, MediaResolver
from services.vision import VisionEncoderServicer
from services.wire import read_error_detail, tensor_from_proto

F32 = tensor_pb2.DTYPE_FLOAT32
MAX_PAYLOAD = 200_000


@pytest.fixture(scope="module")
def servicers(registry):
    media = MediaResolver(MediaConfig(max_payload_bytes=MAX_PAYLOAD))
    vision = VisionEncoderServicer(registry=registry, media=media)
    audio = AudioEncoderServicer(registry=registry, media=media)
    return vision, audio


@pytest.fixture(scope="module")
def channel(aio, servicers):
    vision, audio = servicers

    def register(server: grpc.aio.Server) -> None:
        health = vision_service.add_to_server(server, vision)
        audio_service.add_to_server(server, audio, health)

    port = aio.serve(register)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def vision_stub(channel):
    return vision_pb2_grpc.VisionEncoderServiceStub(channel)


@pytest.fixture(scope="module")
def audio_stub(channel):
    return audio_pb2_grpc.AudioEncoderServiceStub(channel)


def _inline(data: bytes, **kw) -> media_pb2.MediaRef:
    return media_pb2.MediaRef(inline_data=data, **kw)


def _tensor(block: embedding_pb2.EmbeddingBlock) -> torch.Tensor:
    return tensor_from_proto(block.embeddings)


def _error(info: pytest.ExceptionInfo) -> tuple[grpc.StatusCode, errors_pb2.ErrorDetail]:
    detail = read_error_detail(info.value.trailing_metadata())
    assert detail is not None, "every error carries an ErrorDetail trailer"
    assert detail.message == info.value.details()
    return info.value.code(), detail


# ------------------------------------------------------------------------------------------------ images
def test_encode_images_equals_the_model_and_caches(vision_stub, tiny_model, make_media, version):
    images = [make_media.png((64, 48), (10, 200, 10)), make_media.png((40, 40), (10, 10, 250))]
    request = vision_pb2.EncodeImagesRequest(
        request_id="r1", model_version=version, images=[_inline(b) for b in images], output_dtype=F32
    )
    first = vision_stub.EncodeImages(request, timeout=60)
    assert first.model_version == version and len(first.blocks) == 2
    views = [process_image(load_image(b)) for b in images]
    with torch.inference_mode():
        expected = tiny_model.encode_images([(v.lowres, v.highres) for v in views])
    for block, want, (w, h) in zip(first.blocks, expected, [(64, 48), (40, 40)], strict=True):
        assert block.num_tokens == image_num_tokens(w, h) == want.shape[0]
        assert block.modality == embedding_pb2.MODALITY_IMAGE and block.model_version == version
        assert not block.cache_hit
        assert torch.equal(_tensor(block), want)
    assert first.timings.vision_encode.ToNanoseconds() > 0

    again = vision_stub.EncodeImages(request, timeout=60)
    assert [b.cache_hit for b in again.blocks] == [True, True]
    assert [b.embeddings for b in again.blocks] == [b.embeddings for b in first.blocks]
    assert again.timings.vision_encode.ToNanoseconds() == 0  # the encoder did not run

    # The default dtype is the model's own (float32 for the tiny checkpoint); bfloat16 is a different cache entry.
    bf16 = vision_stub.EncodeImages(
        vision_pb2.EncodeImagesRequest(images=[_inline(images[0])], output_dtype=tensor_pb2.DTYPE_BFLOAT16), timeout=60
    )
    assert bf16.model_version == version and not bf16.blocks[0].cache_hit
    assert torch.equal(_tensor(bf16.blocks[0]), expected[0].to(torch.bfloat16))
    native = vision_stub.EncodeImages(vision_pb2.EncodeImagesRequest(images=[_inline(images[0])]), timeout=60)
    assert native.blocks[0].cache_hit and native.blocks[0].embeddings.dtype == F32


def test_concurrent_requests_share_vit_calls_and_equal_encoding_alone(
    vision_stub, servicers, tiny_model, make_media, version
):
    vision, _ = servicers
    # sizes of three token counts, fresh colours (no cache hits)
    images = [make_media.png((48 + 16 * (k % 3), 40), (7 + 31 * k, 123, 201 - 17 * k)) for k in range(8)]
    before = len(vision.image_batcher.calls)

    def encode(data: bytes):
        request = vision_pb2.EncodeImagesRequest(images=[_inline(data)], output_dtype=F32)
        return vision_stub.EncodeImages(request, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(encode, images))
    for reply, data in zip(replies, images, strict=True):
        views = process_image(load_image(data))
        with torch.inference_mode():
            alone = tiny_model.encode_images([(views.lowres, views.highres)])[0]
        assert reply.model_version == version and not reply.blocks[0].cache_hit
        torch.testing.assert_close(_tensor(reply.blocks[0]), alone, atol=1e-5, rtol=1e-5)
    assert sum(list(vision.image_batcher.calls)[before:]) == 8  # every request went through the batcher once


def test_image_errors_have_codes_and_details(vision_stub, media, version):
    good = _inline(media.red_png)
    cases = [
        ({"images": [good, _inline(media.corrupt_png)]}, "INVALID_ARGUMENT", "images[1]"),
        ({"images": [_inline(b"\0" * (MAX_PAYLOAD + 1))]}, "RESOURCE_EXHAUSTED", "images[0]"),
        ({"images": [_inline(media.red_png, sha256=hashlib.sha256(b"other").hexdigest())]}, "INVALID_ARGUMENT",
         "images[0]"),
        ({"images": [good], "model_version": "tiny@404"}, "NOT_FOUND", "model_version"),
        ({"images": []}, "INVALID_ARGUMENT", "images"),
        ({"images": [good], "output_dtype": tensor_pb2.DTYPE_INT64}, "INVALID_ARGUMENT", "output_dtype"),
        ({"images": [good, good, _inline(b"plain text, not a picture")]}, "INVALID_ARGUMENT", "images[2]"),
    ]  # fmt: skip
    reasons = []
    for fields, code, field in cases:
        with pytest.raises(grpc.RpcError) as info:
            vision_stub.EncodeImages(vision_pb2.EncodeImagesRequest(**fields), timeout=30)
        got_code, detail = _error(info)
        assert (got_code.name, detail.field) == (code, field), detail
        assert detail.message.startswith(f"{field}: ")
        reasons.append(errors_pb2.ErrorReason.Name(detail.reason))
    assert [r.removeprefix("ERROR_REASON_") for r in reasons] == [
        "MEDIA_CORRUPT",  # a truncated PNG
        "PAYLOAD_TOO_LARGE",
        "MEDIA_CORRUPT",  # sha256 mismatch
        "UNKNOWN_MODEL_VERSION",
        "INVALID_FIELD",
        "INVALID_FIELD",
        "MEDIA_UNSUPPORTED",  # not an image format at all
    ]


# ------------------------------------------------------------------------------------------------- video
def test_encode_video_equals_the_model_and_caches(vision_stub, tiny_model, media, version):
    request = vision_pb2.EncodeVideoRequest(video=_inline(media.clip_mp4), max_frames=4, output_dtype=F32)
    first = vision_stub.EncodeVideo(request, timeout=60)
    clip = load_video(media.clip_mp4, max_frames=4, with_audio=False)
    with torch.inference_mode():
        expected = tiny_model.encode_video(clip.frames)
    assert first.num_frames == 4 and first.has_audio_track
    assert (first.frame_width, first.frame_height) == video_frame_size(64, 48) == clip.frame_size
    assert first.block.num_tokens == video_num_tokens(64, 48, 4) == expected.shape[0]
    assert first.block.modality == embedding_pb2.MODALITY_VIDEO and first.model_version == version
    assert torch.equal(_tensor(first.block), expected)
    assert list(first.frame_times_s) == pytest.approx([i / 10 for i in clip.frame_indices])
    assert not first.block.cache_hit and first.timings.media_decode.ToNanoseconds() > 0

    again = vision_stub.EncodeVideo(request, timeout=60)
    assert again.block.cache_hit and again.block.embeddings == first.block.embeddings
    assert (again.num_frames, again.has_audio_track, list(again.frame_times_s)) == (4, True, list(first.frame_times_s))

    silent = vision_stub.EncodeVideo(vision_pb2.EncodeVideoRequest(video=_inline(media.silent_mp4)), timeout=60)
    assert silent.num_frames == 6 and not silent.has_audio_track  # 0 = the limit: a short video gives all frames

    with pytest.raises(grpc.RpcError) as info:
        vision_stub.EncodeVideo(vision_pb2.EncodeVideoRequest(video=_inline(media.clip_mp4), max_frames=65))
    code, detail = _error(info)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and detail.field == "max_frames"
    assert errors_pb2.ErrorReason.Name(detail.reason) == "ERROR_REASON_TOO_MANY_FRAMES"
    assert (detail.value, detail.limit, detail.unit) == (65, 64, "frames")

    with pytest.raises(grpc.RpcError) as info:
        vision_stub.EncodeVideo(vision_pb2.EncodeVideoRequest(video=_inline(media.red_png)))
    code, detail = _error(info)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and detail.field == "video"


# ------------------------------------------------------------------------------------------------- audio
def test_encode_audio_equals_the_model_and_caches(audio_stub, tiny_model, media, version):
    request = audio_pb2.EncodeAudioRequest(model_version=version, audio=_inline(media.tone_wav), output_dtype=F32)
    first = audio_stub.EncodeAudio(request, timeout=60)
    features = process_audio(load_audio(media.tone_wav))
    with torch.inference_mode():
        expected = tiny_model.encode_audio(features.mel, features.wav_chunks)
    assert first.block.num_tokens == audio_num_tokens(16000) == expected.shape[0] == 153
    assert first.block.modality == embedding_pb2.MODALITY_AUDIO
    assert torch.equal(_tensor(first.block), expected)
    assert first.duration_s == pytest.approx(1.0) and first.num_chunks == 1
    assert not first.block.cache_hit and first.timings.audio_encode.ToNanoseconds() > 0

    again = audio_stub.EncodeAudio(request, timeout=60)
    assert again.block.cache_hit and again.block.embeddings == first.block.embeddings
    assert again.duration_s == first.duration_s


def test_audio_of_a_video_track_and_raw_pcm(audio_stub, media):
    track = audio_stub.EncodeAudio(audio_pb2.EncodeAudioRequest(audio=_inline(media.clip_mp4)), timeout=60)
    assert track.block.num_tokens == 153 and track.duration_s == pytest.approx(1.0, abs=0.1)

    pcm = (0.2 * np.sin(np.arange(8000) / 5) * 32767).astype("<i2").tobytes()  # 0.5 s at 16 kHz
    raw = audio_stub.EncodeAudio(
        audio_pb2.EncodeAudioRequest(audio=_inline(pcm, mime_type="audio/L16;rate=16000;channels=1")), timeout=60
    )
    assert raw.block.num_tokens == 153 and raw.duration_s == pytest.approx(0.5)

    for ref, field in [
        (_inline(media.silent_mp4), "audio"),  # a video without an audio track
        (_inline(pcm[:-1], mime_type="audio/L16;rate=16000"), "audio"),  # not whole samples
        (_inline(pcm, mime_type="audio/L16"), "audio.mime_type"),  # no rate
    ]:
        with pytest.raises(grpc.RpcError) as info:
            audio_stub.EncodeAudio(audio_pb2.EncodeAudioRequest(audio=ref), timeout=60)
        code, detail = _error(info)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and detail.field == field, detail


def test_audio_over_the_length_limit_is_invalid_argument(audio_stub):
    buf = io.BytesIO()
    sf.write(buf, np.zeros(8000 * 60 * 13, dtype=np.float32), 8000, format="FLAC")  # 13 min of silence: compact
    assert len(buf.getvalue()) < MAX_PAYLOAD
    with pytest.raises(grpc.RpcError) as info:
        audio_stub.EncodeAudio(audio_pb2.EncodeAudioRequest(audio=_inline(buf.getvalue())), timeout=60)
    code, detail = _error(info)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and detail.field == "audio"
    assert errors_pb2.ErrorReason.Name(detail.reason) == "ERROR_REASON_AUDIO_TOO_LONG"
    assert (detail.value, detail.limit, detail.unit) == (780, 750, "seconds")  # 25 chunks of 30 s


# ------------------------------------------------------------------------------------------------ s3, Redis
def test_s3_references_share_the_cache_by_content(aio, registry, servicers, s3, media, version):
    vision, _ = servicers
    by_uri = VisionEncoderServicer(
        registry=registry, cache=vision.cache, media=MediaResolver(MediaConfig(s3=s3.config()))
    )
    port = aio.serve(lambda server: vision_service.add_to_server(server, by_uri))
    data = make_png_variant(media.red_png)
    uri = s3.put("images/red.png", data)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = vision_pb2_grpc.VisionEncoderServiceStub(ch)
        from_s3 = stub.EncodeImages(
            vision_pb2.EncodeImagesRequest(
                images=[media_pb2.MediaRef(uri=uri, sha256=hashlib.sha256(data).hexdigest())]
            )
        )
        inline = stub.EncodeImages(vision_pb2.EncodeImagesRequest(images=[_inline(data)]))
        assert not from_s3.blocks[0].cache_hit and inline.blocks[0].cache_hit  # same bytes, same key
        assert inline.blocks[0].embeddings == from_s3.blocks[0].embeddings
        assert from_s3.blocks[0].model_version == version
        with pytest.raises(grpc.RpcError) as info:
            stub.EncodeImages(vision_pb2.EncodeImagesRequest(images=[media_pb2.MediaRef(uri=uri + ".missing")]))
        code, detail = _error(info)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and detail.field == "images[0]"


def make_png_variant(png: bytes) -> bytes:
    """The same picture with an extra PNG text chunk: other bytes, so a cache entry of its own."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("variant", str(time.monotonic_ns()))
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_redis_cache_hits_and_expires(aio, registry, redis_url, media, make_media):
    cache = make_cache(CacheConfig(redis_url=redis_url, ttl_s=1.0, key_prefix="test:enc:"))
    vision = VisionEncoderServicer(registry=registry, cache=cache)
    audio = AudioEncoderServicer(registry=registry, cache=cache)

    def register(server: grpc.aio.Server) -> None:
        health = vision_service.add_to_server(server, vision)
        audio_service.add_to_server(server, audio, health)

    port = aio.serve(register)
    image = make_png_variant(media.red_png)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = vision_pb2_grpc.VisionEncoderServiceStub(ch)
        request = vision_pb2.EncodeImagesRequest(images=[_inline(image)], output_dtype=tensor_pb2.DTYPE_BFLOAT16)
        first = stub.EncodeImages(request, timeout=60)
        second = stub.EncodeImages(request, timeout=60)
        assert not first.blocks[0].cache_hit and second.blocks[0].cache_hit
        assert second.blocks[0].embeddings == first.blocks[0].embeddings  # bf16 bytes through Redis, bit-exact
        video = vision_pb2.EncodeVideoRequest(video=_inline(make_media.mp4(3, size=(48, 48))), output_dtype=F32)
        assert [stub.EncodeVideo(video, timeout=60).block.cache_hit for _ in range(2)] == [False, True]
        time.sleep(1.2)
        assert not stub.EncodeImages(request, timeout=60).blocks[0].cache_hit  # Redis expired the entry

        audio_stub = audio_pb2_grpc.AudioEncoderServiceStub(ch)
        clip = audio_pb2.EncodeAudioRequest(audio=_inline(make_media.wav(0.5, hz=660)))
        hits = [audio_stub.EncodeAudio(clip, timeout=60).block.cache_hit for _ in range(2)]
        assert hits == [False, True]
    assert cache.stats.errors == 0 and cache.stats.hits == 3


# ------------------------------------------------------------------------------------------------ config, health
def test_servicers_build_from_validated_configs(redis_url, tmp_path):
    config = {
        "registry": {"versions": {"a@1": {"preset": "tiny"}, "b@2": {"checkpoint": str(tmp_path)}}},
        "cache": {"redis_url": redis_url, "ttl_s": 60},
        "media": {"max_payload_bytes": 1000},
    }
    vision = VisionEncoderServicer.from_config(config)
    assert vision.registry.default_version == "a@1" and vision.registry.versions == ["a@1", "b@2"]
    assert isinstance(vision.cache, RedisCache) and vision.media.config.max_payload_bytes == 1000
    assert not vision.registry.is_loaded("a@1")  # nothing loads before the first request (or warmup)
    assert isinstance(AudioEncoderServicer.from_config({}).cache, InProcessCache)  # the embedded default
    for bad in [
        {"registry": {"versions": {"a": {"preset": "tiny", "checkpoint": "/x"}}}},  # two sources
        {"registry": {"versions": {"a": {"preset": "tiny"}}, "default_version": "b"}},  # unknown default
        {"cache": {"ttl_s": 0}},
        {"unknown_key": 1},
    ]:
        with pytest.raises(ValidationError):
            VisionEncoderServicer.from_config(bad)


def test_a_version_that_cannot_load_is_not_serving(aio, tmp_path, media):
    broken = VisionEncoderServicer.from_config({"registry": {"versions": {"gone@1": {"checkpoint": str(tmp_path)}}}})
    port = aio.serve(lambda server: vision_service.add_to_server(server, broken))
    assert not aio.run(broken.warmup())
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=vision_service.SERVICE_NAME), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            vision_pb2_grpc.VisionEncoderServiceStub(ch).EncodeImages(
                vision_pb2.EncodeImagesRequest(images=[_inline(media.red_png)]), timeout=10
            )
    code, detail = _error(info)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert errors_pb2.ErrorReason.Name(detail.reason) == "ERROR_REASON_BACKEND_UNAVAILABLE"
    assert "gone@1" in detail.message


def test_health_and_metrics(channel, servicers):
    vision, _ = servicers
    health = health_pb2_grpc.HealthStub(channel)
    for name in (vision_service.SERVICE_NAME, audio_service.SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    metrics = vision.metrics
    ok = {"service": "vision", "method": "EncodeImages", "code": "OK"}
    assert metrics.sample_value("ola_requests_total", ok) >= 1
    hits = {"service": "vision", "kind": "image", "result": "hit"}
    assert metrics.sample_value("ola_encoder_cache_lookups_total", hits) >= 1
    bad = {"service": "vision", "method": "EncodeImages", "code": "NOT_FOUND"}
    assert metrics.sample_value("ola_request_errors_total", bad) >= 1
