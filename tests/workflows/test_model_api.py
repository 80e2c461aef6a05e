"""ModelService over a real gRPC socket: versions from a real ``mlflow server`` registry, the promotion gate moving
the ``challenger`` alias, forced champions for admins only, and canary rollouts in a real Redis (started, aborted,
promoted, and rolled back by the server's own controller ticks)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis
import yaml

from services.gen.ola.models.v1 import models_pb2 as pb
from services.gen.ola.models.v1 import models_pb2_grpc
from workflows.api.model_service import ModelServiceConfig
from workflows.api.server import ApiServer, ServerConfig
from workflows.lifecycle.rollout import append_samples


@dataclass
class Env:
    target: str
    model: str
    keys: dict[str, str]  # role -> API key
    rollout_prefix: str
    redis: redis.Redis

    def call(self, method: str, request: Any, role: str = "read") -> Any:
        with grpc.insecure_channel(self.target) as channel:
            stub = models_pb2_grpc.ModelServiceStub(channel)
            return getattr(stub, method)(request, metadata=[("x-api-key", self.keys[role])], timeout=60)

    def status(self, method: str, request: Any, role: str) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as err:
            self.call(method, request, role)
        return err.value.code(), err.value.details()

    def aliases(self) -> dict[str, str]:
        reply = self.call("ListVersions", pb.ListVersionsRequest(model_name=self.model))
        return {a.alias: a.version for a in reply.aliases}


@pytest.fixture(scope="module")
def env(mlflow_server: str, redis_url: str, tmp_path_factory, new_background_loop) -> Iterator[Env]:
    import mlflow

    tmp = tmp_path_factory.mktemp("model-api")
    policy = {
        "gate": {
            "metrics": {
                "acc": {"direction": "higher", "tolerance": 0.02, "floor": 0.5, "required": True},
                "wer": {"direction": "lower", "tolerance": 0.01, "required": False},
            }
        },
        "canary": {"steps": [50, 100], "window_s": 60, "min_requests": 3},
    }
    (tmp / "policy.yaml").write_text(yaml.safe_dump(policy))
    model = f"api-test-{uuid.uuid4().hex[:8]}"
    client = mlflow.MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    client.create_registered_model(model)
    for tags in ({"eval.acc": "0.7"}, {"eval.acc": "0.72", "eval.wer": "0.1"}, {"eval.acc": "0.6"}, {"stage": "1a"}):
        client.create_model_version(model, source=f"s3://media/{model}/{uuid.uuid4().hex}", tags=tags)

    loop = new_background_loop()
    prefix = f"test-models-{uuid.uuid4().hex[:8]}:"
    rollout_prefix = f"{prefix}rollout:"
    config = ServerConfig(
        redis_url=redis_url,
        runs_root=tmp / "runs",
        port=0,
        prefix=prefix,
        models=ModelServiceConfig(
            tracking_uri=mlflow_server,
            policy_path=tmp / "policy.yaml",
            rollout_prefix=rollout_prefix,
            rollout_models=[model],
            rollout_tick_s=0.2,
        ),
    )
    server = ApiServer(config)
    port = loop.run(server.start())
    keys = {role: loop.run(server.keys.create(f"{role}-key", role))[1] for role in ("read", "trigger", "admin")}
    try:
        yield Env(f"127.0.0.1:{port}", model, keys, rollout_prefix, redis.Redis.from_url(redis_url))
    finally:
        loop.run(server.stop(0))
        loop.close()


def test_versions_gate_promotion_and_forced_champion(env: Env) -> None:
    reply = env.call("ListVersions", pb.ListVersionsRequest(model_name=env.model))
    assert [v.version for v in reply.versions] == ["4", "3", "2", "1"]  # newest first
    v2 = reply.versions[2]
    assert {m.name: m.value for m in v2.metrics} == {"acc": 0.72, "wer": 0.1}
    assert v2.source.startswith(f"s3://media/{env.model}/") and v2.HasField("create_time")
    assert list(reply.aliases) == []

    force = pb.PromoteVersionRequest(model_name=env.model, version="1", force_champion=True, reason="first version")
    code, details = env.status("PromoteVersion", force, "trigger")
    assert code == grpc.StatusCode.PERMISSION_DENIED and "force_champion needs role admin" in details
    no_reason = pb.PromoteVersionRequest(model_name=env.model, version="1", force_champion=True)
    code, details = env.status("PromoteVersion", no_reason, "admin")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("reason: is required")
    forced = env.call("PromoteVersion", force, "admin")
    assert forced.promoted and forced.alias == "champion" and not forced.HasField("gate")
    assert env.aliases() == {"champion": "1"}

    worse = env.call("PromoteVersion", pb.PromoteVersionRequest(model_name=env.model, version="3"), "trigger")
    assert not worse.promoted and worse.alias == "" and not worse.gate.passed
    assert worse.gate.champion_version == "1"
    assert len(worse.gate.reasons) == 1 and worse.gate.reasons[0].startswith("acc: 0.6 is below champion 0.7")
    verdicts = {v.name: v for v in worse.gate.verdicts}
    assert verdicts["acc"].outcome == "fail" and verdicts["acc"].candidate == 0.6 and verdicts["acc"].champion == 0.7
    assert verdicts["wer"].outcome == "skipped" and not verdicts["wer"].HasField("candidate")
    missing = env.call("PromoteVersion", pb.PromoteVersionRequest(model_name=env.model, version="4"), "trigger")
    assert not missing.promoted and "required metric is missing" in missing.gate.reasons[0]
    assert env.aliases() == {"champion": "1"}  # failed gates move nothing

    better = env.call("PromoteVersion", pb.PromoteVersionRequest(model_name=env.model, version="2"), "trigger")
    assert better.promoted and better.alias == "challenger" and better.gate.passed
    assert env.aliases() == {"champion": "1", "challenger": "2"}

    code, details = env.status("PromoteVersion", pb.PromoteVersionRequest(model_name=env.model, version="1"), "trigger")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "already the champion" in details
    code, _ = env.status("PromoteVersion", pb.PromoteVersionRequest(model_name=env.model, version="99"), "trigger")
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = env.status("PromoteVersion", pb.PromoteVersionRequest(model_name=env.model, version="x"), "trigger")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("version: must be a version number")
    code, _ = env.status("ListVersions", pb.ListVersionsRequest(model_name="no-such-model"), "read")
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = env.status("ListVersions", pb.ListVersionsRequest(model_name="bad name!"), "read")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("model_name: ")
    code, _ = env.status("PromoteVersion", pb.PromoteVersionRequest(model_name=env.model, version="2"), "read")
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_rollouts_start_abort_promote_and_roll_back_by_ticks(env: Env) -> None:
    # the test above (pytest runs a file's tests in order) made version 1 the champion and 2 the challenger
    assert env.aliases() == {"champion": "1", "challenger": "2"}
    get = pb.GetRolloutRequest(model_name=env.model)
    code, _ = env.status("GetRollout", get, "read")
    assert code == grpc.StatusCode.NOT_FOUND

    start = pb.StartRolloutRequest(model_name=env.model, version="2")
    code, _ = env.status("StartRollout", start, "trigger")
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, details = env.status("StartRollout", pb.StartRolloutRequest(model_name=env.model, version="3"), "admin")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "points to version 2, not 3" in details
    rollout = env.call("StartRollout", start, "admin").rollout
    assert rollout.status == pb.ROLLOUT_STATUS_RUNNING and (rollout.champion_version, rollout.challenger_version) == (
        "1",
        "2",
    )
    assert list(rollout.steps) == [50.0, 100.0] and rollout.share == 50.0 and rollout.step_index == 0
    code, details = env.status("StartRollout", start, "admin")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "already running" in details

    aborted = env.call("AbortRollout", pb.AbortRolloutRequest(model_name=env.model, reason="pager"), "trigger").rollout
    assert aborted.status == pb.ROLLOUT_STATUS_ABORTED and aborted.share == 0.0
    assert [e.action for e in aborted.events] == ["start", "abort"]
    assert aborted.events[-1].reasons == ["pager by API key 'trigger-key'"]
    assert env.call("GetRollout", get).rollout.rollout_id == rollout.rollout_id
    assert env.aliases() == {"champion": "1", "challenger": "2"}  # the champion stays
    code, _ = env.status("AbortRollout", pb.AbortRolloutRequest(model_name=env.model), "trigger")
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # nothing running

    # the server's controller ticks: a challenger failing every request is rolled back without anyone asking
    second = env.call("StartRollout", start, "admin").rollout
    now = time.time()
    samples = [(f"{env.model}@2", now + i * 0.01, False, 0.1, None) for i in range(5)]
    samples += [(f"{env.model}@1", now + i * 0.01, True, 0.1, 0.05) for i in range(5)]
    append_samples(env.redis, samples, prefix=env.rollout_prefix)
    deadline = time.monotonic() + 20
    while (state := env.call("GetRollout", get).rollout).status == pb.ROLLOUT_STATUS_RUNNING:
        assert time.monotonic() < deadline, "the server did not tick the rollout"
        time.sleep(0.1)
    assert state.rollout_id == second.rollout_id and state.status == pb.ROLLOUT_STATUS_ROLLED_BACK
    assert state.events[-1].action == "rollback" and "error rate" in " ".join(state.events[-1].reasons)
    assert env.aliases() == {"champion": "1", "challenger": "2"}

    third = env.call("StartRollout", pb.StartRolloutRequest(model_name=env.model), "admin").rollout
    code, _ = env.status("PromoteRollout", pb.PromoteRolloutRequest(model_name=env.model), "trigger")
    assert code == grpc.StatusCode.PERMISSION_DENIED
    promoted = env.call("PromoteRollout", pb.PromoteRolloutRequest(model_name=env.model), "admin").rollout
    assert promoted.rollout_id == third.rollout_id and promoted.status == pb.ROLLOUT_STATUS_PROMOTED
    assert promoted.events[-1].action == "promoted"
    assert env.aliases() == {"champion": "2"}  # challenger became champion; its alias is gone


def test_models_and_rollout_cli(env: Env, capsys) -> None:
    import argparse
    import json

    from workflows.api.cli import register

    def cli(*argv: str, role: str = "read") -> int:
        parser = argparse.ArgumentParser(prog="ola")
        register(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args([*argv, "--model", env.model, "--target", env.target, "--api-key", env.keys[role]])
        return args.func(args)

    # after the tests above: version 2 is the champion, there is no challenger
    assert cli("models", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == f"{env.model} v2 @champion  stage -  acc=0.72 wer=0.1"
    assert cli("models", "promote", "3", role="trigger") == 1
    assert "did not pass the gate:\n  acc: 0.6 is below champion 0.72" in capsys.readouterr().out
    assert cli("rollout", "status", "--json") == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ROLLOUT_STATUS_PROMOTED"
    assert cli("rollout", "abort", role="trigger") == 2
    assert "FAILED_PRECONDITION" in capsys.readouterr().err
    assert cli("rollout", "start", role="read") == 2
    assert "PERMISSION_DENIED: StartRollout needs role admin" in capsys.readouterr().err
