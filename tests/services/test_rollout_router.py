"""The gateway side of a canary: sticky routing by share from Redis, outcome recording, and a real OmniGateway
routing sessions between two registry versions while the controller advances, promotes or rolls back."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.gateway import GatewayConfig, GrpcBackends, OmniGateway, OmniServicer
from services.gen.ola.common.v1 import sampling_pb2
from services.gen.ola.omni.v1 import omni_pb2, omni_pb2_grpc
from services.llm import LLMServiceConfig, LLMServicer
from services.llm import add_to_server as add_llm
from services.registry import ModelRegistry, ModelSource, RegistryConfig
from services.rollout import OmniProbe, RolloutRecorder, RolloutRouter, share_bucket
from workflows.lifecycle.policy import Probe, PromotionPolicy
from workflows.lifecycle.rollout import InMemoryAliasStore, RolloutController, append_samples, read_window


class Clock:
    """An injectable wall clock shared by the recorder and the controller; moves only when told."""

    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def _policy(steps: list[float], min_requests: int = 3) -> PromotionPolicy:
    return PromotionPolicy.from_mapping(
        {
            "gate": {"metrics": {"acc": {"direction": "higher"}}},
            "canary": {
                "steps": steps,
                "window_s": 0.5,
                "min_requests": min_requests,
                # the two versions are the same weights: real timings only differ by noise on a busy machine
                "thresholds": {"max_p95_latency_ratio": 50, "max_ttft_ratio": 50, "max_error_rate_increase": 0.2},
            },
        }
    )


class World:
    """A model's rollout in Redis under a private prefix, with aliases champion=1 / challenger=``challenger``."""

    def __init__(self, redis_url: str, model: str = "tiny", challenger: str = "2") -> None:
        self.url = redis_url
        self.model = model
        self.prefix = f"test:{uuid.uuid4().hex[:8]}:"
        self.clock = Clock()
        self.aliases = InMemoryAliasStore({(model, "champion"): "1", (model, "challenger"): challenger})

    def controller(self, steps: list[float], probe=None, min_requests: int = 3) -> RolloutController:
        return RolloutController(
            self.url,
            self.model,
            _policy(steps, min_requests),
            self.aliases,
            probe,
            clock=self.clock,
            prefix=self.prefix,
        )

    def router(self, **kw) -> RolloutRouter:
        kw.setdefault("start", False)
        return RolloutRouter(self.url, self.model, kw.pop("fallback", "tiny@1"), prefix=self.prefix, **kw)

    def healthy_window(self, versions: tuple[str, ...] = ("tiny@1", "tiny@2"), n: int = 5) -> None:
        """Healthy request samples of ``versions``, then the clock past the window."""
        client = redis.Redis.from_url(self.url)
        samples = [(v, self.clock() + 0.01 * i, True, 0.1, 0.01) for v in versions for i in range(n)]
        append_samples(client, samples, prefix=self.prefix)
        self.clock.advance(1.0)


def _dead_redis() -> redis.Redis:
    """A client of a port where nothing listens, failing at once (no retries)."""
    return redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))


