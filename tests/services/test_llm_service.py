"""The LLM service over real gRPC: answers streamed through the wire equal the local pipeline's (blocks made by the
encoder services), concurrent calls share the engine's batch, a cancelled call frees its engine row at once, and
every bad request gets a fitting status with details."""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ola_model import OlaRequest, SamplingParams
from ola_model.prompt import Message, chatml, tokenize_prompt
from ola_model.tokens import image_num_tokens
from services import audio as audio_service
from services import llm as llm_service
from services import vision as vision_service
from services.audio import AudioEncoderServicer
from services.gen.ola.audio.v1 import audio_pb2, audio_pb2_grpc
from services.gen.ola.common.v1 import embedding_pb2, errors_pb2, media_pb2, sampling_pb2, tensor_pb2
from services.gen.ola.llm.v1 import llm_pb2, llm_pb2_grpc
from services.gen.ola.vision.v1 import vision_pb2, vision_pb2_grpc
from services.llm import LLMServiceConfig, LLMServicer
from services.vision import VisionEncoderServicer
from services.wire import read_error_detail, tensor_to_proto

F32 = tensor_pb2.DTYPE_FLOAT32


@pytest.fixture(scope="module")
def llm(aio, registry):
    servicer = LLMServicer(LLMServiceConfig(max_batch=8), registry=registry)
    yield servicer
    aio.run(servicer.close())


@pytest.fixture(scope="module")
def channel(aio, registry, llm):
    vision = VisionEncoderServicer(registry=registry)
    audio = AudioEncoderServicer(registry=registry)

    def register(server: grpc.aio.Server) -> None:
        health = llm_service.add_to_server(server, llm)
        vision_service.add_to_server(server, vision, health)
        audio_service.add_to_server(server, audio, health)

    port = aio.serve(register)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return llm_pb2_grpc.LLMServiceStub(channel)


def _user(content: str) -> llm_pb2.Conversation:
    return llm_pb2.Conversation(messages=[llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content=content)])


def _greedy(max_new_tokens: int) -> sampling_pb2.SamplingParams:
    return sampling_pb2.SamplingParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=max_new_tokens)


def _text(responses: list[llm_pb2.GenerateResponse]) -> str:
    return "".join(r.text_delta for r in responses)


def _block(rows: int = 5, width: int = 64, **fields) -> embedding_pb2.EmbeddingBlock:
    tensor = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows))
    values = {"embeddings": tensor_to_proto(tensor), "num_tokens": rows, "modality": embedding_pb2.MODALITY_IMAGE}
    return embedding_pb2.EmbeddingBlock(**{**values, **fields})


def _error(info: pytest.ExceptionInfo) -> tuple[str, errors_pb2.ErrorDetail]:
    detail = read_error_detail(info.value.trailing_metadata())
    assert detail is not None and detail.message == info.value.details()
    return info.value.code().name, detail


