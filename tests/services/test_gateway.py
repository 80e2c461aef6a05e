"""The omni gateway end to end over real gRPC: real encoder / LLM servicers, real espeak-ng TTS, on loopback."""

from __future__ import annotations

import time

import grpc
import pytest

from ola_model import OlaRequest, SamplingParams, image_num_tokens
from services.audio import AudioEncoderServicer
from services.audio import add_to_server as add_audio
from services.gateway import GatewayConfig, GrpcBackends, OmniGateway, OmniServicer
from services.gen.ola.common.v1 import media_pb2, sampling_pb2
from services.gen.ola.omni.v1 import omni_pb2, omni_pb2_grpc
from services.llm import LLMServiceConfig, LLMServicer
from services.llm import add_to_server as add_llm
from services.metrics import get_metrics
from services.tts.servicer import TTSServicer, build_server
from services.vision import VisionEncoderServicer
from services.vision import add_to_server as add_vision
from services.wire import read_error_detail


@pytest.fixture(scope="module")
def stack(aio, registry, version):
    llm = LLMServicer(LLMServiceConfig(max_batch=8), registry=registry)

    def register(server):
        health = add_llm(server, llm)
        add_vision(server, VisionEncoderServicer(registry=registry), health)
        add_audio(server, AudioEncoderServicer(registry=registry), health)

    model_port = aio.serve(register)
    tts_server, tts_port = build_server(TTSServicer.from_config({"sample_rate": 16000}))

    async def make_gateway():
        backends = GrpcBackends(*(f"127.0.0.1:{p}" for p in (model_port, model_port, model_port, tts_port)))
        return OmniGateway(
            backends, GatewayConfig(default_model_version=version, sentence_min_chars=1), metrics=get_metrics()
        )

    gateway = aio.run(make_gateway())
    port = aio.serve(lambda server: omni_pb2_grpc.add_OmniServiceServicer_to_server(OmniServicer(gateway), server))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield omni_pb2_grpc.OmniServiceStub(channel), llm, gateway
    tts_server.stop(None)
    aio.run(llm.close())


def _greedy(n: int) -> sampling_pb2.SamplingParams:
    return sampling_pb2.SamplingParams(temperature=0.0, top_k=0, repetition_penalty=1.0, max_new_tokens=n)


def _ref(data: bytes) -> media_pb2.MediaRef:
    return media_pb2.MediaRef(inline_data=data)


def _chat(stub, **kw) -> list[omni_pb2.ChatResponse]:
    return list(stub.Chat(omni_pb2.ChatRequest(**kw), timeout=120))


def test_chat_streams_text_then_speech_in_order(stack, media, tiny_pipeline):
    stub, _, _ = stack
    events = _chat(
        stub,
        text="What colour is it? Answer briefly.",
        images=[_ref(media.red_png)],
        output_modalities=[omni_pb2.OUTPUT_MODALITY_TEXT, omni_pb2.OUTPUT_MODALITY_AUDIO],
        speech=omni_pb2.SpeechOptions(sample_rate_hz=16000),
        sampling=_greedy(40),
    )
    kinds = [e.WhichOneof("event") for e in events]
    assert [e.sequence for e in events] == list(range(len(events)))
    assert kinds[0] == "started" and kinds[-2:] == ["usage", "final"]
    text = "".join(e.text_delta.text for e in events if e.HasField("text_delta"))
    final = events[-1].final
    assert final.text == text
    # the same answer as local inference with the same model version and prompt
    expected = tiny_pipeline.generate(
        [OlaRequest("What colour is it? Answer briefly.", images=[media.red_png])],
        SamplingParams.greedy(max_new_tokens=40),
    )[0]
    assert text.strip() == expected
    # speech: one or more sentences, chunks in sentence order, together covering the whole answer
    chunks = [e.audio_chunk for e in events if e.HasField("audio_chunk")]
    assert chunks and final.num_sentences >= 1
    indexes = [c.sentence_index for c in chunks]
    assert indexes == sorted(indexes) and indexes[-1] == final.num_sentences - 1
    spoken = []
    for c in chunks:
        if not spoken or spoken[-1][0] != c.sentence_index:
            spoken.append((c.sentence_index, c.sentence_text))
    assert "".join(s for _, s in spoken).split() == text.split()
    assert all(c.audio.sample_rate_hz == 16000 for c in chunks)
    usage = events[-2].usage
    assert usage.prompt_tokens.image == image_num_tokens(64, 48) == 165  # low-res view upscaled to 384x384
    assert usage.completion_tokens > 0 and usage.audio_output_seconds > 0.2
    assert usage.timings.time_to_first_audio.ToNanoseconds() >= usage.timings.time_to_first_token.ToNanoseconds()
    assert (
        get_metrics().sample_value(
            "ola_time_to_first_audio_seconds_count",
            {"service": "omni", "model_version": events[0].started.model_version},
        )
        >= 1
    )


