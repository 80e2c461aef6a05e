"""The model lifecycle end to end, on real servers only: an ``mlflow server`` whose registry keeps checkpoints in a
(moto) S3 store, a Redis, the control-plane API (ModelService) over gRPC, and an omni gateway over gRPC in front of an
LLM service that serves the registered versions (downloaded from the registry) while a canary controller ticks.

Three versions of one tiny model are registered as stage outputs: ``1`` (the champion, a seeded random checkpoint
saved with ``save_checkpoint``), ``2`` (a copy of it: a healthy challenger) and ``3`` (the same checkpoint with one
weight missing, as a broken export would be: it passes the offline gate, with the best metrics even, but no replica
can load it, so every chat it gets fails with FAILED_PRECONDITION / BACKEND_UNAVAILABLE). Then:

(a) the broken challenger is rolled back by the controller during its first step, from the outcomes the gateway
    recorded of real chats; the champion alias does not move and the audit log says why;
(b) the healthy challenger goes through the canary steps (quality probe included) and is promoted: the registry's
    ``champion`` alias moves to it;
(c) mid-rollout the gateway "restarts" (new router, recorder, controller and gateway objects on the same Redis):
    the rollout's state and every session's assignment survive;
(d) several threads asking ModelService to promote the same rollout at once leave exactly one champion.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import yaml

from services.gen.ola.common.v1 import sampling_pb2
from services.gen.ola.models.v1 import models_pb2 as pb
from services.gen.ola.models.v1 import models_pb2_grpc
from services.gen.ola.omni.v1 import omni_pb2, omni_pb2_grpc
from services.rollout import OmniProbe, RolloutRecorder, RolloutRouter, share_bucket
from workflows.lifecycle.policy import Probe, load_policy
from workflows.lifecycle.registry import ModelRegistry
from workflows.lifecycle.rollout import RegistryAliasStore, RolloutController

WINDOW_S = 2.0  # analysis window of each canary step
MIN_REQUESTS = 4  # challenger requests a window needs before it is judged
METRICS = {"1": 0.70, "2": 0.71, "3": 0.75}  # eval.acc of each version: the broken one looks best offline


async def _serve(*registrations: Callable[[grpc.aio.Server], Any]) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    for register in registrations:
        register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _break_checkpoint(path: Path) -> str:
    """Drop one tensor from a checkpoint (file and index), as a broken export would; returns the dropped key."""
    from safetensors.torch import load_file, save_file

    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = sorted(index["weight_map"])[0]
    shard = path / index["weight_map"].pop(key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    return key


@dataclass
class Lifecycle:
    """The servers and names every test of the module shares."""

    model: str
    tracking_uri: str
    redis_url: str
    prefix: str  # the rollout controller's Redis prefix (the API's and the gateways')
    registry: ModelRegistry
    loop: Any  # tests/conftest.py BackgroundLoop
    llm_address: str
    api_target: str
    keys: dict[str, str]  # role -> API key
    policy_path: Path
    broken_key: str
    gateways: list[Gateway] = field(default_factory=list)

    def serving(self, version: str) -> str:
        return f"{self.model}@{version}"

    def api(self, method: str, request: Any, role: str = "read") -> Any:
        with grpc.insecure_channel(self.api_target) as channel:
            stub = models_pb2_grpc.ModelServiceStub(channel)
            return getattr(stub, method)(request, metadata=[("x-api-key", self.keys[role])], timeout=60)

    def aliases(self) -> dict[str, str]:
        """The registry's aliases of the model, read from MLflow."""
        return {a: v.version for v in self.registry.list_versions(self.model) for a in v.aliases}

    def gateway(self) -> Gateway:
        gateway = Gateway(self)
        self.gateways.append(gateway)
        return gateway


