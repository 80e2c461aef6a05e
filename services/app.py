"""The platform on Ray Serve: one Serve *application* per service, all reached through Serve's gRPC proxy.

=================  ==================  ==============================================  ============================
application        deployment          RPCs (methods named like them)                  wraps
=================  ==================  ==============================================  ============================
``vision``         ``VisionEncoder``   EncodeImages, EncodeVideo                       VisionEncoderServicer
``audio``          ``AudioEncoder``    EncodeAudio                                     AudioEncoderServicer
``llm``            ``LLM``             Generate (stream), CountTokens                  LLMServicer
``tts``            ``TTS``             Synthesize (stream), ListVoices                 TTSServicer
``omni``           ``OmniGateway``     Chat (stream), GetSession, DeleteSession,       OmniServicer + OmniGateway
                                       ListModelVersions
=================  ==================  ==============================================  ============================

Every application also answers ``grpc.health.v1.Health/Check`` and ``Watch`` (SERVING once its models are loaded).
Clients pick the application with the metadata ``("application", name)``; the proxy's own
``ray.serve.RayServeAPIService`` (``Healthz``, ``ListApplications``) needs none. Each application scales and
redeploys on its own: the gateway reaches the other four through the same proxy (``GrpcBackends`` with per-service
``application`` metadata), so errors stay gRPC statuses and streams stream.

Build and run (``ola serve`` does this)::

    config = load_config("services/configs/local.yaml")    # PlatformConfig: validated before anything starts
    deploy(config)                                          # serve.start(gRPC options) + one app per service

Replicas build their servicer once in ``__init__``. The model versions travel as Serve ``user_config``
(``{"models": RegistryConfig}``), which Serve hands to ``reconfigure`` right after ``__init__`` and on every change:
it loads the default version (before the replica takes requests; a version that cannot load fails the deploy),
keeps versions already loaded and swaps the servicer's registry. Redeploying with only new versions, replica counts
or concurrency limits updates the running replicas in place, without restarts.

How errors travel (Serve 2.x): a deployment method gets Serve's ``grpc_context``
(:class:`ray.serve.grpc_util.RayServegRPCContext`: ``set_code`` / ``set_details`` / ``set_trailing_metadata``). The
servicers call ``context.abort(code, details)`` with the ``ola-error-detail-bin`` trailer, so they get a
:class:`services.serve_context.ServeContext`, whose ``abort`` records the status on Serve's context and raises; the
deployment method then ends the call. Serve's proxy applies the context a replica sends with each *message*: a unary
call returns an empty response, and a stream yields one last message that carries the status (an empty
``GenerateResponse`` / ``SynthesizeResponse``; a ``warning`` event with the ErrorDetail for ``Chat``) before the
non-OK status reaches the client. Raising instead would keep the code but lose the trailing metadata.

Proto module names: the generated stubs register their messages as ``ola.<svc>.v1.<x>_pb2`` (their proto path), and
Serve's proxy pickles request messages to send them to replicas; :func:`install_proto_aliases` makes those names
importable (aliases of ``services.gen.ola...``) in every process that imports this module, which is why the proxy's
servicer functions (:data:`SERVICER_FUNCTIONS`) live here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import json
import logging
import os
import pkgutil
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve

from services.gen.ola.audio.v1 import audio_pb2, audio_pb2_grpc
from services.gen.ola.common.v1 import errors_pb2
from services.gen.ola.llm.v1 import llm_pb2, llm_pb2_grpc
from services.gen.ola.omni.v1 import omni_pb2, omni_pb2_grpc
from services.gen.ola.tts.v1 import tts_pb2, tts_pb2_grpc
from services.gen.ola.vision.v1 import vision_pb2, vision_pb2_grpc
from services.serve_context import (
    HEALTH_WATCH_POLL_S,
    ServeContext,
    call_stream,
    call_unary,
    health_status,
    watch_health,
)

if TYPE_CHECKING:
    from ray.serve.deployment import Application
    from ray.serve.handle import DeploymentHandle

    from services.serve_config import PlatformConfig

log = logging.getLogger(__name__)

APP_NAMES: dict[str, str] = {"vision": "vision", "audio": "audio", "llm": "llm", "tts": "tts", "gateway": "omni"}
"""Serve application name of each service (the gateway's is ``omni``, what clients address)."""

DEPLOYMENT_NAMES: dict[str, str] = {
    "vision": "VisionEncoder",
    "audio": "AudioEncoder",
    "llm": "LLM",
    "tts": "TTS",
    "gateway": "OmniGateway",
}

# Fields of a service section that are Serve deployment options, not arguments of the replica's constructor: changing
# them never needs new replicas (Serve rescales / updates in place) except ray_actor_options, which Serve checks itself.
_DEPLOYMENT_FIELDS = {
    "num_replicas",
    "autoscaling",
    "max_ongoing_requests",
    "ray_actor_options",
    "graceful_shutdown_timeout_s",
}
# The shared config sections each service's replicas read.
_SHARED_SECTIONS = {
    "vision": ("cache", "object_store", "limits", "metrics"),
    "audio": ("cache", "object_store", "limits", "metrics"),
    "llm": ("metrics",),
    "tts": ("metrics",),
    "gateway": ("sessions", "rollout", "limits", "proxy", "metrics"),
}


# ------------------------------------------------------------------------------------------------ proto aliases
def install_proto_aliases() -> None:
    """Make the generated messages' registered module names (``ola.omni.v1.omni_pb2``) importable.

    They are aliases of the modules under ``services.gen``; pickle (Serve's proxy -> replica hop) finds the classes
    through them. Idempotent; a different module already under one of the names is left alone (and logged).
    """
    from services import gen

    prefix = gen.__name__ + "."
    for info in pkgutil.walk_packages(gen.__path__, prefix):
        if info.name.endswith("_grpc"):
            continue
        module = importlib.import_module(info.name)
        alias = info.name.removeprefix(prefix)
        existing = sys.modules.setdefault(alias, module)
        if existing is not module:
            log.warning("module %s exists and is not %s; Serve cannot pickle its messages", alias, info.name)


install_proto_aliases()


# Serve's gRPC proxy imports these by name (from this module, so the aliases above exist in the proxy too).
add_vision_service = vision_pb2_grpc.add_VisionEncoderServiceServicer_to_server
add_audio_service = audio_pb2_grpc.add_AudioEncoderServiceServicer_to_server
add_llm_service = llm_pb2_grpc.add_LLMServiceServicer_to_server
add_tts_service = tts_pb2_grpc.add_TTSServiceServicer_to_server
add_omni_service = omni_pb2_grpc.add_OmniServiceServicer_to_server
add_health_service = health_pb2_grpc.add_HealthServicer_to_server

SERVICER_FUNCTIONS: list[str] = [
    f"{__name__}.{fn}"
    for fn in (
        "add_vision_service",
        "add_audio_service",
        "add_llm_service",
        "add_tts_service",
        "add_omni_service",
        "add_health_service",
    )
]
"""What Serve's gRPC proxy routes (``gRPCOptions.grpc_servicer_functions``): the five services and grpc.health.v1."""


# ------------------------------------------------------------------------------------------------ replicas
_EXPORTER: dict[str, Any] = {}


def _start_metrics(port: int | None, addr: str) -> int | None:
    """One Prometheus exporter per replica process: ``port``, or a free port when it is taken (logged)."""
    if port is None:
        return None
    if "port" not in _EXPORTER:
        from services.metrics import start_exporter

        try:
            server, _ = start_exporter(port, addr)
        except OSError:
            server, _ = start_exporter(0, addr)
            log.warning("metrics port %d is taken here; this replica exports on %d", port, server.server_port)
        _EXPORTER.update(port=server.server_port, server=server)
    return _EXPORTER["port"]


class _ServiceDeployment:
    """What the five deployments share: config, metrics, health, model versions as ``user_config``."""

    SERVICE: str = ""

    def _setup_common(self, args: Mapping[str, Any]) -> PlatformConfig:
        from services.serve_config import PlatformConfig

        config = PlatformConfig.model_validate(dict(args))
        self.metrics_port = _start_metrics(config.metrics.port, config.metrics.addr)
        return config

    def _serving(self) -> bool:
        return True

    async def Check(self, request: Any, grpc_context: Any = None) -> Any:
        """grpc.health.v1 ``Check`` of this application (addressed with its ``application`` metadata)."""
        return health_pb2.HealthCheckResponse(status=health_status(self._serving()))

    async def Watch(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        """grpc.health.v1 ``Watch``: the status now, then each change, until the client goes away."""
        async for response in watch_health(self._serving, HEALTH_WATCH_POLL_S):
            yield response

    def check_health(self) -> None:
        """Serve's replica health check: a replica whose default model version is gone is restarted."""
        if not self._serving():
            raise RuntimeError(f"{self.SERVICE}: not serving")

    def replica_info(self) -> dict[str, Any]:
        """Identity and state of this replica (for operators and tests; through a deployment handle)."""
        import ray

        ctx = serve.get_replica_context()
        return {
            "service": self.SERVICE,
            "replica_id": ctx.replica_id.unique_id,
            "actor_id": ray.get_runtime_context().get_actor_id(),
            "pid": os.getpid(),
            "model_versions": self._versions(),
            "loaded_versions": self._loaded_versions(),
            "metrics_port": self.metrics_port,
            **self._stats(),
        }

    def _versions(self) -> list[str]:
        return []

    def _loaded_versions(self) -> list[str]:
        return self._versions()

    def _stats(self) -> dict[str, Any]:
        return {}


class _ModelDeployment(_ServiceDeployment):
    """A deployment around a model servicer (``registry`` attribute): loads versions, swaps them on reconfigure.

    ``__init__`` builds the servicer around an empty (nothing loaded) registry; Serve calls :meth:`reconfigure` with
    the ``user_config`` right after it, before the replica takes requests, and that loads the default version.
    """

    servicer: Any
    spec: Any

    async def reconfigure(self, user_config: Mapping[str, Any]) -> None:
        """Switch to the model versions of ``user_config["models"]`` without a restart.

        Versions already loaded stay loaded; the new default loads before the registry is swapped, so requests never
        wait on a load, and so does every other new version (a canary's challenger is warm before it takes traffic;
        one that fails to load is logged and retried on its first request, the default keeps serving). Removed
        versions are freed. A version name always means the same weights: reusing a name for another source is an
        error.
        """
        from services.errors import ServiceError
        from services.registry import ModelRegistry, RegistryConfig

        models = RegistryConfig.model_validate((user_config or {}).get("models") or {})
        wanted = self.spec.registry(models)
        old: ModelRegistry = self.servicer.registry
        if wanted == old.config and old.is_loaded(old.default_version):
            return
        changed = [
            n for n in wanted.versions if n in old.config.versions and wanted.versions[n] != old.config.versions[n]
        ]
        if changed and any(old.is_loaded(n) for n in changed):
            raise ValueError(
                f"model versions {changed} already name other weights; a version name is immutable, use a new one"
            )
        new = ModelRegistry(wanted)
        for name in wanted.versions:
            if old.is_loaded(name) and name not in changed:
                new._loaded[name] = old.get(name)  # the same weights: share, do not load twice
        await asyncio.to_thread(new.get, new.default_version)  # off the event loop, before anyone uses it
        for name in new.versions:
            if not new.is_loaded(name):
                try:
                    await asyncio.to_thread(new.get, name)
                except ServiceError as exc:
                    log.error("%s: version %s did not load (retried on first use): %s", self.SERVICE, name, exc)
        self.servicer.registry = new
        await self.servicer.warmup()  # loaded already: marks the service SERVING
        log.info("%s: model versions %s (default %s)", self.SERVICE, new.versions, new.default_version)
        if set(old.config.versions) - set(wanted.versions):
            self._release()

    def _release(self) -> None:
        """Free the memory of removed versions (the old registry held their weights; nothing refers to it now)."""
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _serving(self) -> bool:
        return bool(self.servicer.serving) and self.servicer.registry.is_loaded(self.servicer.registry.default_version)

    def _versions(self) -> list[str]:
        return self.servicer.registry.versions

    def _loaded_versions(self) -> list[str]:
        registry = self.servicer.registry
        return [name for name in registry.versions if registry.is_loaded(name)]


@serve.deployment(name=DEPLOYMENT_NAMES["vision"])
class VisionEncoderDeployment(_ModelDeployment):
    """``ola.vision.v1.VisionEncoderService`` on Serve."""

    SERVICE = "vision"

    async def __init__(self, args: Mapping[str, Any]) -> None:
        from services.vision import VisionEncoderServicer, VisionServiceConfig

        config = self._setup_common(args)
        self.spec = config.vision
        self.servicer = VisionEncoderServicer(
            VisionServiceConfig(
                cache=config.cache.resolve(),
                media=config.media_config(),
                max_images=config.vision.max_images,
                encode_threads=config.vision.encode_threads,
                batch_images=config.vision.batch_images,
            )
        )

    async def EncodeImages(self, request: Any, grpc_context: Any = None) -> Any:
        ctx = ServeContext(grpc_context)
        return await call_unary(self.servicer.EncodeImages, request, ctx, vision_pb2.EncodeImagesResponse)

    async def EncodeVideo(self, request: Any, grpc_context: Any = None) -> Any:
        ctx = ServeContext(grpc_context)
        return await call_unary(self.servicer.EncodeVideo, request, ctx, vision_pb2.EncodeVideoResponse)


@serve.deployment(name=DEPLOYMENT_NAMES["audio"])
class AudioEncoderDeployment(_ModelDeployment):
    """``ola.audio.v1.AudioEncoderService`` on Serve."""

    SERVICE = "audio"

    async def __init__(self, args: Mapping[str, Any]) -> None:
        from services.audio import AudioEncoderServicer, AudioServiceConfig

        config = self._setup_common(args)
        self.spec = config.audio
        self.servicer = AudioEncoderServicer(
            AudioServiceConfig(
                cache=config.cache.resolve(), media=config.media_config(), encode_threads=config.audio.encode_threads
            )
        )

    async def EncodeAudio(self, request: Any, grpc_context: Any = None) -> Any:
        ctx = ServeContext(grpc_context)
        return await call_unary(self.servicer.EncodeAudio, request, ctx, audio_pb2.EncodeAudioResponse)


@serve.deployment(name=DEPLOYMENT_NAMES["llm"])
class LLMDeployment(_ModelDeployment):
    """``ola.llm.v1.LLMService`` on Serve: one continuously batched engine per model version and replica."""

    SERVICE = "llm"

    async def __init__(self, args: Mapping[str, Any]) -> None:
        from services.llm import LLMServiceConfig, LLMServicer

        config = self._setup_common(args)
        self.spec = config.llm
        self.servicer = LLMServicer(
            LLMServiceConfig(
                max_batch=config.llm.max_batch,
                default_max_new_tokens=config.llm.default_max_new_tokens,
                max_blocks=config.llm.max_blocks,
                stream_interval_ms=config.llm.stream_interval_ms,
            )
        )

    async def Generate(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        ctx = ServeContext(grpc_context)
        async for message in call_stream(
            self.servicer.Generate, request, ctx, lambda last, d: llm_pb2.GenerateResponse()
        ):
            yield message

    async def CountTokens(self, request: Any, grpc_context: Any = None) -> Any:
        ctx = ServeContext(grpc_context)
        return await call_unary(self.servicer.CountTokens, request, ctx, llm_pb2.CountTokensResponse)

    def _release(self) -> None:
        """Drop the engines (model, KV cache) of removed versions too; a busy one once its requests have ended."""
        busy = self.servicer.drop_stale_engines()
        super()._release()
        task = getattr(self, "_release_task", None)
        if busy and (task is None or task.done()):
            self._release_task = asyncio.get_running_loop().create_task(self._release_when_idle())

    async def _release_when_idle(self) -> None:
        while self.servicer.drop_stale_engines():
            await asyncio.sleep(0.5)
        super()._release()

    def _stats(self) -> dict[str, Any]:
        engines = [self.servicer.engine(v) for v in self._versions() if self.servicer.registry.is_loaded(v)]
        engines = [e for e in engines if e is not None]
        return {
            "running_requests": sum(e.num_running for e in engines),
            "waiting_requests": sum(e.num_waiting for e in engines),
        }

    async def __del__(self) -> None:
        servicer = getattr(self, "servicer", None)
        if servicer is not None:
            await servicer.close()


@serve.deployment(name=DEPLOYMENT_NAMES["tts"])
class TTSDeployment(_ServiceDeployment):
    """``ola.tts.v1.TTSService`` on Serve. The servicer is synchronous: it runs in worker threads."""

    SERVICE = "tts"

    async def __init__(self, args: Mapping[str, Any]) -> None:
        from services.tts.servicer import TTSServicer

        config = self._setup_common(args)
        self.servicer = await asyncio.to_thread(TTSServicer.from_config, config.tts.tts_config())

    async def reconfigure(self, user_config: Mapping[str, Any]) -> None:
        """Serve exactly the platform's model versions (a request for another one: NOT_FOUND)."""
        from services.registry import RegistryConfig

        models = RegistryConfig.model_validate((user_config or {}).get("models") or {})
        self.servicer.model_versions = frozenset(models.versions)

    def _serving(self) -> bool:
        return self.servicer.backend is not None

    def _versions(self) -> list[str]:
        return sorted(self.servicer.model_versions or ())

    async def Synthesize(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        ctx = ServeContext(grpc_context)
        async for message in call_stream(self._synthesize, request, ctx, lambda last, d: tts_pb2.SynthesizeResponse()):
            yield message

    async def _synthesize(self, request: Any, ctx: ServeContext) -> AsyncIterator[Any]:
        stream = self.servicer.Synthesize(request, ctx)
        done = object()
        try:
            while (chunk := await asyncio.to_thread(next, stream, done)) is not done:
                yield chunk
        finally:
            await asyncio.to_thread(stream.close)  # stops the backend's synthesis of a cancelled call

    async def ListVoices(self, request: Any, grpc_context: Any = None) -> Any:
        async def list_voices(req: Any, ctx: ServeContext) -> Any:
            return await asyncio.to_thread(self.servicer.ListVoices, req, ctx)

        return await call_unary(list_voices, request, ServeContext(grpc_context), tts_pb2.ListVoicesResponse)


@serve.deployment(name=DEPLOYMENT_NAMES["gateway"])
class OmniGatewayDeployment(_ServiceDeployment):
    """``ola.omni.v1.OmniService`` on Serve: the gateway calls the other applications through the gRPC proxy."""

    SERVICE = "gateway"

    async def __init__(self, args: Mapping[str, Any]) -> None:
        from services.gateway import GatewayConfig, GrpcBackends, OmniGateway, OmniServicer
        from services.sessions import make_session_store

        config = self._setup_common(args)
        spec = config.gateway
        self.spec = spec
        self.max_request_bytes = config.limits.max_request_bytes
        address = config.backend_address()
        self.backends = GrpcBackends(
            address,
            address,
            address,
            address,
            metadata={name: (("application", APP_NAMES[name]),) for name in ("vision", "audio", "llm", "tts")},
        )
        gateway_config = GatewayConfig(
            session_ttl_s=config.sessions.ttl_s,
            max_history_turns=spec.max_history_turns,
            sentence_min_chars=spec.sentence_min_chars,
            speech_sample_rate_hz=spec.speech_sample_rate_hz,
        )
        sessions = make_session_store(config.sessions.url(), config.sessions.ttl_s)
        from services.metrics import get_metrics

        router = recorder = None
        if config.rollout.model_name:  # canary: route new sessions by the rollout in Redis, record outcomes
            from services.rollout import RolloutRecorder, RolloutRouter

            rollout, url = config.rollout, config.rollout.url()
            if not url:
                raise ValueError(f"rollout: the Redis URL env var {rollout.redis_url_env!r} is not set in the replica")
            router = RolloutRouter(
                url,
                rollout.model_name,
                lambda: gateway_config.default_model_version,
                prefix=rollout.prefix,
                refresh_s=rollout.refresh_s,
            )
            recorder = RolloutRecorder(url, prefix=rollout.prefix)
        self.gateway = OmniGateway(
            self.backends, gateway_config, sessions, router=router, metrics=get_metrics(), recorder=recorder
        )
        self.servicer = OmniServicer(self.gateway)

    async def reconfigure(self, user_config: Mapping[str, Any]) -> None:
        """Pin new sessions to the platform's default version; accept only its versions."""
        from services.registry import RegistryConfig

        models = RegistryConfig.model_validate((user_config or {}).get("models") or {})
        self.gateway.config.default_model_version = models.default_version or ""
        self.gateway.config.known_versions = list(models.versions)

    def _versions(self) -> list[str]:
        return list(self.gateway.config.known_versions)

    def _context(self, grpc_context: Any) -> ServeContext:
        return ServeContext(grpc_context, timeout_s=self.spec.request_timeout_s)

    async def Chat(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        ctx = self._context(grpc_context)

        def carrier(last: Any, detail: Any) -> Any:
            seq = last.sequence + 1 if last is not None else 0
            return omni_pb2.ChatResponse(sequence=seq, warning=omni_pb2.ChatWarning(detail=detail))

        async for message in call_stream(self._chat, request, ctx, carrier):
            yield message

    async def _chat(self, request: Any, ctx: ServeContext) -> AsyncIterator[Any]:
        from services.wire import error_detail, error_metadata

        size = request.ByteSize()
        if size > self.max_request_bytes:
            detail = error_detail(
                errors_pb2.ERROR_REASON_PAYLOAD_TOO_LARGE,
                f"the request is {size} bytes, over the limit of {self.max_request_bytes}; send media by s3:// URI",
                value=size,
                limit=self.max_request_bytes,
                unit="bytes",
            )
            ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, detail.message, error_metadata(detail))
        async for event in self.servicer.Chat(request, ctx):
            yield event

    async def GetSession(self, request: Any, grpc_context: Any = None) -> Any:
        return await call_unary(
            self.servicer.GetSession, request, self._context(grpc_context), omni_pb2.GetSessionResponse
        )

    async def DeleteSession(self, request: Any, grpc_context: Any = None) -> Any:
        return await call_unary(
            self.servicer.DeleteSession, request, self._context(grpc_context), omni_pb2.DeleteSessionResponse
        )

    async def ListModelVersions(self, request: Any, grpc_context: Any = None) -> Any:
        response = await call_unary(
            self.servicer.ListModelVersions, request, self._context(grpc_context), omni_pb2.ListModelVersionsResponse
        )
        response.max_request_bytes = self.max_request_bytes
        return response

    async def __del__(self) -> None:
        gateway = getattr(self, "gateway", None)
        for part in (getattr(gateway, "router", None), getattr(gateway, "recorder", None)):
            if hasattr(part, "close"):  # the rollout router / recorder: stop their threads, flush the last samples
                await asyncio.to_thread(part.close)
        backends = getattr(self, "backends", None)
        if backends is not None:
            await backends.close()


_DEPLOYMENTS = {
    "vision": VisionEncoderDeployment,
    "audio": AudioEncoderDeployment,
    "llm": LLMDeployment,
    "tts": TTSDeployment,
    "gateway": OmniGatewayDeployment,
}


# ------------------------------------------------------------------------------------------------ builders
def app_args(config: PlatformConfig, service: str) -> dict[str, Any]:
    """What ``service``'s replicas are constructed from: its own settings and the shared sections it reads.

    Replica counts, concurrency and model versions are left out (deployment options and ``user_config``), so changing
    them does not change the replicas' identity.
    """
    data = config.to_plain()
    args = {service: {k: v for k, v in data[service].items() if k not in _DEPLOYMENT_FIELDS}}
    for section in _SHARED_SECTIONS[service]:
        args[section] = data[section]
    return args


_CODE_ROOTS = ("services", "ola_model")
_CODE: dict[str, str] = {}


def _code_fingerprint() -> str:
    """A hash of the serving code (``services/``, ``ola_model/`` sources): new code means new replicas."""
    if "code" not in _CODE:
        root = Path(__file__).resolve().parent.parent
        digest = hashlib.sha256()
        for top in _CODE_ROOTS:
            for path in sorted((root / top).rglob("*.py")):
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
        _CODE["code"] = digest.hexdigest()
    return _CODE["code"]


def _deployment_version(service: str, args: Mapping[str, Any]) -> str:
    payload = json.dumps({"service": service, "args": args, "code": _code_fingerprint()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_app(config: PlatformConfig, service: str, pin_version: bool = True) -> Application:
    """The Serve application of one service (``vision``, ``audio``, ``llm``, ``tts``, ``gateway``).

    ``pin_version``: fix the deployment's version by what its replicas are built from (see below); config-file
    deploys leave it to Serve, which versions an application by its import path and arguments.
    """
    if service not in _DEPLOYMENTS:
        raise ValueError(f"unknown service {service!r}; one of {sorted(_DEPLOYMENTS)}")
    spec = config.service(service)  # type: ignore[arg-type]
    args = app_args(config, service)
    deployment = _DEPLOYMENTS[service].options(
        **spec.deployment_options(), user_config={"models": config.models.model_dump(mode="json")}
    )
    # A version fixed by what the replicas are built from: redeploying with other replica counts, limits or model
    # versions updates the running replicas in place (Serve's lightweight update) instead of replacing them.
    if pin_version:
        try:
            deployment = deployment.options(version=_deployment_version(service, args), _internal=True)
        except (TypeError, ValueError) as exc:  # a Serve without the (internal) option: every deploy restarts
            log.warning("cannot pin the deployment version (%s); redeploys restart %s", exc, service)
    return deployment.bind(args)


def build_apps(config: PlatformConfig | Mapping[str, Any]) -> dict[str, Application]:
    """The five Serve applications by application name (``vision``, ``audio``, ``llm``, ``tts``, ``omni``).

    ``config`` is validated first (:class:`~services.serve_config.PlatformConfig`), so a bad config fails here,
    before Serve or any model starts.
    """
    from services.serve_config import PlatformConfig

    if not isinstance(config, PlatformConfig):
        config = PlatformConfig.from_mapping(config)
    return {APP_NAMES[service]: build_app(config, service) for service in _DEPLOYMENTS}


def app_builder(args: Mapping[str, Any]) -> Application:
    """The import-path builder of config-file deploys (``import_path: services.app:app_builder``).

    ``args`` is ``{"service": <vision|audio|llm|tts|gateway>, ...}`` plus that service's sections (what
    :func:`serve_config_document` writes); it is validated here, in Serve's build step, before any replica starts.
    (Serve converts builder arguments itself only for a class annotation; this module keeps its imports light for the
    proxy, so it validates them explicitly.)
    """
    from services.serve_config import PlatformConfig

    data = dict(args)
    service = data.pop("service", None)
    if service not in _DEPLOYMENTS:
        raise ValueError(f"args.service must be one of {sorted(_DEPLOYMENTS)}, got {service!r}")
    return build_app(PlatformConfig.from_mapping(data, f"application {APP_NAMES[service]!r} args"), service, False)


def serve_config_document(config: PlatformConfig) -> dict[str, Any]:
    """The platform as a Serve config file (``ServeDeploySchema``: ``serve deploy``, KubeRay ``serveConfigV2``).

    One application per service with its own arguments, and the deployment options (replicas or autoscaling,
    concurrency, resources, ``user_config`` with the model versions) as overrides, so changing them updates the
    running replicas without rebuilding the application.
    """
    applications = []
    models = {"models": config.models.model_dump(mode="json")}
    for service, deployment in DEPLOYMENT_NAMES.items():
        options = config.service(service).deployment_options()  # type: ignore[arg-type]
        name = APP_NAMES[service]
        applications.append(
            {
                "name": name,
                "route_prefix": f"/{name}",
                "import_path": f"{__name__}:app_builder",
                "args": {"service": service, **app_args(config, service)},
                "deployments": [{"name": deployment, **options, "user_config": models}],
            }
        )
    grpc_options: dict[str, Any] = {"port": config.proxy.grpc_port, "grpc_servicer_functions": SERVICER_FUNCTIONS}
    if config.proxy.request_timeout_s is not None:
        grpc_options["request_timeout_s"] = config.proxy.request_timeout_s
    return {
        "http_options": {"host": config.proxy.http_host, "port": config.proxy.http_port},
        "grpc_options": grpc_options,
        "applications": applications,
    }


def start_serve(config: PlatformConfig) -> None:
    """Start Serve (if it is not running) with the platform's gRPC proxy: every service plus grpc.health.v1."""
    from ray.serve.config import gRPCOptions

    serve.start(
        http_options={"host": config.proxy.http_host, "port": config.proxy.http_port},
        grpc_options=gRPCOptions(
            port=config.proxy.grpc_port,
            grpc_servicer_functions=SERVICER_FUNCTIONS,
            request_timeout_s=config.proxy.request_timeout_s,
        ),
    )


def deploy(
    config: PlatformConfig | Mapping[str, Any], apps: Iterable[str] | None = None
) -> dict[str, DeploymentHandle]:
    """Start Serve and run the applications (all, or those named in ``apps``), each under its own name.

    Needs a connected Ray (``ray.init``). Returns when every application is RUNNING; the proxy learns the routes a
    moment later (:meth:`services.client.OlaClient.wait_ready`). Each app gets the route prefix ``/<name>``: Serve's
    proxies, gRPC included, only route applications that have one.
    """
    from ray.serve import RunTarget

    from services.serve_config import PlatformConfig

    if not isinstance(config, PlatformConfig):
        config = PlatformConfig.from_mapping(config)
    built = build_apps(config)
    names = list(built) if apps is None else list(apps)
    unknown = sorted(set(names) - set(built))
    if unknown:
        raise ValueError(f"unknown applications {unknown}; the platform's are {list(built)}")
    start_serve(config)
    targets = [RunTarget(target=built[name], name=name, route_prefix=f"/{name}") for name in names]
    handles = serve.run_many(targets)
    return dict(zip(names, handles, strict=True))


def shutdown() -> None:
    """Delete every application and stop Serve (replicas run their ``__del__`` clean-up)."""
    with contextlib.suppress(Exception):
        serve.shutdown()
