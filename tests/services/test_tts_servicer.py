"""The ola.tts.v1.TTSService over real gRPC (in-process server): streaming, status codes with error details,
health and reflection."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.gen.ola.common.v1 import errors_pb2
from services.gen.ola.tts.v1 import tts_pb2, tts_pb2_grpc
from services.tts.servicer import SERVICE_NAME, TTSServicer, build_server
from services.wire import read_error_detail


@pytest.fixture(scope="module")
def channel():
    server, port = build_server(TTSServicer.from_config({"sample_rate": 16000}, model_versions={"ola-7b@1"}))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    server.stop(grace=None)


@pytest.fixture(scope="module")
def broken_channel():
    server, port = build_server(TTSServicer.from_config({"backend": "cosyvoice"}))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    server.stop(grace=None)


def test_synthesize_streams_pcm_chunks(channel):
    stub = tts_pb2_grpc.TTSServiceStub(channel)
    request = tts_pb2.SynthesizeRequest(request_id="r1", model_version="ola-7b@1", text="你好，世界。", voice="auto")
    responses = list(stub.Synthesize(request, timeout=30))
    assert responses[0].voice == "cmn" and all(r.voice == "" for r in responses[1:])
    chunks = [r.chunk for r in responses]
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    assert [c.is_last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert {c.sample_rate_hz for c in chunks} == {16000}
    pcm = np.frombuffer(b"".join(c.pcm16 for c in chunks), dtype="<i2")
    assert 0.5 < pcm.size / 16000 < 10 and np.abs(pcm).max() > 1000


def test_requested_rate_and_default_version(channel):
    stub = tts_pb2_grpc.TTSServiceStub(channel)
    responses = list(stub.Synthesize(tts_pb2.SynthesizeRequest(text="Hi.", sample_rate_hz=8000), timeout=30))
    assert {r.chunk.sample_rate_hz for r in responses} == {8000}


@pytest.mark.parametrize(
    ("request_fields", "code", "reason", "field"),
    [
        ({"text": "Hi.", "voice": "klingon"}, grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_FIELD", "voice"),
        ({"text": ""}, grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_FIELD", "text"),
        ({"text": "Hi.", "speed": 9}, grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_FIELD", "speed"),
        (
            {"text": "Hi.", "model_version": "ola-7b@9"},
            grpc.StatusCode.NOT_FOUND,
            "ERROR_REASON_UNKNOWN_MODEL_VERSION",
            "model_version",
        ),
    ],
)
def test_errors_have_fitting_codes_and_details(channel, request_fields, code, reason, field):
    stub = tts_pb2_grpc.TTSServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Synthesize(tts_pb2.SynthesizeRequest(**request_fields), timeout=30))
    assert info.value.code() == code
    assert info.value.details().startswith(f"{field}: ")
    detail = read_error_detail(info.value.trailing_metadata())
    assert detail is not None and errors_pb2.ErrorReason.Name(detail.reason) == reason and detail.field == field


def test_list_voices_filters_by_language(channel):
    stub = tts_pb2_grpc.TTSServiceStub(channel)
    everything = stub.ListVoices(tts_pb2.ListVoicesRequest(), timeout=10)
    assert everything.backend == "espeak" and everything.default_voice == "auto" and everything.sample_rate_hz == 16000
    assert len(everything.voices) > 50
    english = stub.ListVoices(tts_pb2.ListVoicesRequest(language="en"), timeout=10)
    ids = {v.id for v in english.voices}
    assert {"en-us", "en-gb"} <= ids and "cmn" not in ids
    chinese = stub.ListVoices(tts_pb2.ListVoicesRequest(language="zh"), timeout=10)
    assert "cmn" in {v.id for v in chinese.voices}


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_unavailable_backend_answers_failed_precondition(broken_channel):
    stub = tts_pb2_grpc.TTSServiceStub(broken_channel)
    for call in (
        lambda: list(stub.Synthesize(tts_pb2.SynthesizeRequest(text="Hi."), timeout=10)),
        lambda: stub.ListVoices(tts_pb2.ListVoicesRequest(), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no model directory is configured" in info.value.details()
        detail = read_error_detail(info.value.trailing_metadata())
        assert detail.reason == errors_pb2.ERROR_REASON_BACKEND_UNAVAILABLE
    health = health_pb2_grpc.HealthStub(broken_channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
