"""Model versions served by a process: version name -> a loaded :class:`~ola_model.OlaPipeline`.

Projectors are tied to their checkpoint, so every service a request touches resolves the same ``model_version``
through a registry of the same config. A version is either a checkpoint directory (Ola layout, with its tokenizer)
or a preset with a seed (``preset: tiny``, random weights: the embedded default for demos and tests). Each version
is loaded once per process, on first use (or by :meth:`ModelRegistry.load_all`), and shared by every servicer
given the same registry.

:class:`ModelServiceBase` is what every model servicer shares: the registry, the metrics and grpc.health.v1
reporting (SERVING unless the default version failed to load in :meth:`ModelServiceBase.warmup`).

Example config (YAML / JSON / a dict)::

    versions:
      ola-7b@3: {checkpoint: /models/ola-7b-3, dtype: bfloat16}
      tiny: {preset: tiny, seed: 0}
    default_version: ola-7b@3
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ola_model import OlaPipeline
from ola_model.errors import CheckpointError
from services.errors import BackendUnavailable, ServiceError, UnknownModelVersion
from services.metrics import ServiceMetrics, get_metrics

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSource(BaseModel):
    """Where one model version's weights come from: exactly one of ``checkpoint``, ``builtin`` and ``preset``."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: Path | None = Field(None, description="A local checkpoint directory in the Ola layout.")
    builtin: Literal["demo"] | None = Field(
        None, description="A model shipped with the platform: `demo` is the trained tiny model (ola_model.demo)."
    )
    preset: Literal["tiny"] | None = Field(None, description="Random weights of a preset (tests).")
    seed: int = Field(0, description="Initialisation seed of a preset.")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Parameter dtype; None: as stored (a preset: float32)."
    )
    device: str = "cpu"

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if sum(x is not None for x in (self.checkpoint, self.builtin, self.preset)) != 1:
            raise ValueError("a model version needs exactly one of `checkpoint`, `builtin` and `preset`")
        return self

    def load(self) -> OlaPipeline:
        dtype = _DTYPES[self.dtype] if self.dtype else None
        if self.checkpoint is not None:
            return OlaPipeline.from_checkpoint(self.checkpoint, device=self.device, dtype=dtype)
        if self.builtin is not None:
            from ola_model.demo import demo_checkpoint_dir

            return OlaPipeline.from_checkpoint(demo_checkpoint_dir(), device=self.device, dtype=dtype)
        pipeline = OlaPipeline.from_preset(self.preset or "tiny", seed=self.seed, device=self.device)
        if dtype is not None:
            pipeline.model.to(dtype)
            pipeline.model.speech_encoder.beats_model.float()  # BEATs stays float32, as in build_model
        return pipeline


def _embedded_versions() -> dict[str, ModelSource]:
    """The shipped demo model when present, else random tiny weights (the whole path is real, the answers noise)."""
    from ola_model.demo import has_demo_model

    if has_demo_model():
        return {"demo": ModelSource(builtin="demo")}
    return {"tiny": ModelSource(preset="tiny", seed=0)}


