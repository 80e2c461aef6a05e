"""The platform's one deployment config: every Serve application, model version, cache and port, validated up front.

:class:`PlatformConfig` (pydantic, unknown keys are errors) is what ``ola serve --config`` reads and what
:func:`services.app.build_apps` turns into Ray Serve applications. It is validated completely (field ranges, replica
counts, the default model version, the TTS backend, autoscaling bounds) before Ray starts or any model loads, and a
bad file fails with :class:`ConfigError` naming the file and every offending field (``vision.num_replicas: ...``).

Layout (see ``services/configs/local.yaml``, the embedded default, and ``production.yaml``)::

    models:          {versions: {name: {checkpoint: DIR | preset: tiny, seed}}, default_version}
    vision / audio / llm / tts / gateway:
      num_replicas | autoscaling: {min_replicas, max_replicas, target_ongoing_requests}
      max_ongoing_requests                    # Serve's per-replica concurrency limit
      ray_actor_options: {num_cpus, num_gpus, memory, resources: {vision_pool: 1}}
      ...service settings (max_images, max_batch, backend, session_ttl_s, ...)
    cache:           {redis_url | redis_url_env, ttl_s, max_bytes, ...}   # encoder outputs
    sessions:        {redis_url | redis_url_env, ttl_s}                   # gateway conversations
    rollout:         {model_name, redis_url | redis_url_env, refresh_s}   # canary routing of new sessions
    object_store:    {endpoint_url | endpoint_url_env, access_key_id_env, secret_access_key_env, region}
    limits:          {max_request_bytes, max_media_bytes}
    proxy:           {grpc_port, http_port, http_host, request_timeout_s}
    metrics:         {port}                                               # Prometheus exporter per replica

Secrets never appear in a config: Redis URLs with passwords and S3 credentials are named by environment variable
(``*_env``) and read inside each replica, so they are not stored in Serve's application state either.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.cache import CacheConfig
from services.media import MediaConfig, S3Config
from services.registry import RegistryConfig
from services.tts.registry import TTSConfig
from workflows.config_errors import format_errors

CONFIG_DIR = Path(__file__).with_name("configs")
LOCAL_CONFIG = CONFIG_DIR / "local.yaml"
PRODUCTION_CONFIG = CONFIG_DIR / "production.yaml"

ServiceName = Literal["vision", "audio", "llm", "tts", "gateway"]
SERVICES: tuple[ServiceName, ...] = ("vision", "audio", "llm", "tts", "gateway")


class ConfigError(ValueError):
    """A config that does not validate; the message names the source and every offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------------------ deployments
class AutoscalingSpec(_Strict):
    """Serve autoscaling of one application's deployment."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle (0: scale to zero).")
    max_replicas: int = Field(..., ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time; None: min_replicas.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Ongoing requests per replica to aim for.")
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is over max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(
                f"initial_replicas ({self.initial_replicas}) is outside [{self.min_replicas}, {self.max_replicas}]"
            )
        return self


class ActorOptions(_Strict):
    """Resources of each replica (Ray actor options). Custom ``resources`` pin replicas to pools of nodes."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica (fractions allowed).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica (fractions share a GPU).")
    memory: int | None = Field(None, gt=0, description="Bytes of memory reserved per replica.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom resources per replica, e.g. {vision_pool: 1} (a GPU node pool)."
    )

    @model_validator(mode="after")
    def _check_resources(self) -> ActorOptions:
        for name, amount in self.resources.items():
            if not name or name in ("CPU", "GPU", "memory"):
                raise ValueError(f"resources: {name!r} is not a custom resource name (use num_cpus / num_gpus)")
            if amount < 0:
                raise ValueError(f"resources.{name} must be >= 0, got {amount}")
        return self

    def ray_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory is not None:
            options["memory"] = self.memory
        if self.resources:
            options["resources"] = dict(self.resources)
        return options


