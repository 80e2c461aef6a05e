"""The platform on a real Ray Serve: five applications behind the real gRPC proxy on a free loopback port.

One Ray cluster for the module (``ray start`` in its own process: 2 CPUs, simulated node pools ``vision_pool`` /
``llm_pool``), the tiny preset with the seed of the session's ``tiny_pipeline`` (so answers can be compared with local
inference), real espeak-ng speech.
The ``ServeContext`` / ``call_*`` tests at the end need no Ray.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import grpc
import pytest

from services.gen.ola.common.v1 import errors_pb2, media_pb2
from services.gen.ola.llm.v1 import llm_pb2, llm_pb2_grpc
from services.gen.ola.omni.v1 import omni_pb2, omni_pb2_grpc
from services.gen.ola.vision.v1 import vision_pb2, vision_pb2_grpc
from services.wire import error_detail, error_metadata, read_error_detail

VERSION = "tiny@1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(grpc_port: int, http_port: int, vision_replicas: int = 1, versions: dict | None = None):
    from services.serve_config import PlatformConfig

    cpu = lambda n, **res: {"num_cpus": n, "resources": res}
    return PlatformConfig.from_mapping(
        {
            "models": {"versions": versions or {VERSION: {"preset": "tiny", "seed": 0}}, "default_version": VERSION},
            "vision": {"num_replicas": vision_replicas, "ray_actor_options": cpu(0.25, vision_pool=1)},
            "audio": {"ray_actor_options": cpu(0.25)},
            "llm": {"max_batch": 4, "ray_actor_options": cpu(0.5, llm_pool=1)},
            "tts": {"sample_rate": 16000, "ray_actor_options": cpu(0.1)},
            "gateway": {"sentence_min_chars": 1, "ray_actor_options": cpu(0.1)},
            "proxy": {"grpc_port": grpc_port, "http_port": http_port},
            "limits": {"max_request_bytes": 1 << 20},
            "metrics": {"port": 0, "addr": "127.0.0.1"},  # each replica exports on a free port
        },
        "test",
    )


def _replica_actors(app_name: str) -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"::{app_name}#" in a["name"]}


@pytest.fixture(scope="module")
def platform(ray_head_factory):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from services import app
    from services.client import OlaClient

    head = ray_head_factory.start(num_cpus=2, resources={"vision_pool": 2, "llm_pool": 1})
    ray.init(address=head.address)
    try:
        config = _config(_free_port(), _free_port())
        start = time.monotonic()
        app.deploy(config)
        address = f"127.0.0.1:{config.proxy.grpc_port}"
        with OlaClient(address, timeout=120) as client:
            client.wait_ready(timeout=60)
            print(f"platform ready in {time.monotonic() - start:.1f} s")
            yield config, address, client
    finally:
        serve.shutdown()
        ray.shutdown()
        head.stop()


def _greedy(n: int):
    from services.client import sampling

    return sampling(temperature=0.0, top_k=0, repetition_penalty=1.0, max_new_tokens=n)


def test_chat_streams_text_and_speech_through_the_proxy(platform, media, tiny_pipeline):
    from ola_model import OlaRequest, SamplingParams
    from services.client import collect

    _, _, client = platform
    question = "What colour is it? Answer briefly."
    events = list(client.chat(question, images=[media.red_png], speak=True, sampling=_greedy(30)))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-2:] == ["usage", "final"]
    assert [e.sequence for e in events] == list(range(len(events)))
    assert "text_delta" in kinds and "audio_chunk" in kinds
    result = collect(events)
    assert result.model_version == VERSION and result.session_id
    expected = tiny_pipeline.generate(
        [OlaRequest(question, images=[media.red_png])], SamplingParams.greedy(max_new_tokens=30)
    )[0]
    assert result.text.strip() == expected  # the same answer as local inference of the same weights
    assert result.speech.sample_rate_hz == 16000 and result.speech.duration_s > 0.2
    assert result.usage.prompt_tokens.image == 165 and result.usage.completion_tokens > 0


def test_each_encoder_app_is_addressable_on_its_own(platform, media):
    _, address, client = platform
    assert sorted(client.list_applications()) == ["audio", "llm", "omni", "tts", "vision"]
    assert all(client.health(name) for name in ("vision", "audio", "llm", "tts", "omni"))
    with grpc.insecure_channel(address) as channel:
        stub = vision_pb2_grpc.VisionEncoderServiceStub(channel)
        request = vision_pb2.EncodeImagesRequest(images=[media_pb2.MediaRef(inline_data=media.red_png)])
        response = stub.EncodeImages(request, metadata=(("application", "vision"),), timeout=60)
        assert response.model_version == VERSION
        assert [b.num_tokens for b in response.blocks] == [165]
        # the LLM app is a service of its own too: CountTokens with a placeholder per block
        llm = llm_pb2_grpc.LLMServiceStub(channel)
        counted = llm.CountTokens(
            llm_pb2.CountTokensRequest(prompt_text="<image>\nWhat is it?", block_num_tokens=[165], max_new_tokens=8),
            metadata=(("application", "llm"),),
            timeout=60,
        )
        assert counted.num_placeholders == 1 and counted.prompt_tokens == counted.text_tokens + 165 and counted.fits


def test_errors_keep_their_code_and_error_detail(platform, media):
    from services.client import OlaError

    _, address, client = platform
    corrupt = media_pb2.MediaRef(inline_data=media.corrupt_png)
    with grpc.insecure_channel(address) as channel:
        # unary, straight to the encoder app
        stub = vision_pb2_grpc.VisionEncoderServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.EncodeImages(vision_pb2.EncodeImagesRequest(images=[corrupt]), metadata=(("application", "vision"),))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        detail = read_error_detail(err.value.trailing_metadata())
        assert detail.reason == errors_pb2.ERROR_REASON_MEDIA_CORRUPT and detail.field == "images[0]"
        # a stream that fails before its first message (the LLM app)
        llm = llm_pb2_grpc.LLMServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(llm.Generate(llm_pb2.GenerateRequest(prompt_text="<image>"), metadata=(("application", "llm"),)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert read_error_detail(err.value.trailing_metadata()).field == "blocks"
        # through the gateway, raw: the status rides on a last `warning` event carrying the same detail
        omni = omni_pb2_grpc.OmniServiceStub(channel)
        seen = []
        with pytest.raises(grpc.RpcError) as err:
            for event in omni.Chat(
                omni_pb2.ChatRequest(text="hi", images=[corrupt]), metadata=(("application", "omni"),)
            ):
                seen.append(event)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        detail = read_error_detail(err.value.trailing_metadata())
        assert detail.reason == errors_pb2.ERROR_REASON_MEDIA_CORRUPT and detail.message.startswith("vision: ")
        assert [e.WhichOneof("event") for e in seen] == ["started", "warning"] and seen[-1].warning.detail == detail
    # the client drops that carrier and raises the status with its detail
    events = []
    with pytest.raises(OlaError) as err:
        for event in client.chat("hi", images=[media.corrupt_png]):
            events.append(event)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.reason == "ERROR_REASON_MEDIA_CORRUPT"
    assert "images[0]" in str(err.value)
    assert [e.WhichOneof("event") for e in events] == ["started"]
    with pytest.raises(OlaError) as err:
        client.ask("hi", model_version="no-such-version")
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_limits_cancellation_and_metrics(platform):
    import urllib.request

    from ray import serve

    from services.client import OlaError

    _, _, client = platform
    with pytest.raises(OlaError) as err:  # over limits.max_request_bytes: refused before any backend is called
        client.ask("hi", images=[b"\0" * (1 << 20)])
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.reason == "ERROR_REASON_PAYLOAD_TOO_LARGE" and err.value.detail.limit == 1 << 20

    llm = serve.get_app_handle("llm")
    events = client.chat("Tell me a long story.", sampling=_greedy(2000))
    for event in events:
        if event.HasField("text_delta"):
            break
    assert llm.replica_info.remote().result(timeout_s=30)["running_requests"] == 1
    events.close()  # the client goes away: gateway, proxy and LLM replica stop the work
    deadline = time.monotonic() + 15
    while llm.replica_info.remote().result(timeout_s=30)["running_requests"] and time.monotonic() < deadline:
        time.sleep(0.1)
    info = llm.replica_info.remote().result(timeout_s=30)
    assert info["running_requests"] == 0 and info["waiting_requests"] == 0

    scraped = urllib.request.urlopen(f"http://127.0.0.1:{info['metrics_port']}/metrics", timeout=10).read().decode()
    assert 'ola_requests_total{code="OK",method="Generate",service="llm"}' in scraped


def test_the_clients_deadline_crosses_the_proxy_and_health_is_watched(platform):
    """Serve's proxy drops ``grpc-timeout``: the deadline in ``x-ola-timeout-ms`` still ends the chat in time, and the
    LLM replica's work with it. ``grpc.health.v1.Health/Watch`` streams through the proxy."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from ray import serve

    _, address, _ = platform
    channel = grpc.insecure_channel(address)
    omni = omni_pb2_grpc.OmniServiceStub(channel)
    story = omni_pb2.ChatRequest(text="Tell me a long story.", sampling=_greedy(8000))  # ~10 s of decoding
    start = time.monotonic()
    metadata = (("application", "omni"), ("x-ola-timeout-ms", "700"))
    with pytest.raises(grpc.RpcError) as err:
        for _ in omni.Chat(story, timeout=120, metadata=metadata):  # the gRPC deadline alone would allow 120 s
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - start < 5
    llm = serve.get_app_handle("llm")
    until = time.monotonic() + 15
    while llm.replica_info.remote().result(timeout_s=30)["running_requests"] and time.monotonic() < until:
        time.sleep(0.1)
    assert llm.replica_info.remote().result(timeout_s=30)["running_requests"] == 0

    with pytest.raises(grpc.RpcError) as err:
        list(omni.Chat(story, timeout=30, metadata=(("application", "omni"), ("x-ola-timeout-ms", "soon"))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-ola-timeout-ms" in err.value.details()

    health = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30, metadata=(("application", "llm"),))
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def test_scaling_vision_leaves_the_llm_app_alone(platform, media):
    from services import app

    config, _, client = platform
    llm_before, vision_before = _replica_actors("llm"), _replica_actors("vision")
    assert len(llm_before) == 1 and len(vision_before) == 1
    app.deploy(_config(config.proxy.grpc_port, config.proxy.http_port, vision_replicas=2), apps=["vision"])
    vision_after = _replica_actors("vision")
    assert len(vision_after) == 2 and vision_before <= vision_after  # scaled in place: the first replica stays
    assert _replica_actors("llm") == llm_before
    result = client.ask("Describe.", images=[media.blue_png], sampling=_greedy(3))
    assert result.finish_reason in ("STOP", "LENGTH") and result.usage.prompt_tokens.image > 0


def test_new_model_versions_reach_running_replicas_without_restarts(platform, media):
    from ray import serve

    from services import app

    config, _, client = platform
    before = {name: _replica_actors(name) for name in ("vision", "audio", "llm", "tts", "omni")}
    llm_info = serve.get_app_handle("llm").replica_info.remote().result(timeout_s=30)
    versions = {VERSION: {"preset": "tiny", "seed": 0}, "tiny@2": {"preset": "tiny", "seed": 1}}
    vision_replicas = len(before["vision"])  # as the previous test left it
    app.deploy(_config(config.proxy.grpc_port, config.proxy.http_port, vision_replicas, versions=versions))
    assert {name: _replica_actors(name) for name in before} == before
    info = serve.get_app_handle("llm").replica_info.remote().result(timeout_s=30)
    assert info["actor_id"] == llm_info["actor_id"] and info["model_versions"] == [VERSION, "tiny@2"]
    first = client.ask("Describe.", images=[media.red_png], sampling=_greedy(6))
    second = client.ask("Describe.", images=[media.red_png], sampling=_greedy(6), model_version="tiny@2")
    assert first.model_version == VERSION and second.model_version == "tiny@2"
    assert second.usage.completion_tokens > 0
    versions_listed = [v.model_version for v in client.list_model_versions().versions]
    assert versions_listed == [VERSION, "tiny@2"]


# ------------------------------------------------------------------------------------------------ without Ray
class _FakeServeContext:
    """What RayServegRPCContext offers a replica (set_code / set_details / set_trailing_metadata)."""

    def __init__(self) -> None:
        self.code, self.details, self.trailing = None, "", []

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, md):
        self.trailing = list(md)

    def invocation_metadata(self):
        return [("application", "vision")]


