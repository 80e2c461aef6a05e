"""API keys: hashed at rest, roles, and UNAUTHENTICATED / PERMISSION_DENIED over a real gRPC socket (real Redis)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gen.ola.pipeline.v1 import pipeline_pb2 as pb
from services.gen.ola.pipeline.v1 import pipeline_pb2_grpc
from workflows.api.auth import ApiKeyStore, Role, hash_secret, parse_key
from workflows.api.errors import InvalidArgument, NotFound
from workflows.api.server import ApiServer, ServerConfig


@pytest.fixture
def prefix() -> str:
    return f"test-auth-{uuid.uuid4().hex[:8]}:"


def _keys(loop, redis_url: str, prefix: str, pepper: str = "") -> ApiKeyStore:
    return ApiKeyStore(loop.run(_client(redis_url)), prefix=prefix, pepper=pepper)


async def _client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url)


def test_keys_are_stored_hashed_and_checked(loop, redis_url, prefix) -> None:
    keys = _keys(loop, redis_url, prefix, pepper="server-pepper")
    info, plaintext = loop.run(keys.create("ci-bot", "trigger"))
    assert info.role == Role.TRIGGER and info.name == "ci-bot"
    key_id, secret = parse_key(plaintext)
    assert key_id == info.key_id and len(secret) >= 40

    raw = redis.Redis.from_url(redis_url)
    stored = {k.decode(): v.decode() for k, v in raw.hgetall(f"{prefix}apikey:{key_id}").items()}
    dump = " ".join(stored.values())
    assert secret not in dump and plaintext not in dump  # never at rest in plaintext
    assert stored["digest"] == hash_secret(secret, bytes.fromhex(stored["salt"]), b"server-pepper")
    # the pepper matters: the same secret and salt without it give another digest
    assert stored["digest"] != hash_secret(secret, bytes.fromhex(stored["salt"]))

    assert loop.run(keys.authenticate(plaintext)).key_id == key_id
    assert loop.run(keys.authenticate(plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B"))) is None
    assert loop.run(keys.authenticate("not-a-key")) is None
    other_server = ApiKeyStore(keys.redis, prefix=prefix, pepper="another-pepper")
    assert loop.run(other_server.authenticate(plaintext)) is None

    # two keys never share a salt or a digest
    _, second = loop.run(keys.create("ci-bot-2", "trigger"))
    stored2 = raw.hgetall(f"{prefix}apikey:{parse_key(second)[0]}")
    assert stored2[b"salt"].decode() != stored["salt"] and stored2[b"digest"].decode() != stored["digest"]

    listed = loop.run(keys.list())
    assert [k.name for k in listed] == ["ci-bot", "ci-bot-2"]
    revoked = loop.run(keys.revoke(key_id))
    assert revoked.revoked
    assert loop.run(keys.authenticate(plaintext)) is None
    assert [k.name for k in loop.run(keys.list())] == ["ci-bot-2"]
    assert {k.name for k in loop.run(keys.list(include_revoked=True))} == {"ci-bot", "ci-bot-2"}
    assert "digest" not in {k.decode() for k in raw.hkeys(f"{prefix}apikey:{key_id}")}


def test_key_creation_validates_its_fields(loop, redis_url, prefix) -> None:
    keys = _keys(loop, redis_url, prefix)
    with pytest.raises(InvalidArgument, match="role: role must be one of read, trigger, admin"):
        loop.run(keys.create("x", "root"))
    with pytest.raises(InvalidArgument, match=r"name: must be 1 to 64 characters"):
        loop.run(keys.create("has space", "read"))
    with pytest.raises(NotFound, match="no API key with id"):
        loop.run(keys.revoke("0123456789ab"))
    assert Role.READ < Role.TRIGGER < Role.ADMIN


@pytest.fixture(scope="module")
def server(loop, redis_url, tmp_path_factory) -> Iterator[tuple[ApiServer, str]]:
    prefix = f"test-auth-srv-{uuid.uuid4().hex[:8]}:"
    root = tmp_path_factory.mktemp("auth-runs")
    config = ServerConfig(redis_url=redis_url, runs_root=root, port=0, prefix=prefix, config_dirs=[root])
    srv = ApiServer(config)
    port = loop.run(srv.start())
    yield srv, f"127.0.0.1:{port}"
    loop.run(srv.stop(0))


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_grpc_calls_need_a_key_with_a_high_enough_role(loop, server) -> None:
    srv, target = server
    _, reader = loop.run(srv.keys.create("reader", "read"))
    _, trigger = loop.run(srv.keys.create("trigger", "trigger"))
    _, revoked = loop.run(srv.keys.create("gone", "admin"))
    loop.run(srv.keys.revoke(parse_key(revoked)[0]))
    with grpc.insecure_channel(target) as channel:
        stub = pipeline_pb2_grpc.PipelineServiceStub(channel)
        list_runs = pb.ListRunsRequest(page_size=5)

        code, details = _code(lambda: stub.ListRuns(list_runs, timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "x-api-key" in details
        code, _ = _code(lambda: stub.ListRuns(list_runs, metadata=[("x-api-key", "ola_0123456789ab_nope")], timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = _code(lambda: stub.ListRuns(list_runs, metadata=[("x-api-key", revoked)], timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED

        # read may list (and streams are guarded too), not start or cancel
        assert stub.ListRuns(list_runs, metadata=[("x-api-key", reader)], timeout=10).next_page_token == ""
        code, details = _code(
            lambda: stub.StartRun(pb.StartRunRequest(config="tiny"), metadata=[("x-api-key", reader)], timeout=10)
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert details == "StartRun needs role trigger; API key 'reader' has role read"
        code, _ = _code(
            lambda: stub.CancelRun(pb.CancelRunRequest(run_id="x"), metadata=[("x-api-key", reader)], timeout=10)
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, _ = _code(lambda: list(stub.WatchRun(pb.WatchRunRequest(run_id="x"), timeout=10)))
        assert code == grpc.StatusCode.UNAUTHENTICATED

        # trigger gets past auth to the servicer, which judges the request itself
        code, details = _code(
            lambda: stub.StartRun(pb.StartRunRequest(config="nope"), metadata=[("x-api-key", trigger)], timeout=10)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("config: no training config 'nope'")
        code, _ = _code(
            lambda: stub.GetRun(pb.GetRunRequest(run_id="x"), metadata=[("x-api-key", trigger)], timeout=10)
        )
        assert code == grpc.StatusCode.NOT_FOUND

        # health needs no key
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="ola.pipeline.v1.PipelineService"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------------------------------------------------ the CLI
def _cli(argv: list[str]) -> int:
    import argparse

    from workflows.api.cli import register

    parser = argparse.ArgumentParser(prog="ola")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_apikey_cli_creates_lists_and_revokes(redis_url, prefix, capsys) -> None:
    common = ["--redis-url", redis_url, "--prefix", prefix]
    assert _cli(["apikey", "create", "--name", "ops", "--role", "admin", *common]) == 0
    key = capsys.readouterr().out.strip()
    key_id, _ = parse_key(key)
    assert _cli(["apikey", "list", "--json", *common]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(k["key_id"], k["name"], k["role"]) for k in listed] == [(key_id, "ops", "admin")]
    assert key.split("_", 2)[2] not in json.dumps(listed)
    assert _cli(["apikey", "revoke", key_id, *common]) == 0
    assert f"revoked {key_id} (ops)" in capsys.readouterr().out
    assert _cli(["apikey", "list", "--json", *common]) == 0 and json.loads(capsys.readouterr().out) == []
    assert _cli(["apikey", "revoke", "0123456789ab", *common]) == 2
    assert "key_id: no API key with id '0123456789ab'" in capsys.readouterr().err


def test_ola_api_serve_runs_until_sigterm(loop, redis_url, prefix, tmp_path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "ola_model.cli", "api", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--redis-url", redis_url, "--prefix", prefix, "--runs-root", str(tmp_path / "runs"), "--no-models"]
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _, key = loop.run(_keys(loop, redis_url, prefix).create("cli", "read"))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=90)
            health = health_pb2_grpc.HealthStub(channel)
            assert (
                health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                == health_pb2.HealthCheckResponse.SERVING
            )
            stub = pipeline_pb2_grpc.PipelineServiceStub(channel)
            assert list(stub.ListRuns(pb.ListRunsRequest(), metadata=[("x-api-key", key)], timeout=10).runs) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