def test_video_question_uses_the_video_and_its_audio_track(stack, media):
    stub, _, _ = stack
    events = _chat(stub, text="What happens?", video=_ref(media.clip_mp4), sampling=_greedy(4))
    usage = next(e.usage for e in events if e.HasField("usage"))
    assert usage.prompt_tokens.video > 0 and usage.prompt_tokens.audio == 2 + 151
    silent = _chat(stub, text="What happens?", video=_ref(media.silent_mp4), sampling=_greedy(4))
    usage = next(e.usage for e in silent if e.HasField("usage"))
    assert usage.prompt_tokens.video > 0 and usage.prompt_tokens.audio == 0  # no track: still a video question
    assert not any(e.HasField("audio_chunk") for e in silent)  # text only unless audio output is asked for


def test_sessions_keep_turns_and_pin_their_model_version(stack, version):
    stub, _, _ = stack
    first = _chat(stub, session_id="s-1", text="Hello there.", sampling=_greedy(5))
    assert first[0].started.session_id == "s-1" and first[0].started.model_version == version
    second = _chat(stub, session_id="s-1", text="And again?", sampling=_greedy(5))
    assert second[0].started.turn_index == 1
    session = stub.GetSession(omni_pb2.GetSessionRequest(session_id="s-1")).session
    assert [t.user_text for t in session.turns] == ["Hello there.", "And again?"]
    assert session.turns[0].assistant_text == first[-1].final.text
    with pytest.raises(grpc.RpcError) as err:
        _chat(stub, session_id="s-1", model_version="other@2", text="switch?")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert stub.DeleteSession(omni_pb2.DeleteSessionRequest(session_id="s-1")).deleted
    with pytest.raises(grpc.RpcError) as err:
        stub.GetSession(omni_pb2.GetSessionRequest(session_id="s-1"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_errors_pass_through_with_their_codes_and_details(stack, media):
    stub, _, _ = stack
    with pytest.raises(grpc.RpcError) as err:
        _chat(stub, text="What is it?", images=[_ref(media.corrupt_png)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    detail = read_error_detail(err.value.trailing_metadata())
    assert detail is not None and "vision" in detail.message and "image" in detail.message.lower()
    with pytest.raises(grpc.RpcError) as err:
        _chat(stub, text="hi", model_version="no-such-version")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        _chat(stub)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        _chat(stub, text="x", images=[_ref(media.red_png)], video=_ref(media.clip_mp4))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_client_that_goes_away_cancels_the_llm_work(stack, version):
    stub, llm, _ = stack
    call = stub.Chat(omni_pb2.ChatRequest(text="Tell me a long story.", sampling=_greedy(15000)), timeout=120)
    for event in call:
        if event.HasField("text_delta"):
            break
    engine = llm.engine(version)
    assert engine.num_running == 1
    call.cancel()
    deadline = time.monotonic() + 5
    while engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_running == 0 and engine.cache_tokens() == 0


def test_deadlines_reach_the_backends(stack, version):
    stub, llm, _ = stack
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Chat(omni_pb2.ChatRequest(text="Tell me a long story.", sampling=_greedy(15000)), timeout=1.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    engine = llm.engine(version)
    deadline = time.monotonic() + 5
    while engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_running == 0


def test_grpc_target_balances_a_list_of_addresses():
    from services.gateway import grpc_target

    assert grpc_target("127.0.0.1:9000") == "127.0.0.1:9000"
    assert grpc_target("dns:///vision.ola.svc:9000") == "dns:///vision.ola.svc:9000"
    assert grpc_target("10.0.0.1:9000, 10.0.0.2:9000") == "ipv4:10.0.0.1:9000,10.0.0.2:9000"
    assert grpc_target("ipv4:10.0.0.1:9000,10.0.0.2:9000") == "ipv4:10.0.0.1:9000,10.0.0.2:9000"