def test_serve_context_turns_aborts_and_exceptions_into_statuses():
    from services.errors import InvalidArgument
    from services.serve_context import RpcStatusError, ServeContext, call_stream, call_unary

    detail = error_detail(errors_pb2.ERROR_REASON_INVALID_FIELD, "text: empty", field="text")

    async def aborting(request, ctx):
        await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, detail.message, error_metadata(detail))

    async def failing(request, ctx):
        raise InvalidArgument("too many", field="images", value=3, limit=2)

    async def streaming(request, ctx):
        yield llm_pb2.GenerateResponse(text_delta="a")
        ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")  # the synchronous TTS servicer does not await

    async def run():
        fake = _FakeServeContext()
        empty = await call_unary(aborting, None, ServeContext(fake), llm_pb2.CountTokensResponse)
        assert empty == llm_pb2.CountTokensResponse() and fake.code == grpc.StatusCode.INVALID_ARGUMENT
        assert read_error_detail(fake.trailing) == detail and fake.details == "text: empty"

        fake = _FakeServeContext()
        await call_unary(failing, None, ServeContext(fake), llm_pb2.CountTokensResponse)
        got = read_error_detail(fake.trailing)
        assert fake.code == grpc.StatusCode.INVALID_ARGUMENT and (got.field, got.value, got.limit) == ("images", 3, 2)

        fake = _FakeServeContext()
        ctx = ServeContext(fake, timeout_s=30)
        out = [m async for m in call_stream(streaming, None, ctx, lambda last, d: llm_pb2.GenerateResponse())]
        assert [m.text_delta for m in out] == ["a", ""]  # the last, empty message carries the status
        assert fake.code == grpc.StatusCode.RESOURCE_EXHAUSTED and 0 < ctx.time_remaining() <= 30
        assert ctx.invocation_metadata() == (("application", "vision"),) and not ctx.is_active()

        with pytest.raises(RpcStatusError) as err:  # through a deployment handle nobody reads the context
            await call_unary(failing, None, ServeContext(None), llm_pb2.CountTokensResponse)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(run())


