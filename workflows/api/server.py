"""The control-plane gRPC server: PipelineService and ModelService behind API-key auth, plus grpc.health.v1 and
reflection.

    ola api serve --port 50051 --redis-url redis://HOST:6379/0 [--ray-address http://HEAD:8265] --runs-root DIR

Without ``--ray-address`` runs are local processes on this host (:class:`~workflows.api.jobs.SubprocessJobBackend`,
their state under ``<runs root>/.jobs``). On start the server re-attaches to the runs Redis says are still active;
on SIGTERM it stops accepting calls, lets running calls finish for a grace period, and leaves the jobs running (a
restarted server picks them up again).

With ``--deploy serve|kuberay`` (:class:`workflows.api.model_service.DeployConfig` in ``ServerConfig.models``) the
rollout controllers this server runs are :class:`workflows.lifecycle.deploy.DeployingController` objects: a challenger
is downloaded from the registry and brought up before it takes traffic, and removed after a rollback or abort; after
a promotion the previous champion is removed once its sessions had time to finish.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.gen.ola.models.v1 import models_pb2, models_pb2_grpc
from services.gen.ola.pipeline.v1 import pipeline_pb2, pipeline_pb2_grpc
from workflows.api.auth import DEFAULT_PREFIX, ApiKeyInterceptor, ApiKeyStore
from workflows.api.jobs import JobBackend, RayJobBackend, SubprocessJobBackend, default_pipeline_command
from workflows.api.pipeline_service import PipelineServicer
from workflows.api.runs import ManagerConfig, RunManager, RunStore

log = logging.getLogger(__name__)

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SERVICE_NAMES = (
    pipeline_pb2.DESCRIPTOR.services_by_name["PipelineService"].full_name,
    models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
)


@dataclass
class ServerConfig:
    """Everything ``ola api serve`` is configured with.

    Attributes:
        redis_url: the Redis of API keys, runs and rollouts.
        runs_root: where runs write (``<runs_root>/<run id>``); on a cluster a volume shared with the jobs.
        port: the port to listen on (0: any free port; :attr:`ApiServer.port` tells which).
        host: the address to bind.
        ray_address: Ray dashboard address for Ray Jobs; None: local processes.
        config_dirs: directories training configs may come from (default: the repo's workflows/configs).
        pipeline_command: the job's command before its arguments (default: ``python -m ola_model.cli pipeline run``).
        job_env: environment of every job.
        job_cwd: working directory of the jobs (default: this process's).
        poll_interval_s: how often run monitors look at their jobs.
        prefix: Redis key prefix of keys and runs.
        pepper: the API-key pepper (``OLA_API_KEY_PEPPER``); empty: none.
        models: ModelService configuration (:class:`workflows.api.model_service.ModelServiceConfig`); None leaves
            the service out (its calls answer UNIMPLEMENTED).
    """

    redis_url: str
    runs_root: Path
    port: int = 50051
    host: str = "127.0.0.1"
    ray_address: str | None = None
    config_dirs: list[Path] = field(default_factory=lambda: [REPO_CONFIGS])
    pipeline_command: list[str] = field(default_factory=default_pipeline_command)
    job_env: dict[str, str] = field(default_factory=dict)
    job_cwd: str | None = None
    poll_interval_s: float = 1.0
    prefix: str = DEFAULT_PREFIX
    pepper: str = ""
    models: Any = None


def make_backend(config: ServerConfig) -> JobBackend:
    """Ray Jobs when a Ray address is configured, local processes otherwise."""
    if config.ray_address:
        return RayJobBackend(config.ray_address, cwd=config.job_cwd)
    return SubprocessJobBackend(Path(config.runs_root) / ".jobs", cwd=config.job_cwd)


class ApiServer:
    """The running server: ``await start()``, then ``await stop()`` (or ``await wait()``)."""

    def __init__(self, config: ServerConfig, backend: JobBackend | None = None) -> None:
        self.config = config
        self.redis = aioredis.Redis.from_url(config.redis_url)
        self.keys = ApiKeyStore(self.redis, prefix=config.prefix, pepper=config.pepper)
        self.store = RunStore(self.redis, prefix=config.prefix)
        self.manager = RunManager(
            self.store,
            backend or make_backend(config),
            ManagerConfig(
                runs_root=Path(config.runs_root),
                config_dirs=list(config.config_dirs),
                pipeline_command=list(config.pipeline_command),
                job_env=dict(config.job_env),
                poll_interval_s=config.poll_interval_s,
            ),
        )
        self.server: grpc.aio.Server | None = None
        self.health: health.aio.HealthServicer | None = None
        self.port: int = 0
        self.model_servicer: Any = None

    async def start(self) -> int:
        """Bind, serve, re-attach active runs. Returns the port."""
        await self.redis.ping()
        Path(self.config.runs_root).mkdir(parents=True, exist_ok=True)
        self.server = grpc.aio.server(interceptors=[ApiKeyInterceptor(self.keys)])
        pipeline_pb2_grpc.add_PipelineServiceServicer_to_server(PipelineServicer(self.manager), self.server)
        if self.config.models is not None:
            from workflows.api.model_service import ModelServicer

            self.model_servicer = await asyncio.to_thread(
                ModelServicer.from_config, self.config.models, self.config.redis_url
            )
            models_pb2_grpc.add_ModelServiceServicer_to_server(self.model_servicer, self.server)
            self.model_servicer.start_ticking()
        services = list(SERVICE_NAMES if self.model_servicer is not None else SERVICE_NAMES[:1])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((*services, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {self.config.host}:{self.config.port}")
        await self.server.start()
        await self.manager.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        for name in ("", *services):
            await self.health.set(name, serving)
        log.info("control-plane API listening on %s:%d", self.config.host, self.port)
        return self.port

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop serving (calls in flight get ``grace`` seconds) and stop following runs; jobs keep running."""
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        await self.manager.close()
        if self.model_servicer is not None:
            await self.model_servicer.aclose()
        await self.redis.aclose()

    async def wait(self) -> None:
        """Block until the server terminates."""
        if self.server is not None:
            await self.server.wait_for_termination()


async def serve(config: ServerConfig, ready: asyncio.Event | None = None) -> None:
    """Run the server until SIGINT / SIGTERM."""
    import signal

    server = ApiServer(config)
    await server.start()
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await server.stop()