class Gateway:
    """One gateway "process": an OmniGateway with a RolloutRouter and a RolloutRecorder on the shared Redis, its own
    gRPC server, and a RolloutController ticking in a thread with a quality probe through this gateway."""

    def __init__(self, lc: Lifecycle) -> None:
        from services.gateway import GatewayConfig, GrpcBackends, OmniGateway, OmniServicer
        from services.sessions import RedisSessionStore

        self.lc = lc
        self.router = RolloutRouter(lc.redis_url, lc.model, lc.serving("1"), prefix=lc.prefix, refresh_s=0.1)
        self.recorder = RolloutRecorder(lc.redis_url, prefix=lc.prefix, flush_s=0.1)

        async def start() -> tuple[Any, grpc.aio.Server, int]:
            address = lc.llm_address
            gateway = OmniGateway(
                GrpcBackends(address, address, address, address),  # text turns use the LLM only
                GatewayConfig(default_model_version=lc.serving("1")),
                sessions=RedisSessionStore(lc.redis_url, prefix=f"{lc.prefix}session:"),
                router=self.router,
                recorder=self.recorder,
            )
            server, port = await _serve(
                lambda s: omni_pb2_grpc.add_OmniServiceServicer_to_server(OmniServicer(gateway), s)
            )
            return gateway, server, port

        self.gateway, self.server, port = lc.loop.run(start())
        self.target = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = omni_pb2_grpc.OmniServiceStub(self.channel)
        self.controller: RolloutController | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start_controller(self, probes: list[Probe]) -> RolloutController:
        """A controller of the model on the shared Redis, ticking every 0.1 s, its probe asked through this gateway."""
        self.controller = RolloutController(
            self.lc.redis_url,
            self.lc.model,
            load_policy(self.lc.policy_path),
            RegistryAliasStore(self.lc.registry),
            OmniProbe(self.target, probes, timeout_s=60),
            prefix=self.lc.prefix,
        )
        self._thread = threading.Thread(
            target=self.controller.run_controller, kwargs={"interval": 0.1, "stop": self._stop}, daemon=True
        )
        self._thread.start()
        return self.controller

    def chat(self, session_id: str, text: str = "Hi.", max_new_tokens: int = 2, model_version: str = "") -> str:
        """One greedy turn; returns the session's model version (raises grpc.RpcError on failure)."""
        sampling = sampling_pb2.SamplingParams(
            temperature=0.0, top_k=0, repetition_penalty=1.0, max_new_tokens=max_new_tokens
        )
        req = omni_pb2.ChatRequest(session_id=session_id, model_version=model_version, text=text, sampling=sampling)
        events = list(self.stub.Chat(req, timeout=60))
        assert events[-1].HasField("final"), events[-1]
        return events[0].started.model_version

    def reply(self, text: str, version: str, max_new_tokens: int) -> str:
        sampling = sampling_pb2.SamplingParams(
            temperature=0.0, top_k=0, repetition_penalty=1.0, max_new_tokens=max_new_tokens
        )
        req = omni_pb2.ChatRequest(model_version=version, text=text, sampling=sampling)
        return list(self.stub.Chat(req, timeout=60))[-1].final.text

    def drive(self, until: Callable[[], bool], timeout: float, tag: str) -> dict[str, str]:
        """New sessions one after another until ``until()``: session -> its version, or the failure's status code."""
        outcomes: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        i = 0
        while not until():
            assert time.monotonic() < deadline, f"{tag}: the condition did not hold within {timeout} s: {outcomes}"
            session = f"{tag}-{i}"
            i += 1
            try:
                outcomes[session] = self.chat(session)
            except grpc.RpcError as exc:
                outcomes[session] = exc.code().name
        return outcomes

    def close(self) -> None:
        """Stop everything this gateway "process" owns (nothing in Redis or the registry is touched)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.channel.close()

        async def stop() -> None:
            await self.server.stop(None)
            await self.gateway.backends.close()
            await self.gateway.sessions.close()

        self.lc.loop.run(stop())
        self.router.close()
        self.recorder.close()


@pytest.fixture(scope="module")
def lc(
    mlflow_server, s3, s3_creds, redis_url, tiny_model, tiny_tok, tmp_path_factory, new_background_loop
) -> Iterator[Lifecycle]:
    from ola_model import save_checkpoint
    from services.llm import LLMServiceConfig, LLMServicer
    from services.llm import add_to_server as add_llm
    from services.registry import ModelRegistry as ServingRegistry
    from services.registry import ModelSource, RegistryConfig
    from workflows.api.model_service import ModelServiceConfig
    from workflows.api.server import ApiServer, ServerConfig
    from workflows.artifacts import S3ArtifactStore

    tmp = tmp_path_factory.mktemp("lifecycle-e2e")
    model = f"e2e-{uuid.uuid4().hex[:8]}"
    policy = {
        "gate": {"metrics": {"acc": {"direction": "higher", "tolerance": 0.02, "floor": 0.5}}},
        "canary": {
            "steps": [50, 100],
            "window_s": WINDOW_S,
            "min_requests": MIN_REQUESTS,
            # versions 1 and 2 have the same weights, and chats take milliseconds: the p95 of a few requests is their
            # slowest, which one CPU stall on a busy machine decides. Latency ratios are covered by the controller's
            # own tests; here only errors and probes may roll back.
            "thresholds": {"max_error_rate_increase": 0.2, "max_p95_latency_ratio": 1000, "max_ttft_ratio": 1000},
        },
    }
    policy_path = tmp / "promotion.yaml"
    policy_path.write_text(yaml.safe_dump(policy))

    # three stage outputs: the champion, a copy of it, and a broken export of it
    stages = tmp / "stages"
    champion_dir = save_checkpoint(tiny_model, stages / "1" / "model", tokenizer=tiny_tok)
    shutil.copytree(champion_dir, stages / "2" / "model")
    shutil.copytree(champion_dir, stages / "3" / "model")
    broken_key = _break_checkpoint(stages / "3" / "model")
    registry = ModelRegistry(mlflow_server, s3_endpoint_url=s3.endpoint_url)
    store = S3ArtifactStore(s3.bucket, f"e2e/{model}", endpoint_url=s3.endpoint_url)
    pipeline = f"pipeline-{uuid.uuid4().hex[:8]}"
    for version, acc in METRICS.items():
        got = registry.register_stage_output(
            stages / version / "model", stage=f"s{version}", pipeline_id=pipeline, name=model, store=store,
            eval_metrics={"acc": acc},
        )  # fmt: skip
        assert got == version

    # the serving side fetches every version from the registry (S3 through MLflow's version source)
    versions = {
        f"{model}@{v}": ModelSource(checkpoint=registry.download_version(model, v, tmp / "serving" / v))
        for v in METRICS
    }
    serving = ServingRegistry(RegistryConfig(versions=versions, default_version=f"{model}@1"))
    llm = LLMServicer(LLMServiceConfig(max_batch=8), registry=serving)
    loop = new_background_loop()
    llm_server, llm_port = loop.run(_serve(lambda s: add_llm(s, llm)))

    prefix = f"e2e-{uuid.uuid4().hex[:8]}:"
    config = ServerConfig(
        redis_url=redis_url,
        runs_root=tmp / "runs",
        port=0,
        prefix=prefix,
        models=ModelServiceConfig(
            tracking_uri=mlflow_server,
            policy_path=policy_path,
            rollout_prefix=f"{prefix}rollout:",
            rollout_models=[model],
            rollout_tick_s=0,  # the gateways' controllers tick
        ),
    )
    api = ApiServer(config)
    port = loop.run(api.start())
    keys = {role: loop.run(api.keys.create(f"{role}-key", role))[1] for role in ("read", "trigger", "admin")}
    lifecycle = Lifecycle(
        model=model,
        tracking_uri=mlflow_server,
        redis_url=redis_url,
        prefix=f"{prefix}rollout:",
        registry=registry,
        loop=loop,
        llm_address=f"127.0.0.1:{llm_port}",
        api_target=f"127.0.0.1:{port}",
        keys=keys,
        policy_path=policy_path,
        broken_key=broken_key,
    )
    first = lifecycle.api(
        "PromoteVersion",
        pb.PromoteVersionRequest(model_name=model, version="1", force_champion=True, reason="first version"),
        "admin",
    )
    assert first.promoted and first.alias == "champion"
    try:
        yield lifecycle
    finally:
        for gateway in lifecycle.gateways:
            gateway.close()
        loop.run(api.stop(0))
        loop.run(llm_server.stop(None))
        loop.run(llm.close())
        loop.close()


@pytest.fixture(scope="module")
def probes(lc: Lifecycle) -> list[Probe]:
    """The quality probe: the champion's greedy answer to a fixed prompt (a healthy copy must give it too)."""
    gateway = lc.gateway()
    answer = gateway.reply("Hello.", lc.serving("1"), max_new_tokens=4)
    assert answer.strip()
    return [Probe(id="hello", prompt="Hello.", answers=[answer], match="exact", max_new_tokens=4)]


