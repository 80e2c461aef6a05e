"""``ola.models.v1.ModelService``: registered versions, gated promotion and canary rollouts over gRPC.

A thin adapter over :mod:`workflows.lifecycle`: the MLflow registry
(:class:`~workflows.lifecycle.registry.ModelRegistry`), the promotion gate (:func:`~workflows.lifecycle.gate.decide`
under the promotion policy) and the canary controller (:class:`~workflows.lifecycle.rollout.RolloutController`, its
state in Redis). Those are synchronous (MLflow's client, a sync Redis client), so every call runs in a worker thread.

- ListVersions: the registry's versions, newest first; ``metrics`` are the versions' ``eval.<metric>`` tags.
- PromoteVersion: the gate compares the version's metrics with the champion's; on a pass the ``challenger`` alias
  moves to it. ``force_champion`` (role admin, a reason required) moves ``champion`` without the gate.
- StartRollout / GetRollout / AbortRollout / PromoteRollout: the controller's start_rollout / state / abort / promote.

The canary controller's ``tick`` must run somewhere: with ``rollout_tick_s > 0`` this server ticks the rollouts of
``rollout_models`` (any number of servers may: the controller's transitions are compare-and-set). Quality probes
(the policy's fixed prompts with known answers) are asked through the omni gateway at ``probe_gateway`` with the
version pinned (:class:`services.rollout.OmniProbe`); without one they are skipped and the audit log says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import redis
from google.protobuf.timestamp_pb2 import Timestamp

from services.gen.ola.models.v1 import models_pb2 as pb
from services.gen.ola.models.v1 import models_pb2_grpc
from workflows.api.auth import Role, current_principal, require_role
from workflows.api.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, rpc_method

log = logging.getLogger(__name__)
T = TypeVar("T")

_STATUS = {
    "running": pb.ROLLOUT_STATUS_RUNNING,
    "promoting": pb.ROLLOUT_STATUS_PROMOTING,
    "promoted": pb.ROLLOUT_STATUS_PROMOTED,
    "rolled_back": pb.ROLLOUT_STATUS_ROLLED_BACK,
    "aborted": pb.ROLLOUT_STATUS_ABORTED,
}


DEPLOY_KINDS = ("none", "serve", "kuberay")


@dataclass
class DeployConfig:
    """Whether and where the rollout controller brings versions up before they get traffic and removes them after
    (:class:`~workflows.lifecycle.deploy.DeployingController`).

    Attributes:
        kind: ``none`` (the platform's versions are managed elsewhere; the controller only moves traffic shares),
            ``serve`` (a local Ray Serve started by ``ola serve``: :class:`~workflows.lifecycle.deploy.ServeDeployer`)
            or ``kuberay`` (a RayService: :class:`~workflows.lifecycle.deploy.KubeRayDeployer`).
        rayservice, namespace: the RayService object (kuberay).
        kubeconfig: a kubeconfig file (kuberay); None: the in-cluster config, else the default kubeconfig.
        serve_config: the platform config ``ola serve`` runs (serve).
        serve_grpc_address: the Serve gRPC proxy (serve); None: ``127.0.0.1:<proxy.grpc_port>`` of the config.
        ray_address: the Ray cluster to join (serve).
        models_root: where registered versions are downloaded before they are served.
        served_root: ``models_root`` as the replicas see it (the model store's mount path in the Ray pods); None:
            ``models_root`` itself.
        keep_previous_s: how long the previous champion stays served after a promotion.
        timeout_s: how long bringing a version up or down may take.
    """

    kind: str = "none"
    rayservice: str | None = None
    namespace: str = "default"
    kubeconfig: Path | None = None
    serve_config: Path | None = None
    serve_grpc_address: str | None = None
    ray_address: str = "auto"
    models_root: Path = Path(".cache/models")
    served_root: str | None = None
    keep_previous_s: float = 3600.0
    timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if self.kind not in DEPLOY_KINDS:
            raise ValueError(f"deploy: must be one of {', '.join(DEPLOY_KINDS)}, got {self.kind!r}")
        if self.kind == "kuberay" and not (self.rayservice or "").strip():
            raise ValueError("rayservice: the RayService name is required with deploy=kuberay")
        if self.kind == "kuberay" and not self.namespace.strip():
            raise ValueError("namespace: must be a non-empty namespace with deploy=kuberay")
        if self.kind == "serve" and self.serve_config is None:
            raise ValueError("serve_config: the platform config of `ola serve` is required with deploy=serve")
        if self.keep_previous_s < 0:
            raise ValueError(f"keep_previous_s: must be >= 0 seconds, got {self.keep_previous_s}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0 seconds, got {self.timeout_s}")

    def make_deployer(self) -> Any:
        """The :class:`~workflows.lifecycle.deploy.VersionDeployer` of ``kind`` (None for ``none``)."""
        from workflows.lifecycle.deploy import KubeRayDeployer, ServeDeployer

        if self.kind == "kuberay":
            from kubernetes import config as kube_config

            from workflows.lifecycle.deploy import DeployError, _default_api_client

            try:
                if self.kubeconfig is not None:
                    api_client = kube_config.new_client_from_config(config_file=str(self.kubeconfig))
                else:
                    api_client = _default_api_client()
            except kube_config.ConfigException as exc:
                where = self.kubeconfig or "in-cluster config or ~/.kube/config"
                raise DeployError(f"kubeconfig: cannot load {where}: {exc}") from exc
            return KubeRayDeployer(self.namespace, self.rayservice or "", api_client, timeout_s=self.timeout_s)
        if self.kind == "serve":
            return ServeDeployer(
                self.serve_config,
                grpc_address=self.serve_grpc_address,
                ray_address=self.ray_address,
                timeout_s=self.timeout_s,
            )
        return None


@dataclass
class ModelServiceConfig:
    """How ModelService reaches the lifecycle.

    Attributes:
        tracking_uri: the MLflow tracking (and registry) URI; None: ``MLFLOW_TRACKING_URI``.
        policy_path: the promotion policy YAML; None: the shipped ``workflows/configs/lifecycle/promotion.yaml``.
        rollout_prefix: Redis key prefix of the canary controller (the gateway's router must use the same).
        version_format: the gateway's name of a registry version (``{name}@{version}``).
        rollout_models: models whose rollouts this server ticks.
        rollout_tick_s: seconds between ticks; 0: this server does not tick (another process runs the controller).
        deploy: how versions are brought up and removed around rollouts; None or kind ``none``: not at all.
        probe_gateway: ``host:port`` of the omni gateway the quality probes go through; None: probes are skipped.
        probe_metadata: gRPC metadata of the probe calls (``(("application", "omni"),)`` through Serve's proxy).
    """

    tracking_uri: str | None = None
    policy_path: Path | None = None
    rollout_prefix: str | None = None
    version_format: str = "{name}@{version}"
    rollout_models: list[str] = field(default_factory=lambda: ["ola"])
    rollout_tick_s: float = 0.0
    deploy: DeployConfig | None = None
    probe_gateway: str | None = None
    probe_metadata: tuple[tuple[str, str], ...] | None = (("application", "omni"),)


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def version_to_proto(info: Any) -> pb.ModelVersion:
    """A registry ``VersionInfo`` on the wire."""
    metrics = info.eval_metrics
    out = pb.ModelVersion(
        model_name=info.name,
        version=str(info.version),
        aliases=sorted(info.aliases),
        tags=[pb.Tag(key=k, value=v) for k, v in sorted(info.tags.items())],
        metrics=[pb.Metric(name=k, value=v) for k, v in sorted(metrics.items())],
        source=info.source or "",
        run_id=info.run_id or "",
        description=info.tags.get("description", ""),
    )
    if info.created_ms:
        out.create_time.CopyFrom(_timestamp(info.created_ms / 1000.0))
    return out


def gate_to_proto(decision: Any, champion_version: str) -> pb.GateResult:
    """A gate ``GateDecision`` on the wire."""
    out = pb.GateResult(passed=decision.passed, reasons=list(decision.reasons), champion_version=champion_version)
    for verdict in decision.per_metric.values():
        v = out.verdicts.add(name=verdict.name, outcome=verdict.outcome, reason=verdict.reason)
        if verdict.candidate is not None:
            v.candidate = verdict.candidate
        if verdict.champion is not None:
            v.champion = verdict.champion
    return out


def rollout_to_proto(state: Any) -> pb.Rollout:
    """A controller ``RolloutState`` on the wire."""
    out = pb.Rollout(
        rollout_id=state.id,
        model_name=state.model_name,
        champion_version=state.champion_version,
        challenger_version=state.challenger_version,
        status=_STATUS.get(state.status, pb.ROLLOUT_STATUS_UNSPECIFIED),
        steps=list(state.steps),
        step_index=state.step_index,
        share=state.share,
        start_time=_timestamp(state.started_at),
        step_start_time=_timestamp(state.step_started_at),
        update_time=_timestamp(state.updated_at),
    )
    for e in state.events:
        out.events.add(
            time=_timestamp(e.ts), action=e.action, reasons=list(e.reasons), step_index=e.step_index, share=e.share
        )
    return out


def _lifecycle_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Map the lifecycle's exceptions (raised in a worker thread) to API errors with fitting status codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        from workflows.lifecycle.deploy import DeployError, DeployTimeout
        from workflows.lifecycle.errors import InvalidAlias, ModelNotFound, RegistryError
        from workflows.lifecycle.rollout import RolloutError

        try:
            return fn(*args, **kwargs)
        except DeployTimeout as exc:
            raise Unavailable(f"the platform did not serve the change in time: {exc}") from exc
        except DeployError as exc:  # a version that cannot be served: no rollout was started
            raise FailedPrecondition(str(exc)) from exc
        except ModelNotFound as exc:
            raise NotFound(str(exc)) from exc
        except InvalidAlias as exc:
            raise InvalidArgument(str(exc)) from exc
        except RolloutError as exc:  # GateNotPassed, RolloutConflict: the state does not allow it
            raise FailedPrecondition(str(exc)) from exc
        except RegistryError as exc:
            raise Unavailable(f"the model registry failed: {exc}") from exc
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise Unavailable(f"the rollout store (Redis) is unreachable: {exc}") from exc

    return wrapper


def _model_name(value: str) -> str:
    from workflows.lifecycle.errors import RegistryError
    from workflows.lifecycle.registry import check_model_name

    if not value:
        raise InvalidArgument("is required", field="model_name")
    try:
        return check_model_name(value)
    except RegistryError as exc:
        raise InvalidArgument(str(exc), field="model_name") from None


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    """ModelService over a registry, a promotion policy and a Redis for the canary controller.

    Args:
        registry: a :class:`~workflows.lifecycle.registry.ModelRegistry` (or anything with its lookup and alias
            methods).
        policy: the :class:`~workflows.lifecycle.policy.PromotionPolicy`.
        redis_client: a synchronous Redis client for the controller's state.
        config: the rest of the settings.
    """

    def __init__(self, registry: Any, policy: Any, redis_client: redis.Redis, config: ModelServiceConfig) -> None:
        from workflows.lifecycle.rollout import RegistryAliasStore

        self.registry = registry
        self.policy = policy
        self.redis = redis_client
        self.config = config
        self.aliases = RegistryAliasStore(registry)
        self._controllers: dict[str, Any] = {}
        self._ticker: asyncio.Task | None = None
        deploy = config.deploy if config.deploy is not None and config.deploy.kind != "none" else None
        self.deploy = deploy
        self.deployer = deploy.make_deployer() if deploy is not None else None

    @classmethod
    def from_config(cls, config: ModelServiceConfig, redis_url: str) -> ModelServicer:
        """Build the registry client, load and check the policy (PolicyError if it is invalid)."""
        from workflows.lifecycle.policy import load_policy
        from workflows.lifecycle.registry import ModelRegistry

        return cls(
            ModelRegistry(config.tracking_uri), load_policy(config.policy_path), redis.Redis.from_url(redis_url), config
        )

    def _probe(self) -> Callable[[str], float] | None:
        """The quality probe of the canary: the policy's probes through the gateway, or None (skipped)."""
        if not self.config.probe_gateway or not self.policy.probe_set:
            return None
        from services.rollout import OmniProbe

        return OmniProbe(self.config.probe_gateway, self.policy.probe_set, metadata=self.config.probe_metadata)

    def controller(self, model_name: str) -> Any:
        """The canary controller of a model (one per model, shared by the calls).

        With a deployer configured it is a :class:`~workflows.lifecycle.deploy.DeployingController`: StartRollout
        brings the challenger up first (the call returns once it serves), ticks, aborts and promotions remove what
        is no longer needed; registered versions are downloaded under ``deploy.models_root`` before they are served.
        """
        from workflows.lifecycle.rollout import DEFAULT_PREFIX, RolloutController

        if model_name not in self._controllers:
            controller = RolloutController(
                self.redis,
                model_name,
                self.policy,
                self.aliases,
                probe=self._probe(),
                prefix=self.config.rollout_prefix or DEFAULT_PREFIX,
                version_format=self.config.version_format,
            )
            if self.deployer is not None and self.deploy is not None:
                from workflows.lifecycle.deploy import DeployingController, registry_source

                source_of = registry_source(self.registry, model_name, self.deploy.models_root, self.deploy.served_root)
                controller = DeployingController(
                    controller, self.deployer, source_of, keep_previous_s=self.deploy.keep_previous_s
                )
            self._controllers[model_name] = controller
        return self._controllers[model_name]

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(_lifecycle_errors(fn), *args)

    # ---- background ticks
    def start_ticking(self) -> None:
        """Tick the rollouts of ``config.rollout_models`` every ``config.rollout_tick_s`` seconds (if > 0)."""
        if self.config.rollout_tick_s > 0 and self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_loop(), name="rollout-ticker")

    async def _tick_loop(self) -> None:
        while True:
            for name in self.config.rollout_models:
                try:
                    decision = await asyncio.to_thread(self.controller(name).tick)
                    if decision.action not in ("idle", "hold"):
                        log.info("rollout of %s: %s (%s)", name, decision.action, "; ".join(decision.reasons))
                except Exception:
                    log.exception("rollout tick of %s failed", name)
            await asyncio.sleep(self.config.rollout_tick_s)

    async def aclose(self) -> None:
        """Stop ticking and close the Redis client."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        self.redis.close()

    # ---- the RPCs
    @rpc_method
    async def ListVersions(self, request: pb.ListVersionsRequest, context: grpc.aio.ServicerContext):
        name = _model_name(request.model_name)
        versions = await self._call(self.registry.list_versions, name)
        versions = sorted(versions, key=lambda v: int(v.version), reverse=True)
        aliases = sorted((a, v.version) for v in versions for a in v.aliases)
        return pb.ListVersionsResponse(
            versions=[version_to_proto(v) for v in versions],
            aliases=[pb.Alias(alias=a, version=v) for a, v in aliases],
        )

    @rpc_method
    async def PromoteVersion(self, request: pb.PromoteVersionRequest, context: grpc.aio.ServicerContext):
        name = _model_name(request.model_name)
        if not request.version.isdigit():
            raise InvalidArgument(f"must be a version number (got {request.version!r})", field="version")
        if request.force_champion:
            principal = require_role(Role.ADMIN, "force_champion")
            if not request.reason.strip():
                raise InvalidArgument("is required with force_champion (it goes to the log)", field="reason")
            info = await self._call(self.registry.set_alias, name, "champion", request.version)
            log.warning(
                "model %s: champion forced to version %s by API key %r: %s",
                name,
                info.version,
                principal.name,
                request.reason,
            )
            return pb.PromoteVersionResponse(promoted=True, alias="champion")
        decision, champion = await self._call(self._gate, name, request.version)
        if not decision.passed:
            log.info("model %s version %s: %s", name, request.version, decision.summary())
            return pb.PromoteVersionResponse(promoted=False, gate=gate_to_proto(decision, champion))
        principal = current_principal()
        log.info(
            "model %s version %s is the challenger (API key %r): %s",
            name,
            request.version,
            principal.name if principal else "",
            decision.summary(),
        )
        return pb.PromoteVersionResponse(promoted=True, alias="challenger", gate=gate_to_proto(decision, champion))

    def _gate(self, name: str, version: str) -> tuple[Any, str]:
        """Judge ``version`` against the champion; nominate it on a pass. Returns (decision, champion version)."""
        from workflows.lifecycle.gate import decide
        from workflows.lifecycle.rollout import CHAMPION, nominate_challenger

        candidate = self.registry.get_version(name, version)
        champion_version = self.aliases.get_alias(name, CHAMPION)
        if champion_version == candidate.version:
            raise FailedPrecondition(f"version {version} of {name} is already the champion", field="version")
        champion = self.registry.get_version(name, champion_version) if champion_version else None
        decision = decide(candidate.eval_metrics, champion.eval_metrics if champion else None, self.policy)
        if decision.passed:
            nominate_challenger(self.aliases, name, candidate.version, decision)
        return decision, champion_version or ""

    @rpc_method
    async def StartRollout(self, request: pb.StartRolloutRequest, context: grpc.aio.ServicerContext):
        name = _model_name(request.model_name)
        if request.version and not request.version.isdigit():
            raise InvalidArgument(f"must be a version number (got {request.version!r})", field="version")
        state = await self._call(self.controller(name).start_rollout, request.version or None)
        return pb.StartRolloutResponse(rollout=rollout_to_proto(state))

    @rpc_method
    async def GetRollout(self, request: pb.GetRolloutRequest, context: grpc.aio.ServicerContext):
        name = _model_name(request.model_name)
        state = await self._call(self.controller(name).state)
        if state is None:
            raise NotFound(f"model {name!r} has never been rolled out", field="model_name")
        return pb.GetRolloutResponse(rollout=rollout_to_proto(state))

    @rpc_method
    async def AbortRollout(self, request: pb.AbortRolloutRequest, context: grpc.aio.ServicerContext):
        name = _model_name(request.model_name)
        state = await self._call(self.controller(name).abort, _reason(request.reason, "aborted"))
        return pb.AbortRolloutResponse(rollout=rollout_to_proto(state))

    @rpc_method
    async def PromoteRollout(self, request: pb.PromoteRolloutRequest, context: grpc.aio.ServicerContext):
        name = _model_name(request.model_name)
        state = await self._call(self.controller(name).promote, _reason(request.reason, "promoted"))
        return pb.PromoteRolloutResponse(rollout=rollout_to_proto(state))


def _reason(text: str, verb: str) -> str:
    principal = current_principal()
    who = f" by API key {principal.name!r}" if principal else ""
    return f"{text.strip() or f'{verb} through the API'}{who}"