def _wait(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# ------------------------------------------------------------------------------------------------ the router
def test_assignment_is_sticky_and_respects_the_share(redis_url):
    world = World(redis_url)
    ctl = world.controller([25, 50, 100])
    state = ctl.start_rollout("2")
    router, replica = world.router(), world.router()
    assert router.refresh() and replica.refresh()
    sessions = [f"session-{i}" for i in range(4000)]
    first = [router(s) for s in sessions]
    assert first == [router(s) for s in sessions] == [replica(s) for s in sessions]  # stable, and the same everywhere
    on_challenger = {s for s, v in zip(sessions, first, strict=True) if v == "tiny@2"}
    assert set(first) == {"tiny@1", "tiny@2"}
    assert abs(len(on_challenger) / len(sessions) - 0.25) < 0.04
    assert all(share_bucket(s, state.id) < 25 for s in on_challenger)
    world.healthy_window()
    assert ctl.tick().action == "advance"
    assert router.refresh() and router.snapshot.share == 50
    now = {s for s in sessions if router(s) == "tiny@2"}
    assert on_challenger < now and abs(len(now) / len(sessions) - 0.5) < 0.04  # raising the share only adds sessions
    ctl.abort("test")
    assert router.refresh() and {router(s) for s in sessions[:200]} == {"tiny@1"}


def test_no_rollout_routes_to_the_fallback_then_to_the_last_promoted_version(redis_url):
    world = World(redis_url)
    default = {"version": "tiny@1"}
    router = world.router(fallback=lambda: default["version"])
    assert router.refresh() and router.snapshot.rollout_id is None
    assert router("a") == "tiny@1"
    default["version"] = "tiny@0"  # the gateway's default version changed (Serve reconfigure)
    assert router("a") == "tiny@0"
    ctl = world.controller([100])
    ctl.start_rollout()
    ctl.promote("approved")
    assert router.refresh() and {router(f"s{i}") for i in range(100)} == {"tiny@2"}


def test_the_snapshot_refreshes_in_the_background_and_survives_redis_outages(redis_url):
    world = World(redis_url)
    router = world.router(start=True, refresh_s=0.05)
    try:
        assert _wait(lambda: router.snapshot.fetched_at > 0)
        state = world.controller([100]).start_rollout()  # 100 %: every new session to the challenger
        assert _wait(lambda: router.snapshot.rollout_id == state.id)
        assert router("anyone") == "tiny@2"
        # Redis goes away: the router keeps routing by the last snapshot, without raising or waiting
        router.redis = _dead_redis()
        assert not router.refresh()
        started = time.perf_counter()
        assert {router(f"s{i}") for i in range(10_000)} == {"tiny@2"}
        assert time.perf_counter() - started < 2.0  # no Redis round trip per call
        router.redis = redis.Redis.from_url(redis_url)
        world.controller([100]).abort("outage drill over")
        assert _wait(lambda: router.snapshot.challenger is None)
        assert router("anyone") == "tiny@1"
    finally:
        router.close()
    assert router._thread is not None and not router._thread.is_alive()
    with pytest.raises(ValueError, match="refresh_s"):
        world.router(refresh_s=0)


# ------------------------------------------------------------------------------------------------ the recorder
def test_the_recorder_writes_outcomes_in_batches_in_the_background(redis_url):
    world = World(redis_url)
    recorder = RolloutRecorder(redis_url, prefix=world.prefix, clock=world.clock, flush_s=0.05)
    client = redis.Redis.from_url(redis_url)
    t0 = world.clock()
    try:
        for i in range(10):
            recorder.record("tiny@7", i != 0, 0.2 + i * 0.01, 0.05)
        assert _wait(lambda: read_window(client, "tiny@7", t0, t0 + 1, prefix=world.prefix).requests == 10)
        stats = read_window(client, "tiny@7", t0, t0 + 1, prefix=world.prefix)
        assert stats.errors == 1 and stats.p95_latency_s == pytest.approx(0.29) and stats.p95_ttft_s == 0.05
        for bad, message in [
            (("", True, 0.1), "version"),
            (("v", True, -1.0), "latency_s"),
            (("v", True, float("nan")), "latency_s"),
            (("v", True, 0.1, float("inf")), "ttft_s"),
        ]:
            with pytest.raises(ValueError, match=message):
                recorder.record(*bad)
    finally:
        recorder.close()
    recorder.record("tiny@7", True, 0.1)
    recorder.close()  # a last flush on close
    assert read_window(client, "tiny@7", t0, t0 + 1, prefix=world.prefix).requests == 11
    # a full queue drops the oldest samples and counts them; Redis down loses a batch, never a request
    small = RolloutRecorder(_dead_redis(), max_pending=3, start=False)
    for _ in range(5):
        small.record("tiny@7", True, 0.1)
    assert small.dropped == 2 and small.flush() == 0 and small.dropped == 5


# ------------------------------------------------------------------------------------------------ a real gateway
@pytest.fixture(scope="module")
def llm_address(aio, tiny_checkpoint, tmp_path_factory):
    """An LLM service with versions tiny@1 and tiny@2 (the same weights) and tiny@3, whose checkpoint is missing."""
    missing = tmp_path_factory.mktemp("rollout") / "no-such-checkpoint"
    registry = ModelRegistry(
        RegistryConfig(
            versions={
                "tiny@1": ModelSource(checkpoint=tiny_checkpoint),
                "tiny@2": ModelSource(checkpoint=tiny_checkpoint),
                "tiny@3": ModelSource(checkpoint=missing),
            },
            default_version="tiny@1",
        )
    )
    llm = LLMServicer(LLMServiceConfig(max_batch=8), registry=registry)
    port = aio.serve(lambda server: add_llm(server, llm))
    yield f"127.0.0.1:{port}"
    aio.run(llm.close())


def _serve_gateway(aio, llm_address: str, router: RolloutRouter, recorder: RolloutRecorder) -> str:
    async def make() -> OmniGateway:
        backends = GrpcBackends(llm_address, llm_address, llm_address, llm_address)  # text turns use the LLM only
        return OmniGateway(backends, GatewayConfig(default_model_version="tiny@1"), router=router, recorder=recorder)

    gateway = aio.run(make())
    port = aio.serve(lambda server: omni_pb2_grpc.add_OmniServiceServicer_to_server(OmniServicer(gateway), server))
    return f"127.0.0.1:{port}"


def _chat(stub, session_id: str, model_version: str = "") -> str:
    """One short greedy text turn; returns the session's model version."""
    sampling = sampling_pb2.SamplingParams(temperature=0.0, top_k=0, repetition_penalty=1.0, max_new_tokens=2)
    req = omni_pb2.ChatRequest(session_id=session_id, model_version=model_version, text="Hi.", sampling=sampling)
    events = list(stub.Chat(req, timeout=60))
    assert events[-1].HasField("final")
    return events[0].started.model_version


def test_a_gateway_routes_new_sessions_by_share_through_to_promotion(aio, llm_address, redis_url):
    world = World(redis_url)
    router = world.router()
    recorder = RolloutRecorder(redis_url, prefix=world.prefix, clock=world.clock, start=False)
    target = _serve_gateway(aio, llm_address, router, recorder)
    client = redis.Redis.from_url(redis_url)
    with grpc.insecure_channel(target) as channel:
        stub = omni_pb2_grpc.OmniServiceStub(channel)
        # the quality probe: tiny@1's greedy answer is the known answer (tiny@2 has the same weights)
        sampling = sampling_pb2.SamplingParams(temperature=0.0, top_k=0, repetition_penalty=1.0, max_new_tokens=4)
        ref = list(stub.Chat(omni_pb2.ChatRequest(model_version="tiny@1", text="Hello.", sampling=sampling)))
        assert ref[-1].final.text.strip()  # a real reply to match
        probe = OmniProbe(
            target, [Probe(id="hello", prompt="Hello.", answers=[ref[-1].final.text], match="exact", max_new_tokens=4)]
        )
        assert OmniProbe(target, [Probe(id="x", prompt="Hello.", answers=["not the reply at all"])])("tiny@2") == 0
        recorder.flush()
        world.clock.advance(1.0)  # the probes' own requests stay out of the rollout's windows
        t0 = world.clock()
        ctl = world.controller([50, 100], probe=probe)
        state = ctl.start_rollout("2")
        assert router.refresh()
        sessions = [f"gw-{i}" for i in range(32)]
        versions = {s: _chat(stub, s) for s in sessions}
        expected = {s: "tiny@2" if share_bucket(s, state.id) < 50 else "tiny@1" for s in sessions}
        assert versions == expected and set(versions.values()) == {"tiny@1", "tiny@2"}
        recorder.flush()
        counts = {v: read_window(client, v, t0, t0 + 1, prefix=world.prefix) for v in ("tiny@1", "tiny@2")}
        n2 = sum(v == "tiny@2" for v in versions.values())
        assert counts["tiny@2"].requests == n2 and counts["tiny@1"].requests == len(sessions) - n2
        assert counts["tiny@2"].errors == 0 and counts["tiny@2"].p95_ttft_s is not None
        world.clock.advance(0.6)
        assert ctl.tick().action == "advance"
        assert router.refresh() and router.snapshot.share == 100
        assert {_chat(stub, f"gw-new-{i}") for i in range(4)} == {"tiny@2"}
        on_champion = next(s for s in sessions if versions[s] == "tiny@1")
        assert _chat(stub, on_champion) == "tiny@1"  # a session keeps its version
        recorder.flush()
        world.clock.advance(0.6)
        decision = ctl.tick()
        assert decision.action == "promote", decision.reasons
        assert any("probe accuracy 1.000" in r for r in decision.reasons)
        assert world.aliases.get_alias("tiny", "champion") == "2"
        assert router.refresh() and _chat(stub, "after-promotion") == "tiny@2"


def test_a_challenger_that_fails_is_rolled_back_through_the_gateway(aio, llm_address, redis_url):
    world = World(redis_url, challenger="3")  # tiny@3's checkpoint is missing: its requests fail
    router = world.router()
    recorder = RolloutRecorder(redis_url, prefix=world.prefix, clock=world.clock, start=False)
    target = _serve_gateway(aio, llm_address, router, recorder)
    ctl = world.controller([50, 100])
    state = ctl.start_rollout("3")
    assert router.refresh()
    failed = ok = 0
    with grpc.insecure_channel(target) as channel:
        stub = omni_pb2_grpc.OmniServiceStub(channel)
        for i in range(40):
            session = f"bad-{i}"
            if share_bucket(session, state.id) < 50:
                with pytest.raises(grpc.RpcError) as err:
                    _chat(stub, session)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                failed += 1
            else:
                assert _chat(stub, session) == "tiny@1"
                ok += 1
        with pytest.raises(grpc.RpcError):  # a client error: not the version's doing, not recorded
            list(stub.Chat(omni_pb2.ChatRequest(), timeout=10))
        recorder.flush()
        assert failed >= 3 and ok >= 3
        world.clock.advance(0.1)  # the window is still open: enough failures roll back at once
        decision = ctl.tick()
        assert decision.action == "rollback" and "error rate 1.000" in decision.reasons[0]
        assert f"({failed}/{failed})" in decision.reasons[0]
        assert world.aliases.get_alias("tiny", "champion") == "1"
        assert router.refresh() and {_chat(stub, f"after-{i}") for i in range(4)} == {"tiny@1"}


def test_the_platform_config_has_a_rollout_section():
    from services.serve_config import ConfigError, PlatformConfig

    assert PlatformConfig().rollout.model_name is None  # off by default
    on = PlatformConfig.from_mapping({"rollout": {"model_name": "ola", "redis_url_env": "OLA_ROLLOUT_REDIS"}})
    assert on.rollout.url({"OLA_ROLLOUT_REDIS": "redis://r:6379/2"}) == "redis://r:6379/2"
    with pytest.raises(ConfigError, match=r"rollout: Value error, model_name needs rollout\.redis_url"):
        PlatformConfig.from_mapping({"rollout": {"model_name": "ola"}})
    with pytest.raises(ConfigError, match=r"rollout\.refresh_s"):
        PlatformConfig.from_mapping({"rollout": {"refresh_s": 0}})


@pytest.mark.filterwarnings("ignore:coroutine 'OmniGatewayDeployment.__del__' was never awaited")
def test_the_serve_gateway_deployment_wires_the_router_and_recorder(aio, redis_url):
    from services.app import OmniGatewayDeployment, app_args
    from services.serve_config import PlatformConfig

    config = PlatformConfig.from_mapping({"rollout": {"model_name": "tiny", "redis_url": redis_url}})
    replica_class = OmniGatewayDeployment.func_or_class  # the class Serve would run in each replica
    replica = replica_class.__new__(replica_class)
    aio.run(replica.__init__(app_args(config, "gateway")))
    gateway = replica.gateway
    try:
        assert isinstance(gateway.router, RolloutRouter) and isinstance(gateway.recorder, RolloutRecorder)
        assert gateway.router.model_name == "tiny"
        gateway.config.default_model_version = "tiny@9"  # what reconfigure sets: no rollout seen yet
        assert gateway.router.refresh() and gateway.router("s") == "tiny@9"
    finally:
        aio.run(replica.__del__())  # what Serve awaits when the replica stops
    assert not gateway.router._thread.is_alive() and not gateway.recorder._thread.is_alive()