def test_generate_through_the_wire_equals_the_pipeline(channel, stub, tiny_pipeline, media, version):
    image = vision_pb2_grpc.VisionEncoderServiceStub(channel).EncodeImages(
        vision_pb2.EncodeImagesRequest(images=[media_pb2.MediaRef(inline_data=media.red_png)], output_dtype=F32)
    )
    speech = audio_pb2_grpc.AudioEncoderServiceStub(channel).EncodeAudio(
        audio_pb2.EncodeAudioRequest(audio=media_pb2.MediaRef(inline_data=media.tone_wav), output_dtype=F32)
    )
    question = "What do you see and hear?"
    content = f"<image>\n<speech>\n{question}"  # Ola's layout for an image with an audio clip
    blocks = [image.blocks[0], speech.block]
    request = llm_pb2.GenerateRequest(
        request_id="e2e", conversation=_user(content), blocks=blocks, sampling=_greedy(24), model_version=version
    )
    responses = list(stub.Generate(request, timeout=60))
    expected = "".join(
        tiny_pipeline.stream(
            OlaRequest(question, images=[media.red_png], audio=media.tone_wav), SamplingParams.greedy(24)
        )
    )
    assert _text(responses) == expected and expected
    assert responses[0].model_version == version and all(not r.model_version for r in responses[1:])
    assert all(r.finish_reason == sampling_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    last = responses[-1]
    assert last.finish_reason == sampling_pb2.FINISH_REASON_LENGTH and last.usage.completion_tokens == 24
    ids = tokenize_prompt(chatml([Message("user", content)]), tiny_pipeline.tokenizer)
    prompt = last.usage.prompt_tokens
    assert (prompt.image, prompt.audio, prompt.video) == (image_num_tokens(64, 48), 153, 0)
    assert prompt.text == len(ids) - 2 and prompt.total == prompt.text + prompt.image + prompt.audio
    assert last.usage.timings.time_to_first_token.ToNanoseconds() > 0
    assert last.usage.timings.total.ToNanoseconds() >= last.usage.timings.decode.ToNanoseconds()

    # The same prompt as token ids (placeholders -300 / -200) gives the same answer; token ids add up to the text.
    by_ids = llm_pb2.GenerateRequest(
        token_ids=llm_pb2.TokenIds(ids=ids), blocks=blocks, sampling=_greedy(24), return_token_ids=True
    )
    again = list(stub.Generate(by_ids, timeout=60))
    token_ids = [t for r in again for t in r.token_ids]
    assert _text(again) == expected and len(token_ids) == 24
    assert tiny_pipeline.tokenizer.decode(token_ids, skip_special_tokens=True) == expected
    assert again[-1].usage.cached_blocks == 0

    count = stub.CountTokens(
        llm_pb2.CountTokensRequest(
            conversation=_user(content), block_num_tokens=[b.num_tokens for b in blocks], max_new_tokens=24
        )
    )
    assert count.prompt_tokens == prompt.total and count.text_tokens == prompt.text and count.fits


def test_concurrent_calls_are_batched_and_each_equals_its_answer_alone(stub, llm, tiny_pipeline):
    questions = ["What is red?", "Count the circles.", "Describe the scene.", "one two three"]
    sampled = SamplingParams(max_new_tokens=20, seed=7)  # Ola's defaults (temperature 0.2, top-k 20, rep. 1.05)
    params = [SamplingParams.greedy(20)] * 3 + [sampled]
    wire = [_greedy(20)] * 3 + [sampling_pb2.SamplingParams(max_new_tokens=20, seed=7)]
    expected = [
        "".join(tiny_pipeline.stream(OlaRequest(q), p)) for q, p in zip(questions, params, strict=True)
    ]  # one by one
    barrier = threading.Barrier(len(questions))

    def call(i: int) -> str:
        request = llm_pb2.GenerateRequest(conversation=_user(questions[i]), sampling=wire[i])
        barrier.wait()
        return _text(list(stub.Generate(request, timeout=60)))

    llm.max_batch_size = 0
    with ThreadPoolExecutor(len(questions)) as pool:
        answers = list(pool.map(call, range(len(questions))))
    assert answers == expected
    assert llm.max_batch_size > 1  # they shared the engine's batch
    assert llm.metrics.sample_value("ola_llm_batch_size_count", {"model_version": "tiny@1"}) > 0


def test_cancelling_a_stream_aborts_its_engine_request(stub, llm, tiny_pipeline, version):
    story = llm_pb2.GenerateRequest(conversation=_user("Tell me a story about three stars."), sampling=_greedy(15000))
    long_call = stub.Generate(story)  # would decode for minutes if it were not aborted
    for _ in range(3):
        next(long_call)
    engine = llm.engine(version)
    assert engine is not None and engine.num_running == 1
    cancelled_before = llm.metrics.sample_value(
        "ola_requests_total", {"service": "llm", "method": "Generate", "code": "CANCELLED"}
    )
    short_request = llm_pb2.GenerateRequest(conversation=_user("yes no"), sampling=_greedy(40))
    with ThreadPoolExecutor(1) as pool:
        short = pool.submit(lambda: _text(list(stub.Generate(short_request, timeout=60))))
        deadline = time.monotonic() + 10
        while engine.num_running < 2 and time.monotonic() < deadline:
            time.sleep(0.002)
        assert engine.num_running == 2  # both decoding together
        long_call.cancel()
        short_text = short.result(timeout=60)  # the other stream is not disturbed
    assert short_text == "".join(tiny_pipeline.stream(OlaRequest("yes no"), SamplingParams.greedy(40)))
    deadline = time.monotonic() + 2
    while engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not engine.has_work() and engine.num_running == 0 and engine.cache_tokens() == 0  # row and cache freed
    assert long_call.code() == grpc.StatusCode.CANCELLED
    deadline = time.monotonic() + 2
    labels = {"service": "llm", "method": "Generate", "code": "CANCELLED"}
    while llm.metrics.sample_value("ola_requests_total", labels) == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.005)
    assert llm.metrics.sample_value("ola_requests_total", labels) == cancelled_before + 1


def test_context_overflow_names_the_numbers(stub, tiny_pipeline, version):
    request = llm_pb2.GenerateRequest(prompt_text="hello", blocks=[], sampling=_greedy(16384), model_version=version)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request, timeout=30))
    code, detail = _error(info)
    assert code == "INVALID_ARGUMENT" and errors_pb2.ErrorReason.Name(detail.reason) == "ERROR_REASON_CONTEXT_OVERFLOW"
    prompt = len(tokenize_prompt("hello", tiny_pipeline.tokenizer))
    assert (detail.field, detail.value, detail.limit, detail.unit) == ("context", prompt + 16384, 16384, "tokens")
    assert f"= {prompt + 16384}, over the model's context of 16384" in detail.message


