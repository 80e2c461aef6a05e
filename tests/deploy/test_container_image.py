"""The platform image (docker/Dockerfile, .dockerignore) and its gRPC health check (docker/healthcheck.py, run against
a real gRPC server on loopback). No Docker engine runs here, so the Dockerfile is checked by reading it."""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
HEALTHCHECK = REPO / "docker" / "healthcheck.py"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_base_system_packages_and_extras() -> None:
    steps = _instructions()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for kind, a in steps if kind == "ARG" and "=" in a}
    assert args["PYTHON_VERSION"] == "3.11" and args["TORCH_VARIANT"] == "cpu"
    (base,) = [a for kind, a in steps if kind == "FROM"]
    assert base == "python:${PYTHON_VERSION}-slim"
    run = " ".join(" ".join(a.split()) for kind, a in steps if kind == "RUN")
    assert re.search(r"apt-get install .*espeak-ng", run) and "wget" in run  # TTS; KubeRay's probes
    assert '-c constraints/cpu.txt ".[serve,train]"' in run, "the CPU image pins torch with the CPU constraint"
    assert '"$TORCH_VARIANT" = "cuda"' in run, "the GPU variant is a build argument"
    assert "psycopg2-binary" in run, "MLflow's PostgreSQL store needs a driver"
    assert ("USER", "1000") in steps


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.removeprefix("**/")):
            ignored = not negate
    return ignored


def test_build_context_keeps_sources_and_drops_local_state() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for local in (".venv", ".cache", ".env", ".git"):
        assert _ignored(local, patterns), f"{local} must stay out of the image"
    assert not _ignored(".env.example", patterns)
    copied = [a.split()[:-1] for kind, a in _instructions() if kind == "COPY"]
    for sources in copied:
        for source in sources:
            source = source.rstrip("/")
            assert (REPO / source).exists(), f"COPY {source}: no such path"
            assert not _ignored(source, patterns), f"COPY {source} is excluded by .dockerignore"


# ------------------------------------------------------------------------------------------------ health check
def _load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ola_docker_healthcheck", HEALTHCHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _AppHealth(health_pb2_grpc.HealthServicer):
    """Health like Serve's proxy routes it: the answer depends on the ``application`` metadata."""

    def __init__(self) -> None:
        self.status: dict[str | None, int] = {}

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        app = dict(context.invocation_metadata()).get("application")
        if app not in self.status:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no application {app}")
        return health_pb2.HealthCheckResponse(status=self.status[app])


@pytest.fixture
def health_server() -> Iterator[tuple[str, _AppHealth]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = _AppHealth()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_healthcheck_passes_only_when_every_application_serves(health_server: tuple[str, _AppHealth]) -> None:
    target, servicer = health_server
    check = _load_healthcheck()
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    servicer.status = {None: serving, "omni": serving, "llm": not_serving}
    assert check.main([target]) == 0
    assert check.main([target, "--application", "omni"]) == 0
    assert check.check(target, ["omni", "llm"]) == [f"{target} application llm: NOT_SERVING"]
    assert check.main([target, "--application", "omni", "--application", "llm"]) == 1
    (problem,) = check.check(target, ["vision"])
    assert problem.startswith(f"{target} application vision: NOT_FOUND")


def test_healthcheck_command_line_fails_on_a_dead_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, str(HEALTHCHECK), f"127.0.0.1:{port}", "--timeout", "2"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr
    bad = subprocess.run(
        [sys.executable, str(HEALTHCHECK), "127.0.0.1:1", "--timeout", "0"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "--timeout must be > 0" in bad.stderr