def test_watch_health_sends_the_status_then_each_change():
    from grpc_health.v1 import health_pb2

    from services.serve_context import watch_health

    states = iter([True, True, False, False, True])
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING

    async def run():
        seen, stream = [], watch_health(lambda: next(states), 0.0)
        async for response in stream:
            seen.append(response.status)
            if len(seen) == 3:
                break
        await stream.aclose()
        return seen

    assert asyncio.run(run()) == [serving, not_serving, serving]  # one per change, none for repeats


def test_deadline_metadata():
    from services.deadline import TIMEOUT_METADATA, timeout_from_metadata, timeout_metadata

    assert timeout_metadata(None) == () and timeout_metadata(0.0001) == ((TIMEOUT_METADATA, "1"),)
    assert timeout_from_metadata([("application", "omni"), *timeout_metadata(2.5)]) == 2.5
    assert timeout_from_metadata([("application", "omni")]) is None
    for bad in ("soon", "0", "-5", "1.5"):
        with pytest.raises(ValueError, match=TIMEOUT_METADATA):
            timeout_from_metadata([(TIMEOUT_METADATA, bad)])


def test_generated_messages_pickle_by_their_registered_module_names():
    import pickle

    import services.app  # noqa: F401  (installs the aliases)

    request = omni_pb2.ChatRequest(text="hi", images=[media_pb2.MediaRef(inline_data=b"x")])
    assert type(request).__module__ == "ola.omni.v1.omni_pb2"
    assert pickle.loads(pickle.dumps(request)) == request