def test_bad_requests_get_fitting_codes(stub):
    good = _block()
    truncated = _block()
    truncated.embeddings.data = truncated.embeddings.data[:-4]
    cases = [
        ({"prompt_text": "<image> hi"}, "INVALID_ARGUMENT", "blocks"),
        ({"prompt_text": "hi", "blocks": [good]}, "INVALID_ARGUMENT", "blocks"),
        ({"prompt_text": "<image>", "blocks": [_block(model_version="tiny@0")]}, "FAILED_PRECONDITION",
         "blocks[0].model_version"),
        ({"prompt_text": "<image>", "blocks": [truncated]}, "INVALID_ARGUMENT", "blocks[0].embeddings"),
        ({"prompt_text": "<image>", "blocks": [_block(width=32)]}, "INVALID_ARGUMENT", "blocks[0].embeddings"),
        ({"prompt_text": "<image>", "blocks": [_block(num_tokens=4)]}, "INVALID_ARGUMENT", "blocks[0].num_tokens"),
        ({"prompt_text": "<image>", "blocks": [_block(modality=0)]}, "INVALID_ARGUMENT", "blocks[0].modality"),
        ({"prompt_text": "hi", "sampling": {"top_p": 1.5}}, "INVALID_ARGUMENT", "sampling.top_p"),
        ({"prompt_text": "hi", "sampling": {"temperature": -1}}, "INVALID_ARGUMENT", "sampling.temperature"),
        ({"prompt_text": "hi", "sampling": {"max_new_tokens": 0}}, "INVALID_ARGUMENT", "sampling.max_new_tokens"),
        ({"prompt_text": "hi", "model_version": "tiny@404"}, "NOT_FOUND", "model_version"),
        ({}, "INVALID_ARGUMENT", "prompt"),
        ({"conversation": {"messages": [{"content": "hi"}]}}, "INVALID_ARGUMENT", "conversation.messages[0].role"),
        ({"token_ids": {"ids": [5, 5000]}}, "INVALID_ARGUMENT", "token_ids.ids[1]"),
    ]  # fmt: skip
    for fields, code, field in cases:
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(llm_pb2.GenerateRequest(**fields), timeout=30))
        got_code, detail = _error(info)
        assert (got_code, detail.field) == (code, field), (fields, detail)
        assert detail.message.startswith(f"{field}: ")


def test_count_tokens(stub, tiny_pipeline, version):
    content = "<image>\nWhat?"
    text = len(tokenize_prompt(chatml([Message("user", content)]), tiny_pipeline.tokenizer)) - 1
    request = llm_pb2.CountTokensRequest(conversation=_user(content), block_num_tokens=[165], max_new_tokens=10)
    reply = stub.CountTokens(request, timeout=10)
    assert (reply.model_version, reply.text_tokens, reply.num_placeholders) == (version, text, 1)
    assert (reply.prompt_tokens, reply.max_context, reply.fits) == (text + 165, 16384, True)
    request.max_new_tokens = 16384 - text - 165 + 1
    assert not stub.CountTokens(request, timeout=10).fits
    for fields, code, field in [
        ({"prompt_text": "<image><speech>", "block_num_tokens": [3]}, "INVALID_ARGUMENT", "block_num_tokens"),
        ({"prompt_text": "hi", "model_version": "tiny@404"}, "NOT_FOUND", "model_version"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            stub.CountTokens(llm_pb2.CountTokensRequest(**fields), timeout=10)
        assert _error(info)[0] == code and _error(info)[1].field == field


def test_health(channel):
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=llm_service.SERVICE_NAME), timeout=10
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_stream_interval_holds_tokens_but_never_a_sentence_mark(aio, registry):
    """Tokens wait up to ``stream_interval_ms`` to travel together; the first token, sentence marks and the token
    after one go at once. The text and the token ids are the same whatever the interval."""
    streams = {}
    for interval in (0.0, 60_000.0):
        servicer = LLMServicer(LLMServiceConfig(stream_interval_ms=interval), registry=registry)
        port = aio.serve(lambda server, s=servicer: llm_service.add_to_server(server, s))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            request = llm_pb2.GenerateRequest(
                conversation=_user("Tell me a story about three stars."), sampling=_greedy(80), return_token_ids=True
            )
            streams[interval] = list(llm_pb2_grpc.LLMServiceStub(ch).Generate(request, timeout=60))
        aio.run(servicer.close())
    each, held = streams[0.0], streams[60_000.0]
    assert _text(held) == _text(each)
    assert [t for r in held for t in r.token_ids] == [t for r in each for t in r.token_ids]
    assert sum(len(r.token_ids) for r in held) == 80 and not held[0].HasField("usage")  # the first token at once
    for before, message in itertools.pairwise(held[:-1]):  # a held message went early only for a sentence mark
        assert llm_service.send_at_once(message.text_delta, llm_service.ends_with_mark(before.text_delta))
    assert len(held) < len(each)


def test_send_at_once_rule():
    assert not llm_service.send_at_once(" three red", after_mark=False)
    assert llm_service.send_at_once(" circles.", after_mark=False)
    assert llm_service.send_at_once(" A", after_mark=True)  # the character that decides the boundary
    assert llm_service.send_at_once("好。", after_mark=False) and llm_service.send_at_once("a\nb", after_mark=False)
    assert llm_service.ends_with_mark("left. ") and llm_service.ends_with_mark("”")
    assert not llm_service.ends_with_mark("3")