class RegistryConfig(BaseModel):
    """Model versions by name and the default for requests that leave ``model_version`` empty."""

    model_config = ConfigDict(extra="forbid")

    versions: dict[str, ModelSource] = Field(default_factory=_embedded_versions)
    default_version: str | None = Field(None, description="None: the first version listed.")

    @model_validator(mode="after")
    def _check_default(self) -> RegistryConfig:
        if not self.versions:
            raise ValueError("versions: at least one model version is needed")
        if any(not name or name != name.strip() for name in self.versions):
            raise ValueError("versions: names must be non-empty without surrounding spaces")
        if self.default_version is None:
            self.default_version = next(iter(self.versions))
        elif self.default_version not in self.versions:
            raise ValueError(f"default_version {self.default_version!r} is not in versions {sorted(self.versions)}")
        return self


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model version."""

    version: str
    pipeline: OlaPipeline

    @property
    def model(self):  # OlaModel
        return self.pipeline.model

    @property
    def tokenizer(self):
        return self.pipeline.tokenizer


class ModelRegistry:
    """Resolves version names and loads each version once (thread-safe)."""

    def __init__(self, config: RegistryConfig | None = None) -> None:
        self.config = config or RegistryConfig()
        self._loaded: dict[str, LoadedModel] = {}
        self._locks = {name: threading.Lock() for name in self.config.versions}

    @property
    def default_version(self) -> str:
        assert self.config.default_version is not None  # set by the validator
        return self.config.default_version

    @property
    def versions(self) -> list[str]:
        return list(self.config.versions)

    def resolve(self, version: str) -> str:
        """The version a request means: its own, or the default when empty; UnknownModelVersion if not served."""
        version = version.strip()
        if not version:
            return self.default_version
        if version not in self.config.versions:
            raise UnknownModelVersion(
                f"model version {version!r} is not served here; served: {sorted(self.config.versions)}",
                field="model_version",
            )
        return version

    def is_loaded(self, version: str) -> bool:
        return version in self._loaded

    def get(self, version: str = "") -> LoadedModel:
        """The loaded model of ``version`` ("" = default), loading it on first use (blocking).

        Raises:
            UnknownModelVersion: not in the config (NOT_FOUND).
            BackendUnavailable: the checkpoint cannot be loaded (FAILED_PRECONDITION); the next call retries.
        """
        name = self.resolve(version)
        loaded = self._loaded.get(name)
        if loaded is not None:
            return loaded
        with self._locks[name]:
            if name not in self._loaded:
                source = self.config.versions[name]
                log.info(
                    "loading model version %s from %s",
                    name,
                    source.checkpoint or source.builtin or f"preset {source.preset}",
                )
                try:
                    pipeline = source.load()
                except CheckpointError as exc:
                    raise BackendUnavailable(f"model version {name!r} cannot be loaded: {exc}") from exc
                except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
                    raise BackendUnavailable(f"model version {name!r} cannot be loaded: {exc}") from exc
                self._loaded[name] = LoadedModel(name, pipeline)
            return self._loaded[name]

    async def aget(self, version: str = "") -> LoadedModel:
        """:meth:`get` without blocking the event loop while a version loads."""
        name = self.resolve(version)
        loaded = self._loaded.get(name)
        return loaded if loaded is not None else await asyncio.to_thread(self.get, name)

    def load_all(self) -> None:
        """Load every configured version now (a deployment's start-up, so the first request is not slow)."""
        for name in self.config.versions:
            self.get(name)


# ------------------------------------------------------------------------------------------------ servicer plumbing
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ModelServiceBase:
    """Shared by the model servicers: a registry, metrics, and grpc.health.v1 status of the service.

    Subclasses set ``SERVICE_NAME`` (the proto's full service name, the health service key) and ``SERVICE_LABEL``
    (the ``service`` label of the metrics).
    """

    SERVICE_NAME: ClassVar[str] = ""
    SERVICE_LABEL: ClassVar[str] = ""

    def __init__(self, registry: ModelRegistry, metrics: ServiceMetrics | None = None) -> None:
        self.registry = registry
        self.metrics = metrics or get_metrics()
        self.serving = True
        self._health: list[Any] = []
        self._tasks: set[asyncio.Task] = set()

    # -------------------------------------------------------------------------------------------------- health
    def attach_health(self, server: grpc.aio.Server, health_servicer: Any = None) -> Any:
        """Report this service's status on ``health_servicer`` (one is made and added to ``server`` if None).

        Returns the health servicer, to share with the other services of the same server.
        """
        if health_servicer is None:
            health_servicer = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        self._health.append(health_servicer)
        self._set_now(health_servicer, self.SERVICE_NAME, _SERVING if self.serving else _NOT_SERVING)
        return health_servicer

    def _set_now(self, health_servicer: Any, service: str, status: int) -> None:
        result = health_servicer.set(service, status)
        if not inspect.isawaitable(result):
            return  # the synchronous grpc_health HealthServicer
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(result)  # no loop yet: nobody can be watching, the coroutine completes at once
            return
        task = loop.create_task(result)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def set_serving(self, serving: bool) -> None:
        """Change the health status reported for this service."""
        self.serving = serving
        for health_servicer in self._health:
            result = health_servicer.set(self.SERVICE_NAME, _SERVING if serving else _NOT_SERVING)
            if inspect.isawaitable(result):
                await result

    async def warmup(self) -> bool:
        """Load the default model version now; a failure reports NOT_SERVING (and every call answers the error)."""
        try:
            await self.registry.aget(self.registry.default_version)
        except ServiceError as exc:
            logging.getLogger(type(self).__module__).error("%s: %s", self.SERVICE_NAME, exc)
            await self.set_serving(False)
            return False
        await self.set_serving(True)
        return True
