"""Shared fixtures: the tiny preset, built once per session with a fixed seed, and real servers on loopback.

- ``redis_url``: a real ``redis-server`` on a free loopback port (apt package ``redis-server``), started and stopped
  here, without persistence;
- ``s3``: a moto S3 server (pip ``moto[server]``) on a free loopback port, with a bucket.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_config():
    from ola_model import OlaConfig

    return OlaConfig.from_name("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    """A seeded random tiny model. Tests must not modify it (use build_model for a private copy)."""
    from ola_model import build_model

    torch.manual_seed(0)
    return build_model(tiny_config, seed=0)


@pytest.fixture(scope="session")
def tiny_tok():
    from ola_model.tokenizer import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model, tiny_tok):
    from ola_model import OlaPipeline

    return OlaPipeline(tiny_model, tiny_tok)


_SERVER_START_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check: Callable[[], bool], what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + _SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start within {_SERVER_START_TIMEOUT_S} s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


# ------------------------------------------------------------------------------------------------ servers
@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install -y --no-install-recommends redis-server)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def ping() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        _wait(ping, "redis-server", proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str
    client: Any  # boto3 S3 client

    def put(self, key: str, data: bytes) -> str:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        return f"s3://{self.bucket}/{key}"

    def config(self):
        from services.media import S3Config

        return S3Config(endpoint_url=self.endpoint_url, access_key_id="test", secret_access_key="test")


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    binary = Path(sys.executable).with_name("moto_server")
    if not binary.exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    proc = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    try:
        _wait(lambda: urllib.request.urlopen(endpoint, timeout=0.5).status == 200, "moto_server", proc)
        client = boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
        )
        client.create_bucket(Bucket="media")
        yield S3Server(endpoint, "media", client)
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def s3_creds() -> Iterator[None]:
    """The ``s3`` server's credentials in the environment, for code that reads them from there, for one module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "test")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "test")
        yield


# ------------------------------------------------------------------------------------------------ MLflow
_MLFLOW_START_TIMEOUT_S = 90.0


@pytest.fixture(scope="session", autouse=True)
def _mlflow_local_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Keep the suite's MLflow runs out of the developer's store: the default tracking URI (``MLFLOW_TRACKING_URI``)
    is a session-private sqlite store. Tests that talk to a server pass its URI explicitly."""
    directory = tmp_path_factory.mktemp("mlflow-local")
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield uri
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def mlflow_server(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on a free loopback port: sqlite backend in a tmp dir, artifacts proxied to
    ``s3://<bucket>/mlflow`` on the ``s3`` fixture's moto server. Yields the tracking URI."""
    binary = Path(sys.executable).with_name("mlflow")
    if not binary.exists():
        pytest.skip("mlflow is not installed (pip install -e '.[train]')")
    port = free_port()
    workdir = tmp_path_factory.mktemp("mlflow-server")
    env = {
        **os.environ,
        "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        # no background job runner: MLflow 3 otherwise forks several huey consumers the tests never use
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    log_file = open(workdir / "server.log", "wb")
    proc = subprocess.Popen(
        [
            str(binary),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{workdir / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{s3.bucket}/mlflow",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=workdir,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + _MLFLOW_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                tail = (workdir / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"mlflow server exited with status {proc.returncode}: {tail}")
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=1).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer /health within {_MLFLOW_START_TIMEOUT_S} s")
            time.sleep(0.2)
        yield uri
    finally:
        _stop(proc)
        log_file.close()


# ------------------------------------------------------------------------------------------------ event loops
class BackgroundLoop:
    """An event loop on a daemon thread: grpc.aio servers run on it, tests talk to them with synchronous gRPC."""

    def __init__(self) -> None:
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-background-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60.0) -> Any:
        """Run ``coro`` on the loop and wait for its result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="session")
def new_background_loop() -> type[BackgroundLoop]:
    """The class, for fixtures that own a loop's lifetime (test modules cannot import conftest)."""
    return BackgroundLoop


@pytest.fixture(scope="module")
def loop() -> Iterator[BackgroundLoop]:
    """One background loop per test module."""
    lp = BackgroundLoop()
    yield lp
    lp.close()


# ------------------------------------------------------------------------------------------------ Ray head
@dataclass
class RayHead:
    """A local Ray head started by ``ray start`` in a process of its own (its own session), for ``ray.init(address)``.

    Why not ``ray.init()`` in the test process: that forks Ray's GCS from a process full of gRPC, torch and event
    loop threads, and Ray runs Python in the forked child before exec. Seen in CI: the GCS never started and
    ``ray.init`` timed out waiting for its port file.
    """

    address: str
    proc: subprocess.Popen
    temp: str

    @classmethod
    def start(cls, num_cpus: int, resources: dict[str, float] | None = None, timeout: float = 120) -> RayHead:
        import json
        import tempfile

        ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
        temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
        port = free_port()
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        cmd = [ray, "start", "--head", "--block", "--include-dashboard=false", f"--port={port}"]
        cmd += [f"--num-cpus={num_cpus}", f"--temp-dir={temp}", f"--resources={json.dumps(resources or {})}"]
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        head = cls(f"127.0.0.1:{port}", proc, temp)
        deadline = time.monotonic() + timeout
        while True:  # up once the GCS answers on its port
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
                shutil.rmtree(temp, ignore_errors=True)
                pytest.fail(f"ray start exited with {proc.returncode}: {err}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                head.stop()
                pytest.fail(f"the Ray head did not listen on {port} in {timeout:.0f} s")
            time.sleep(0.3)
        return head

    def stop(self) -> None:
        import contextlib
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)  # the head and every process it started (its own session)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # ray start --block can leave the GCS behind on SIGTERM
        self.proc.wait(10)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head_factory() -> type[RayHead]:
    """:class:`RayHead` for module fixtures that need a Ray cluster (test modules cannot import conftest)."""
    return RayHead