class DeploymentSpec(_Strict):
    """How one service runs on Serve: replicas (fixed or autoscaled), concurrency and resources."""

    num_replicas: int | None = Field(None, ge=1, description="Fixed replica count (default 1); not with autoscaling.")
    autoscaling: AutoscalingSpec | None = None
    max_ongoing_requests: int = Field(8, ge=1, description="Requests one replica takes at once; more wait.")
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0, description="Time a stopping replica gets to finish.")

    @model_validator(mode="after")
    def _replicas(self) -> DeploymentSpec:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both")
        return self

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options``."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": self.ray_actor_options.ray_options(),
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.autoscaling is not None:
            a = self.autoscaling
            options["autoscaling_config"] = {
                "min_replicas": a.min_replicas,
                "max_replicas": a.max_replicas,
                "initial_replicas": a.initial_replicas,
                "target_ongoing_requests": a.target_ongoing_requests,
                "upscale_delay_s": a.upscale_delay_s,
                "downscale_delay_s": a.downscale_delay_s,
            }
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options


class ModelServiceSpec(DeploymentSpec):
    """A deployment that loads model versions (vision, audio, LLM)."""

    device: str | None = Field(
        None, description="Device of every model version in this service (cpu, cuda, cuda:1); None: as each says."
    )

    def registry(self, models: RegistryConfig) -> RegistryConfig:
        """``models`` with this service's device applied."""
        if self.device is None:
            return models
        versions = {name: src.model_copy(update={"device": self.device}) for name, src in models.versions.items()}
        return RegistryConfig(versions=versions, default_version=models.default_version)


class VisionSpec(ModelServiceSpec):
    max_images: int = Field(16, ge=1, description="Most images in one EncodeImages request.")
    encode_threads: int = Field(1, ge=1, description="Encoder calls running at once in a replica.")
    batch_images: int = Field(32, ge=1, description="Most images of concurrent requests in one ViT call.")


class AudioSpec(ModelServiceSpec):
    encode_threads: int = Field(1, ge=1, description="Encoder calls running at once in a replica.")


class LLMSpec(ModelServiceSpec):
    max_batch: int = Field(16, ge=1, description="Requests decoding together per model version and replica.")
    default_max_new_tokens: int = Field(1024, ge=1, description="max_new_tokens of requests that leave it unset.")
    max_blocks: int = Field(64, ge=0, description="Most embedding blocks in one request.")
    stream_interval_ms: float = Field(
        20.0, ge=0, description="Longest a token waits to travel with later ones (sentence marks go at once)."
    )


class TTSSpec(DeploymentSpec):
    backend: Literal["espeak", "cosyvoice"] = "espeak"
    model_dir: str | None = Field(None, description="CosyVoice 2 model directory (cosyvoice only).")
    sample_rate: int = Field(24000, description="Default output rate in Hz, in [8000, 48000].")
    default_voice: str = "auto"
    chunk_ms: int = Field(100, description="Duration of each streamed PCM chunk.")
    max_text_chars: int = Field(2000, description="Longest text one request may ask to speak.")
    espeak_engine: Literal["auto", "library", "process"] = Field(
        "auto", description="espeak only: in-process libespeak-ng (library), the program per request, or auto."
    )

    @model_validator(mode="after")
    def _check_backend(self) -> TTSSpec:
        self.tts_config()  # TTSConfig's own checks (rates, chunk size, cosyvoice-only fields)
        return self

    def tts_config(self) -> TTSConfig:
        return TTSConfig(
            backend=self.backend,
            model_dir=self.model_dir,
            sample_rate=self.sample_rate,
            default_voice=self.default_voice,
            chunk_ms=self.chunk_ms,
            max_text_chars=self.max_text_chars,
            espeak_engine=self.espeak_engine,
        )


class GatewaySpec(DeploymentSpec):
    max_history_turns: int = Field(16, ge=0, description="Earlier turns replayed into the prompt.")
    sentence_min_chars: int = Field(8, ge=1, description="Shorter fragments join the next sentence before TTS.")
    speech_sample_rate_hz: int | None = Field(
        None, ge=8000, le=48000, description="Speech rate when a request sets none; None: tts.sample_rate."
    )
    request_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Longest a Chat may take; a client's shorter x-ola-timeout-ms deadline wins (services.deadline).",
    )
    backend_address: str | None = Field(
        None, description="host:port of the Serve gRPC proxy the gateway calls; None: 127.0.0.1:<proxy.grpc_port>."
    )