def _nominate(lc: Lifecycle, version: str) -> None:
    reply = lc.api("PromoteVersion", pb.PromoteVersionRequest(model_name=lc.model, version=version), "trigger")
    assert reply.promoted and reply.alias == "challenger" and reply.gate.passed, reply


def _wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)
    return value


def test_a_broken_challenger_is_rolled_back_during_its_first_step(lc: Lifecycle, probes: list[Probe]) -> None:
    gateway = lc.gateway()
    ctl = gateway.start_controller(probes)
    _nominate(lc, "3")  # the gate only sees the offline metrics: 0.75 beats the champion's 0.70
    assert lc.aliases() == {"champion": "1", "challenger": "3"}
    rollout = lc.api("StartRollout", pb.StartRolloutRequest(model_name=lc.model, version="3"), "admin").rollout
    _wait_for(lambda: gateway.router.snapshot.rollout_id == rollout.rollout_id, 10, "the router seeing the rollout")

    outcomes = gateway.drive(lambda: ctl.state().status != "running", timeout=40, tag="broken")
    final = ctl.state()
    assert final.id == rollout.rollout_id and final.status == "rolled_back"
    assert final.step_index == 0 and [e.action for e in final.events] == ["start", "rollback"]
    # every chat the broken version got failed as a backend that cannot load it; the champion's all answered
    failed = {s for s, v in outcomes.items() if v == "FAILED_PRECONDITION"}
    served = {s for s, v in outcomes.items() if v == lc.serving("1")}
    # every challenger chat failed; the breach is certain from the first error (1/MIN_REQUESTS is over the limit)
    assert failed | served == set(outcomes) and len(failed) >= 1
    assert all(share_bucket(s, rollout.rollout_id) < 50 for s in failed)
    assert all(share_bucket(s, rollout.rollout_id) >= 50 for s in served)

    rollback = [e for e in ctl.audit() if e["rollout_id"] == rollout.rollout_id and e["action"] == "rollback"]
    assert len(rollback) == 1 and rollback[0]["status"] == "rolled_back"
    assert rollback[0]["reasons"][0].startswith("error rate") and "max_error_rate_increase" in str(rollback[0])
    stats = rollback[0]["stats"]["challenger"]
    assert stats["requests"] == stats["errors"] >= 1
    assert lc.aliases() == {"champion": "1", "challenger": "3"}  # the champion alias did not move
    got = lc.api("GetRollout", pb.GetRolloutRequest(model_name=lc.model)).rollout
    assert got.status == pb.ROLLOUT_STATUS_ROLLED_BACK and "error rate" in got.events[-1].reasons[0]
    # new sessions go to the champion again
    _wait_for(lambda: gateway.router.snapshot.share == 0, 10, "the router dropping the share")
    assert {gateway.chat(f"after-rollback-{i}") for i in range(4)} == {lc.serving("1")}
    with pytest.raises(grpc.RpcError) as err:  # the broken version really cannot load
        gateway.chat("pinned-broken", model_version=lc.serving("3"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and lc.broken_key in err.value.details()
    gateway.close()
    lc.gateways.remove(gateway)


def test_a_healthy_challenger_survives_a_gateway_restart_and_is_promoted(lc: Lifecycle, probes: list[Probe]) -> None:
    _nominate(lc, "2")
    assert lc.aliases() == {"champion": "1", "challenger": "2"}
    gateway = lc.gateway()
    ctl = gateway.start_controller(probes)
    rollout = lc.api("StartRollout", pb.StartRolloutRequest(model_name=lc.model), "admin").rollout
    assert rollout.challenger_version == "2" and rollout.share == 50
    _wait_for(lambda: gateway.router.snapshot.rollout_id == rollout.rollout_id, 10, "the router seeing the rollout")

    # two sessions on each side (fewer challenger requests than a judgement needs: step 0 cannot end before the restart)
    on_challenger = [s for s in (f"pre-{i}" for i in range(1000)) if share_bucket(s, rollout.rollout_id) < 50][:2]
    on_champion = [s for s in (f"pre-{i}" for i in range(1000)) if share_bucket(s, rollout.rollout_id) >= 50][:2]
    before = {s: gateway.chat(s) for s in on_challenger + on_champion}
    assert before == {**dict.fromkeys(on_challenger, lc.serving("2")), **dict.fromkeys(on_champion, lc.serving("1"))}

    # the restart: every object of the gateway process goes, new ones come up on the same Redis
    gateway.close()
    lc.gateways.remove(gateway)
    restarted = lc.gateway()
    ctl2 = restarted.start_controller(probes)
    state = ctl2.state()
    assert (state.id, state.status, state.step_index, state.share) == (rollout.rollout_id, "running", 0, 50.0)
    _wait_for(lambda: restarted.router.snapshot.rollout_id == rollout.rollout_id, 10, "the new router's snapshot")
    assert {s: restarted.router(s) for s in before} == before  # the same assignment, from the same state
    assert {s: restarted.chat(s) for s in before} == before  # and the sessions keep their versions

    # traffic goes on: step 0 is judged healthy, 100 % is judged healthy (probe included), the challenger is promoted
    during = restarted.drive(lambda: not ctl2.state().active, timeout=60, tag="post")
    assert set(during.values()) <= {lc.serving("1"), lc.serving("2")}  # no request failed
    final = ctl2.state()
    assert final.id == rollout.rollout_id and final.status == "promoted", final.events[-1]
    assert [e.action for e in final.events] == ["start", "advance", "promote", "promoted"]
    assert any("probe accuracy 1.000" in r for r in final.events[-2].reasons)
    assert lc.aliases() == {"champion": "2"}  # champion moved in MLflow, the challenger alias is gone
    actions = [e["action"] for e in ctl.audit() if e["rollout_id"] == rollout.rollout_id]
    assert [a for a in actions if a != "hold"] == ["start", "advance", "promote", "promoted"]
    assert "hold" in actions  # the windows were judged (and held open) before they closed
    _wait_for(lambda: restarted.router.snapshot.status == "promoted", 10, "the router seeing the promotion")
    assert restarted.chat("after-promotion") == lc.serving("2")


def test_concurrent_promotes_through_the_api_leave_one_champion(lc: Lifecycle) -> None:
    assert lc.aliases() == {"champion": "2"}
    _nominate(lc, "1")  # 0.70 is within the tolerance 0.02 of the champion's 0.71
    rollout = lc.api("StartRollout", pb.StartRolloutRequest(model_name=lc.model), "admin").rollout
    assert (rollout.champion_version, rollout.challenger_version) == ("2", "1")

    n = 6
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def promote(i: int) -> None:
        barrier.wait()
        try:
            request = pb.PromoteRolloutRequest(model_name=lc.model, reason=f"caller {i}")
            results[i] = lc.api("PromoteRollout", request, "admin").rollout
        except grpc.RpcError as exc:
            results[i] = exc

    threads = [threading.Thread(target=promote, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [r for r in results if isinstance(r, pb.Rollout)]
    losers = [r for r in results if isinstance(r, grpc.RpcError)]
    assert len(winners) == 1 and len(losers) == n - 1, results
    assert winners[0].rollout_id == rollout.rollout_id and winners[0].status == pb.ROLLOUT_STATUS_PROMOTED
    assert all(e.code() == grpc.StatusCode.FAILED_PRECONDITION for e in losers)
    assert all("cannot promote" in e.details() for e in losers)

    versions = lc.registry.list_versions(lc.model)
    assert [v.version for v in versions if "champion" in v.aliases] == ["1"]
    assert lc.aliases() == {"champion": "1"}
    client = redis.Redis.from_url(lc.redis_url)
    audit = [json.loads(raw) for raw in client.lrange(f"{lc.prefix}{lc.model}:audit", 0, -1)]
    mine = [e["action"] for e in audit if e["rollout_id"] == rollout.rollout_id and e["action"] != "hold"]
    assert mine == ["start", "promote", "promoted"]  # (the gateway's controller ticks too: holds, no traffic)
    got = lc.api("GetRollout", pb.GetRolloutRequest(model_name=lc.model)).rollout
    assert got.status == pb.ROLLOUT_STATUS_PROMOTED and len([e for e in got.events if e.action == "promoted"]) == 1


def test_the_lifecycle_benchmark_runs_against_the_same_servers(
    mlflow_server, s3, s3_creds, redis_url, tiny_model, tiny_tok, tmp_path, monkeypatch
) -> None:
    """``bench/lifecycle.py`` at a toy scale on the session's servers: promoted, then rolled back after a breach."""
    import importlib
    import sys

    from ola_model import save_checkpoint

    repo = Path(__file__).resolve().parents[2]
    if str(repo) not in sys.path:
        monkeypatch.syspath_prepend(str(repo))
    bench = importlib.import_module("bench.lifecycle")
    stage = save_checkpoint(tiny_model, tmp_path / "stage" / "model", tokenizer=tiny_tok)
    policy = {"gate": {"metrics": {"acc": {"direction": "higher"}}}, "canary": {"steps": [50, 100]}}
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    out = tmp_path / "lifecycle.json"
    args = ["--stage-dir", str(tmp_path / "stage"), "--policy", str(tmp_path / "policy.yaml"), "--json", str(out)]
    args += ["--window-s", "1", "--min-requests", "3", "--rate", "20", "--tick-s", "0.1", "--latency-ratio", "1000"]
    args += ["--metrics", "acc=0.8", "--champion-metrics", "acc=0.8", "--workdir", str(tmp_path / "work")]
    args += ["--redis-url", redis_url, "--s3-endpoint", s3.endpoint_url, "--bucket", s3.bucket]
    args += ["--tracking-uri", mlflow_server]
    result = bench.main(args)

    assert json.loads(out.read_text())["rollback"]["reasons"] == result["rollback"]["reasons"]
    assert result["config"]["stage_dir"] == str(stage) and result["config"]["steps"] == [50.0, 100.0]
    phases = {row["phase"]: row["seconds"] for row in result["time_to_champion"]["phases"]}
    assert list(phases)[:4] == [
        "register (S3 upload + MLflow version)",
        "gate + challenger alias",
        "deploy (download + load + warm up)",
        "start rollout",
    ]
    assert phases["canary step 0 (50 %)"] >= 1 and phases["canary step 1 (100 %)"] >= 1
    total = phases["total: stage output -> champion"]
    assert total > sum(v for k, v in phases.items() if k.startswith("canary step"))  # the windows are inside it
    registry = ModelRegistry(mlflow_server)
    model = result["config"]["model"]
    assert registry.get_alias(model, "champion").version == result["time_to_champion"]["version"] == "2"
    rb = result["rollback"]
    # 1 healthy chat then the breach, 3 needed for a judgement: it cannot leave step 0 before failing
    assert rb["version"] == "3" and rb["step_index"] == 0 and rb["reasons"][0].startswith("error rate")
    assert 0 < rb["reaction_s"] <= rb["routed_away_s"] and rb["failed_after_breach"] >= 1
    assert rb["within_window"] == (rb["reaction_s"] <= 1.0) and rb["window_s"] == 1.0
    assert result["traffic"]["chats"] > 0 and set(result["traffic"]["failed_by_code"]) <= {"UNAVAILABLE", "CANCELLED"}