# ------------------------------------------------------------------------------------------------ shared parts
def _from_env(value: str | None, env: str | None, environ: Mapping[str, str] | None) -> str | None:
    if value:
        return value
    if env:
        return (os.environ if environ is None else environ).get(env) or None
    return None


class CacheSpec(CacheConfig):
    """The encoder cache (:class:`services.cache.CacheConfig`), with the Redis URL optionally named by env var."""

    redis_url_env: str | None = Field(None, description="Env var holding the Redis URL (read in each replica).")

    def resolve(self, environ: Mapping[str, str] | None = None) -> CacheConfig:
        data = self.model_dump(exclude={"redis_url_env"})
        data["redis_url"] = _from_env(self.redis_url, self.redis_url_env, environ)
        return CacheConfig.model_validate(data)


class SessionsSpec(_Strict):
    """Gateway conversation state: in-process (one gateway replica) or Redis (shared by all replicas)."""

    redis_url: str | None = Field(None, description="redis://host:port/db; None and no env var: in-process.")
    redis_url_env: str | None = Field(None, description="Env var holding the Redis URL (read in each replica).")
    ttl_s: float = Field(3600.0, gt=0, description="Seconds a session lives after its last turn.")

    def url(self, environ: Mapping[str, str] | None = None) -> str | None:
        return _from_env(self.redis_url, self.redis_url_env, environ)


class RolloutSpec(_Strict):
    """Canary routing in the gateway (``services/rollout.py``): new sessions split between the registry's champion
    and challenger by the rollout state in Redis, each turn's outcome recorded for the rollout controller."""

    model_name: str | None = Field(None, description="Registry model whose rollouts route new sessions; None: off.")
    redis_url: str | None = Field(None, description="redis://host:port/db of the rollout state.")
    redis_url_env: str | None = Field(None, description="Env var holding the Redis URL (read in each replica).")
    refresh_s: float = Field(1.0, gt=0, description="Seconds between reads of the rollout state.")
    prefix: str = Field("ola:rollout:", min_length=1, description="Key prefix (the controller's must match).")

    @model_validator(mode="after")
    def _needs_redis(self) -> RolloutSpec:
        if self.model_name and not (self.redis_url or self.redis_url_env):
            raise ValueError("model_name needs rollout.redis_url or rollout.redis_url_env (the shared rollout state)")
        return self

    def url(self, environ: Mapping[str, str] | None = None) -> str | None:
        return _from_env(self.redis_url, self.redis_url_env, environ)


class ObjectStoreSpec(_Strict):
    """Where ``s3://`` media references are read (MinIO or any S3). Credentials only by env var name."""

    endpoint_url: str | None = Field(None, description="e.g. http://minio:9000; None: endpoint_url_env, else AWS.")
    endpoint_url_env: str = "OLA_S3_ENDPOINT_URL"
    access_key_id_env: str = "AWS_ACCESS_KEY_ID"
    secret_access_key_env: str = "AWS_SECRET_ACCESS_KEY"
    region: str | None = Field(None, description="None: AWS_DEFAULT_REGION, else us-east-1.")

    def s3_config(self, environ: Mapping[str, str] | None = None) -> S3Config:
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {
            "endpoint_url": self.endpoint_url or env.get(self.endpoint_url_env) or None,
            "access_key_id": env.get(self.access_key_id_env) or None,
            "secret_access_key": env.get(self.secret_access_key_env) or None,
        }
        region = self.region or env.get("AWS_DEFAULT_REGION")
        if region:
            data["region"] = region
        return S3Config(**data)


class LimitsSpec(_Strict):
    max_request_bytes: int = Field(
        256 << 20, gt=0, description="Largest Chat request (inline media included); larger: RESOURCE_EXHAUSTED."
    )
    max_media_bytes: int = Field(64 << 20, gt=0, description="Largest media item, inline or by s3:// reference.")


class ProxySpec(_Strict):
    """Serve's proxies. The gRPC proxy is the platform's front door; every app is addressed through it."""

    grpc_port: int = Field(9000, ge=1, le=65535)
    http_port: int = Field(8000, ge=1, le=65535, description="Serve's HTTP proxy (not used by the platform).")
    http_host: str = Field("127.0.0.1", description="Bind address of the HTTP proxy.")
    request_timeout_s: float | None = Field(None, gt=0, description="Serve's end-to-end timeout per request.")


class MetricsSpec(_Strict):
    """A Prometheus exporter in every replica (``/metrics``)."""

    port: int | None = Field(
        None, ge=0, le=65535, description="Port of each replica's exporter; taken: a free port (logged); None: off."
    )
    addr: str = "0.0.0.0"


# ------------------------------------------------------------------------------------------------ the platform
class PlatformConfig(_Strict):
    """Everything ``ola serve`` deploys. Defaults: the embedded local set-up (tiny preset, CPU, no Redis)."""

    models: RegistryConfig = Field(default_factory=RegistryConfig)
    vision: VisionSpec = Field(default_factory=VisionSpec)
    audio: AudioSpec = Field(default_factory=AudioSpec)
    llm: LLMSpec = Field(default_factory=LLMSpec)
    tts: TTSSpec = Field(default_factory=TTSSpec)
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)
    cache: CacheSpec = Field(default_factory=CacheSpec)
    sessions: SessionsSpec = Field(default_factory=SessionsSpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    object_store: ObjectStoreSpec = Field(default_factory=ObjectStoreSpec)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    proxy: ProxySpec = Field(default_factory=ProxySpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)

    @model_validator(mode="after")
    def _cross_checks(self) -> PlatformConfig:
        gw = self.gateway
        if gw.speech_sample_rate_hz is None:
            gw.speech_sample_rate_hz = self.tts.sample_rate
        several = (gw.num_replicas or 1) > 1 or (gw.autoscaling is not None and gw.autoscaling.max_replicas > 1)
        if several and not (self.sessions.redis_url or self.sessions.redis_url_env):
            raise ValueError(
                "gateway: more than one gateway replica needs shared sessions; set sessions.redis_url or "
                "sessions.redis_url_env"
            )
        return self

    # -------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, source: str = "config") -> PlatformConfig:
        """Validate plain data; :class:`ConfigError` names ``source`` and every bad field."""
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as exc:
            raise ConfigError(format_errors(exc, source, "config", "services/serve_config.py")) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> PlatformConfig:
        """Load a YAML file. Relative checkpoint directories are relative to the file."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
        config = cls.from_mapping(data, str(path))
        return config.with_checkpoints_relative_to(path.parent)

    def with_checkpoints_relative_to(self, base: Path) -> PlatformConfig:
        """A copy whose relative checkpoint directories are made absolute against ``base`` (replicas' cwd differs)."""
        versions = {}
        for name, src in self.models.versions.items():
            if src.checkpoint is not None and not src.checkpoint.is_absolute():
                src = src.model_copy(update={"checkpoint": (base / src.checkpoint).resolve()})
            versions[name] = src
        models = RegistryConfig(versions=versions, default_version=self.models.default_version)
        return self.model_copy(update={"models": models})

    def with_checkpoint(self, checkpoint: str | Path, version: str = "local") -> PlatformConfig:
        """A copy serving one version, ``version``, from the checkpoint directory ``checkpoint`` (the CLI option)."""
        models = RegistryConfig.model_validate(
            {"versions": {version: {"checkpoint": str(Path(checkpoint).resolve())}}, "default_version": version}
        )
        return self.model_copy(update={"models": models})

    def to_plain(self) -> dict[str, Any]:
        """JSON-compatible data (what deployments receive; nothing secret is in it)."""
        return self.model_dump(mode="json")

    # -------------------------------------------------------------------------------------------- derived
    def media_config(self, environ: Mapping[str, str] | None = None) -> MediaConfig:
        return MediaConfig(max_payload_bytes=self.limits.max_media_bytes, s3=self.object_store.s3_config(environ))

    def backend_address(self) -> str:
        return self.gateway.backend_address or f"127.0.0.1:{self.proxy.grpc_port}"

    def service(self, name: ServiceName) -> DeploymentSpec:
        return getattr(self, name)


def load_config(path: str | Path | None = None) -> PlatformConfig:
    """The config at ``path``; None: the embedded default (``services/configs/local.yaml``)."""
    return PlatformConfig.from_yaml(path or LOCAL_CONFIG)
