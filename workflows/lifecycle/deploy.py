"""Bring model versions up before they take traffic, and remove them after: on KubeRay and on a local Ray Serve.

The platform serves the model versions of one ``models`` section (``{versions: {name: source}, default_version}``,
:class:`services.registry.RegistryConfig`), which every Serve application receives as ``user_config``; a replica's
``reconfigure`` loads added versions *before* it swaps them in and frees removed ones, without a restart. A
:class:`VersionDeployer` changes that section on a running platform and waits until it serves the result:

- :class:`KubeRayDeployer`: the RayService custom object (``ray.io/v1``, ``rayservices``) through the official
  ``kubernetes`` client. It edits ``spec.serveConfigV2`` (a YAML string: the ``models`` of every application,
  ``deployments[].user_config.models`` or ``args.models``; everything else is kept, byte for byte when the document
  is in the canonical layout Helm and PyYAML write), sends it back as a JSON merge patch carrying the
  ``metadata.resourceVersion`` it read (optimistic concurrency: a 409 Conflict re-reads and retries), then polls
  ``status`` until the operator has observed the new generation, no new cluster is pending and every application of
  the document is ``RUNNING`` in ``status.activeServiceStatus.applicationStatuses`` (its deployments healthy, the
  ``Ready`` condition true where reported). KubeRay applies a ``serveConfigV2``-only change to the running cluster in
  place, which is what makes this cheap.
- :class:`ServeDeployer`: a local Ray Serve started by ``ola serve`` (``services.app.deploy``): it redeploys the
  platform config with the changed ``models`` (Serve updates the running replicas in place) and checks readiness
  through the gRPC proxy (every application SERVING, the gateway listing the version) and each model application's
  ``replica_info`` (the version loaded).

:class:`DeployingController` ties a deployer to :class:`~workflows.lifecycle.rollout.RolloutController` without
changing the controller: the challenger is brought up before :meth:`~DeployingController.start_rollout` gives it a
share, it is removed after a rollback or abort, and after a promotion it becomes the default version while the
previous champion is removed once ``keep_previous_s`` has passed (sessions pinned to it finish). Every step is
idempotent (:meth:`~DeployingController.reconcile`), so a controller that died midway is finished by the next tick.

Sources (:func:`version_source`): an absolute checkpoint directory as the replicas see it (or ``file://`` URI),
``builtin:demo``, ``preset:tiny``, or a ``models.versions`` entry as a mapping. A bare directory inherits ``dtype``
and ``device`` from the default version (a new checkpoint is served like the champion). Registry URIs are not
sources: :func:`registry_source` downloads a registered version into a directory the replicas read first.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import yaml

from workflows.lifecycle.errors import LifecycleError
from workflows.lifecycle.rollout import (
    CHAMPION,
    Decision,
    RolloutController,
    RolloutState,
    tick_forever,
)

log = logging.getLogger(__name__)

Source = str | Path | Mapping[str, Any]
"""What a version is served from (see :func:`version_source`)."""

RAY_GROUP, RAY_VERSION, RAYSERVICE_PLURAL = "ray.io", "v1", "rayservices"
MERGE_PATCH = "application/merge-patch+json"
MODEL_APPS = ("vision", "audio", "llm")
"""Serve applications that load model weights (their replicas report ``loaded_versions``)."""
_INHERITED = ("dtype", "device")
_HEALTHY_DEPLOYMENT = {"HEALTHY", "UPSCALING", "DOWNSCALING"}


class DeployError(LifecycleError):
    """A version could not be brought up, removed or made the default; the message names it and what was seen."""


class DeployTimeout(DeployError, TimeoutError):
    """The platform did not report the new set of versions serving in time."""


# ------------------------------------------------------------------------------------------------ the protocol
class VersionDeployer(Protocol):
    """Changes the model versions a running platform serves, and waits until it serves them."""

    def ensure_version(self, name: str, source: Source) -> None:
        """Serve ``name`` from ``source`` (added if missing) and return once every service has it loaded.

        Raises:
            DeployError: a bad name or source, ``name`` already served from another source, the platform refused it.
            DeployTimeout: not serving in time.
        """
        ...

    def remove_version(self, name: str) -> None:
        """Stop serving ``name`` (nothing to do if it is not served); the default version cannot be removed."""
        ...

    def served_versions(self) -> list[str]:
        """The versions the platform is configured to serve, in order."""
        ...

    def default_version(self) -> str:
        """The version requests without ``model_version`` get."""
        ...

    def set_default_version(self, name: str) -> None:
        """Make ``name`` (served already) the default version."""
        ...


# ------------------------------------------------------------------------------------------------ sources
def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or name != name.strip():
        raise DeployError(f"version name: must be a non-empty string without surrounding spaces, got {name!r}")
    return name


def version_source(source: Source, *, like: Mapping[str, Any] | None = None, local: bool = False) -> dict[str, Any]:
    """The ``models.versions`` entry that serves ``source``, validated like the replicas validate it.

    Args:
        source: an absolute directory (``str`` / ``Path`` / ``file://`` URI), ``builtin:demo``, ``preset:tiny``, or
            an entry as a mapping (``{checkpoint: DIR, dtype: bfloat16}``).
        like: a directory inherits this entry's ``dtype`` and ``device`` (the default version's).
        local: the replicas run on this machine: a directory must exist and hold a checkpoint (``config.json``).
    Raises:
        DeployError: naming ``source`` and what is wrong with it.
    """
    if isinstance(source, Mapping):
        entry = {k: str(v) if isinstance(v, Path) else v for k, v in source.items()}
    else:
        text = str(source).strip()
        kind, _, value = text.partition(":")
        if kind in ("builtin", "preset") and value and "/" not in value:
            entry = {kind: value}
        else:
            if text.startswith("file://"):
                text = text.removeprefix("file://")
            elif "://" in text or kind in ("models", "runs", "mlflow-artifacts"):
                raise DeployError(
                    f"source: {text!r} is not a directory the replicas can read; download the version into one "
                    "first (workflows.lifecycle.deploy.registry_source)"
                )
            if not text.startswith("/"):
                raise DeployError(f"source: {text!r} must be an absolute directory (the replicas' working dir differs)")
            entry = {"checkpoint": text}
            for key in _INHERITED:
                if like is not None and like.get(key) is not None:
                    entry[key] = like[key]
    from pydantic import ValidationError

    from services.registry import ModelSource

    try:
        checked = ModelSource.model_validate(entry)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'source'}: {e['msg']}" for e in exc.errors())
        raise DeployError(f"source {source!r}: {problems}") from None
    if local and checked.checkpoint is not None and not (checked.checkpoint / "config.json").is_file():
        raise DeployError(f"source: {checked.checkpoint} is not a checkpoint directory (no config.json)")
    return entry


def registry_source(
    registry: Any, model_name: str, models_root: str | Path, served_root: str | Path | None = None
) -> Callable[[str], str]:
    """``source_of(version)`` for :class:`DeployingController`: the registered version, downloaded once.

    ``registry`` is :class:`workflows.lifecycle.registry.ModelRegistry`; versions go to
    ``models_root/<model>-<version>`` (atomic, verified downloads; an existing directory is reused) and the source
    is that directory as the replicas see it: under ``served_root`` (the model store's mount path in the Ray pods)
    when given, else ``models_root`` itself.
    """
    root = Path(models_root).resolve()

    def source_of(version: str) -> str:
        dest = root / f"{model_name}-{version}"
        if not dest.is_dir():
            registry.download_version(model_name, version, dest)
        return str(Path(served_root) / dest.name) if served_root is not None else str(dest)

    return source_of


# ------------------------------------------------------------------------------------------------ models sections
def _default_of(models: Mapping[str, Any]) -> str | None:
    versions = models.get("versions") or {}
    return models.get("default_version") or next(iter(versions), None)


def _validated(models: dict[str, Any], where: str) -> dict[str, Any]:
    from pydantic import ValidationError

    from services.registry import RegistryConfig

    try:
        RegistryConfig.model_validate(models)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'models'}: {e['msg']}" for e in exc.errors())
        raise DeployError(f"{where}: the changed models section does not validate: {problems}") from None
    return models


def _same_source(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    from services.registry import ModelSource

    return ModelSource.model_validate(dict(a)) == ModelSource.model_validate(dict(b))


def models_with_version(models: Mapping[str, Any], name: str, entry: Mapping[str, Any], where: str = "models"):
    """``models`` with version ``name`` served from ``entry``; None when it already is.

    Raises:
        DeployError: ``name`` is served from another source (a version name always means the same weights).
    """
    versions = dict(models.get("versions") or {})
    if name in versions:
        if _same_source(versions[name], entry):
            return None
        raise DeployError(
            f"{where}: version {name!r} is served from {dict(versions[name])} already, not {dict(entry)}; "
            "a version name always means the same weights, use a new name"
        )
    out = copy.deepcopy(dict(models))
    out["versions"] = {**versions, name: dict(entry)}
    return _validated(out, where)


def models_without_version(models: Mapping[str, Any], name: str, where: str = "models") -> dict[str, Any] | None:
    """``models`` without version ``name``; None when it is not there. The default version cannot be removed."""
    versions = dict(models.get("versions") or {})
    if name not in versions:
        return None
    if _default_of(models) == name:
        raise DeployError(f"{where}: cannot remove {name!r}: it is the default version; make another the default first")
    out = copy.deepcopy(dict(models))
    out["versions"] = {k: v for k, v in versions.items() if k != name}
    return _validated(out, where)


def models_with_default(models: Mapping[str, Any], name: str, where: str = "models") -> dict[str, Any] | None:
    """``models`` with ``name`` (served already) as the default version; None when it already is."""
    if name not in (models.get("versions") or {}):
        raise DeployError(f"{where}: cannot make {name!r} the default: it is not served; bring it up first")
    if models.get("default_version") == name:
        return None
    out = copy.deepcopy(dict(models))
    out["default_version"] = name
    return _validated(out, where)


# ------------------------------------------------------------------------------------------------ the Serve document
def models_sections(document: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any], str]]:
    """``(where, parent, key)`` of every ``models`` section of a Serve config document (``parent[key]`` is it)."""
    for app in document.get("applications") or []:
        name = app.get("name", "?")
        args = app.get("args")
        if isinstance(args, dict) and isinstance(args.get("models"), dict):
            yield f"applications[{name}].args.models", args, "models"
        for deployment in app.get("deployments") or []:
            user_config = deployment.get("user_config")
            if isinstance(user_config, dict) and isinstance(user_config.get("models"), dict):
                where = f"applications[{name}].deployments[{deployment.get('name', '?')}].user_config.models"
                yield where, user_config, "models"


def _dump_like(original: str, document: Any) -> str:
    """``document`` as YAML in the layout of ``original`` (key order, width) when a plain re-dump reproduces it."""
    before = yaml.safe_load(original)
    for sort_keys in (True, False):
        for width in (80, 1 << 30):
            options = {"sort_keys": sort_keys, "default_flow_style": False, "width": width, "allow_unicode": True}
            if yaml.safe_dump(before, **options) == original:
                return yaml.safe_dump(document, **options)
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False, width=1 << 30, allow_unicode=True)


def edit_serve_config(text: str, edit: Callable[[Mapping[str, Any], str], dict[str, Any] | None]) -> str | None:
    """Apply ``edit(models, where)`` to every ``models`` section of the Serve config ``text``.

    Returns the new text, or None when no section changed.

    Raises:
        DeployError: the text is not a Serve config, or no application carries a ``models`` section.
    """
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DeployError(f"serveConfigV2: not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise DeployError("serveConfigV2: not a Serve config (the top level must be a mapping)")
    sections = list(models_sections(document))
    if not sections:
        raise DeployError(
            "serveConfigV2: no application carries a models section (deployments[].user_config.models or args.models)"
        )
    changed = False
    for where, parent, key in sections:
        new = edit(parent[key], where)
        if new is not None:
            parent[key] = new
            changed = True
    return _dump_like(text, document) if changed else None


def serve_config_versions(text: str) -> tuple[list[str], str | None]:
    """(versions every application serves, in the first's order; the first section's default) of a Serve config."""
    document = yaml.safe_load(text) or {}
    sections = [parent[key] for _, parent, key in models_sections(document)]
    if not sections:
        return [], None
    common = set.intersection(*(set(s.get("versions") or {}) for s in sections))
    return [v for v in sections[0].get("versions") or {} if v in common], _default_of(sections[0])


def serve_config_apps(text: str) -> list[str]:
    """The application names of a Serve config."""
    document = yaml.safe_load(text) or {}
    return [app.get("name", "") for app in document.get("applications") or []]


# ------------------------------------------------------------------------------------------------ KubeRay
def rayservice_serving(obj: Mapping[str, Any], generation: int | None = None) -> tuple[bool, str | None, str]:
    """Whether a RayService serves its spec: ``(ready, failure or None, summary)``.

    Ready: ``status.observedGeneration`` has reached ``generation`` (default ``metadata.generation``), no new cluster
    is pending (``pendingServiceStatus.rayClusterName`` empty, no ``UpgradeInProgress`` condition true), every
    application of ``spec.serveConfigV2`` is ``RUNNING`` in ``activeServiceStatus.applicationStatuses`` with its
    deployments healthy, and the ``Ready`` condition (KubeRay >= 1.3) and ``serviceStatus`` (older) agree when
    reported. An application in ``DEPLOY_FAILED`` of the observed generation is a failure.
    """
    status = obj.get("status") or {}
    generation = generation if generation is not None else (obj.get("metadata") or {}).get("generation")
    observed = status.get("observedGeneration")
    if generation is not None and (observed is None or int(observed) < int(generation)):
        return False, None, f"the operator has not observed generation {generation} yet (observedGeneration {observed})"
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if isinstance(c, Mapping)}
    pending = (status.get("pendingServiceStatus") or {}).get("rayClusterName")
    if pending or (conditions.get("UpgradeInProgress") or {}).get("status") == "True":
        return False, None, f"a cluster upgrade is in progress (pending RayCluster {pending or '?'})"
    active = (status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
    waiting = []
    for app in serve_config_apps((obj.get("spec") or {}).get("serveConfigV2") or ""):
        app_status = active.get(app)
        if app_status is None:
            waiting.append(f"{app}: not reported yet")
            continue
        state, message = app_status.get("status"), app_status.get("message") or ""
        if state == "DEPLOY_FAILED":
            return False, f"application {app} is DEPLOY_FAILED: {message or 'no message'}", f"{app}: DEPLOY_FAILED"
        if state != "RUNNING":
            waiting.append(f"{app}: {state}" + (f" ({message})" if message else ""))
        for name, deployment in (app_status.get("serveDeploymentStatuses") or {}).items():
            if deployment.get("status") not in _HEALTHY_DEPLOYMENT:
                waiting.append(f"{app}/{name}: {deployment.get('status')}")
    ready = conditions.get("Ready")
    if ready is not None and ready.get("status") != "True":
        waiting.append(f"condition Ready is {ready.get('status')} ({ready.get('reason')}: {ready.get('message')})")
    service_status = status.get("serviceStatus")
    if service_status and service_status != "Running":
        waiting.append(f"serviceStatus {service_status}")
    return not waiting, None, "; ".join(waiting) or "serving"


def _default_api_client() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class KubeRayDeployer:
    """:class:`VersionDeployer` over a KubeRay RayService (``ray.io/v1``) through the Kubernetes API.

    Args:
        namespace, rayservice_name: the RayService object (the Helm chart names it after the release).
        api_client: a ``kubernetes.client.ApiClient``; None: in-cluster config, else the kubeconfig.
        timeout_s: how long :meth:`ensure_version` and friends wait for the operator to report the change serving.
        poll_s: the interval between status reads.
        max_conflicts: 409 Conflicts (concurrent writers) retried before giving up.
        request_timeout_s: the timeout of each API request.
    """

    def __init__(
        self,
        namespace: str,
        rayservice_name: str,
        api_client: Any = None,
        *,
        timeout_s: float = 900.0,
        poll_s: float = 5.0,
        max_conflicts: int = 8,
        request_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        from kubernetes import client

        for field, value in (("namespace", namespace), ("rayservice_name", rayservice_name)):
            if not value or value != value.strip():
                raise ValueError(f"{field}: must be a non-empty name, got {value!r}")
        for field, value in (("timeout_s", timeout_s), ("poll_s", poll_s), ("request_timeout_s", request_timeout_s)):
            if not value > 0:
                raise ValueError(f"{field}: must be > 0 seconds, got {value}")
        if max_conflicts < 1:
            raise ValueError(f"max_conflicts: must be >= 1, got {max_conflicts}")
        self.namespace, self.name = namespace, rayservice_name
        self._object = (RAY_GROUP, RAY_VERSION, namespace, RAYSERVICE_PLURAL, rayservice_name)
        self.api = client.CustomObjectsApi(api_client if api_client is not None else _default_api_client())
        self.timeout_s, self.poll_s, self.max_conflicts = timeout_s, poll_s, max_conflicts
        self.request_timeout_s = request_timeout_s
        self.clock, self.sleep = clock, sleep

    @property
    def ref(self) -> str:
        return f"RayService {self.namespace}/{self.name}"

    # -------------------------------------------------------------------------------------------- the interface
    def ensure_version(self, name: str, source: Source) -> None:
        _check_name(name)
        version_source(source)  # a bad source fails here, before any request

        def add(models: Mapping[str, Any], where: str) -> dict[str, Any] | None:
            default = _default_of(models)
            like = (models.get("versions") or {}).get(default) if default else None
            return models_with_version(models, name, version_source(source, like=like), where)

        generation = self._update(add, f"add version {name}")
        self.wait_serving(generation, f"bringing up version {name}")
        log.info("%s serves model version %s", self.ref, name)

    def remove_version(self, name: str) -> None:
        _check_name(name)
        generation = self._update(lambda models, where: models_without_version(models, name, where), f"remove {name}")
        self.wait_serving(generation, f"removing version {name}")
        log.info("%s no longer serves model version %s", self.ref, name)

    def set_default_version(self, name: str) -> None:
        _check_name(name)
        generation = self._update(lambda models, where: models_with_default(models, name, where), f"default {name}")
        self.wait_serving(generation, f"making {name} the default version")

    def served_versions(self) -> list[str]:
        return serve_config_versions(self._serve_config(self._get()))[0]

    def default_version(self) -> str:
        default = serve_config_versions(self._serve_config(self._get()))[1]
        if default is None:
            raise DeployError(f"{self.ref}: serveConfigV2 serves no model versions")
        return default

    # -------------------------------------------------------------------------------------------- the API
    def _error(self, what: str, exc: Exception) -> DeployError:
        status = getattr(exc, "status", None)
        if status == 404:
            return DeployError(f"{self.ref} not found (404) while trying to {what}; check the namespace and name")
        reason = getattr(exc, "reason", "") or type(exc).__name__
        return DeployError(f"{self.ref}: the Kubernetes API refused to {what}: {status} {reason}")

    def _get(self) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return self.api.get_namespaced_custom_object(*self._object, _request_timeout=self.request_timeout_s)
        except ApiException as exc:
            raise self._error("read it", exc) from exc
        except HTTPError as exc:
            raise DeployError(f"{self.ref}: cannot reach the Kubernetes API: {exc}") from exc

    def _serve_config(self, obj: Mapping[str, Any]) -> str:
        text = (obj.get("spec") or {}).get("serveConfigV2")
        if not isinstance(text, str) or not text.strip():
            raise DeployError(f"{self.ref}: spec.serveConfigV2 is missing; the platform's Serve config belongs there")
        return text

    def _update(self, edit: Callable[[Mapping[str, Any], str], dict[str, Any] | None], what: str) -> int | None:
        """Read, edit ``serveConfigV2`` and merge-patch it back under the read ``resourceVersion``; retry conflicts.

        Returns the generation to wait for (the object's own when nothing needed changing).
        """
        from kubernetes.client.exceptions import ApiException

        for attempt in range(1, self.max_conflicts + 1):
            obj = self._get()
            metadata = obj.get("metadata") or {}
            text = edit_serve_config(self._serve_config(obj), edit)
            if text is None:
                log.info("%s: %s: nothing to change", self.ref, what)
                return metadata.get("generation")
            body = {"metadata": {"resourceVersion": metadata.get("resourceVersion")}, "spec": {"serveConfigV2": text}}
            try:
                updated = self.api.patch_namespaced_custom_object(
                    *self._object, body, _content_type=MERGE_PATCH, _request_timeout=self.request_timeout_s
                )
            except ApiException as exc:
                if getattr(exc, "status", None) == 409:
                    log.info(
                        "%s: %s: conflict on attempt %d (changed concurrently); re-reading", self.ref, what, attempt
                    )
                    continue
                raise self._error(f"patch it ({what})", exc) from exc
            metadata = updated.get("metadata") or {}
            log.info("%s: %s: patched (resourceVersion %s)", self.ref, what, metadata.get("resourceVersion"))
            return metadata.get("generation")
        raise DeployError(
            f"{self.ref}: {what}: {self.max_conflicts} conflicting concurrent updates in a row; try again"
        )

    def wait_serving(self, generation: int | None, what: str = "waiting", timeout_s: float | None = None) -> None:
        """Poll the status until :func:`rayservice_serving` says ready for ``generation``.

        Raises:
            DeployError: an application failed to deploy. DeployTimeout: not serving after ``timeout_s``.
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = self.clock() + timeout_s
        while True:
            ready, failure, summary = rayservice_serving(self._get(), generation)
            if failure is not None:
                raise DeployError(f"{self.ref}: {what}: {failure}")
            if ready:
                return
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise DeployTimeout(f"{self.ref}: {what}: not serving after {timeout_s:g} s: {summary}")
            log.debug("%s: %s: %s", self.ref, what, summary)
            self.sleep(min(self.poll_s, remaining))


# ------------------------------------------------------------------------------------------------ local Ray Serve
class ServeDeployer:
    """:class:`VersionDeployer` over a local Ray Serve started by ``ola serve`` (or ``services.app.deploy``).

    It redeploys the platform config with the changed ``models`` (``services.app.deploy``: every application's
    ``user_config``; Serve reconfigures the running replicas in place) and then checks readiness: every application
    SERVING through the gRPC proxy, the gateway listing the version, each model application's replicas reporting it
    loaded. One deployer should own a platform's versions at a time (the config it deploys is the one it holds).

    Args:
        config: the platform config ``ola serve`` runs (a :class:`services.serve_config.PlatformConfig` or its file).
        grpc_address: the Serve gRPC proxy; None: ``127.0.0.1:<proxy.grpc_port>``.
        ray_address, namespace: the Ray cluster to join when this process is not connected yet (``ola serve`` uses
            the namespace ``ola``).
        timeout_s: how long a change may take to serve.
    """

    def __init__(
        self,
        config: Any,
        *,
        grpc_address: str | None = None,
        ray_address: str = "auto",
        namespace: str = "ola",
        timeout_s: float = 600.0,
        poll_s: float = 0.5,
    ) -> None:
        from services.serve_config import PlatformConfig, load_config

        self.config = config if isinstance(config, PlatformConfig) else load_config(config)
        self.grpc_address = grpc_address or f"127.0.0.1:{self.config.proxy.grpc_port}"
        self.ray_address, self.namespace = ray_address, namespace
        if not timeout_s > 0 or not poll_s > 0:
            raise ValueError(f"timeout_s and poll_s: must be > 0 seconds, got {timeout_s} and {poll_s}")
        self.timeout_s, self.poll_s = timeout_s, poll_s

    # -------------------------------------------------------------------------------------------- planned configs
    def _with_models(self, models: dict[str, Any] | None) -> Any:
        if models is None:
            return None
        from services.registry import RegistryConfig

        return self.config.model_copy(update={"models": RegistryConfig.model_validate(models)})

    def _models(self) -> dict[str, Any]:
        return self.config.models.model_dump(mode="json", exclude_none=True)

    def config_with_version(self, name: str, source: Source) -> Any:
        """The platform config serving ``name`` too (None: it already does)."""
        models = self._models()
        like = models["versions"].get(_default_of(models))
        entry = version_source(source, like=like, local=True)
        return self._with_models(models_with_version(models, _check_name(name), entry, "models"))

    def config_without_version(self, name: str) -> Any:
        """The platform config without ``name`` (None: it is not served)."""
        return self._with_models(models_without_version(self._models(), _check_name(name), "models"))

    def config_with_default(self, name: str) -> Any:
        """The platform config with ``name`` as the default version (None: it is already)."""
        return self._with_models(models_with_default(self._models(), _check_name(name), "models"))

    # -------------------------------------------------------------------------------------------- the interface
    def ensure_version(self, name: str, source: Source) -> None:
        new = self.config_with_version(name, source)
        if new is not None:
            self._deploy(new, f"add version {name}")
        self._wait(lambda listed, loaded: name in listed and all(name in v for v in loaded), f"bringing up {name}")
        log.info("local Serve serves model version %s", name)

    def remove_version(self, name: str) -> None:
        new = self.config_without_version(name)
        if new is not None:
            self._deploy(new, f"remove version {name}")
        self._wait(lambda listed, loaded: name not in listed and all(name not in v for v in loaded), f"removing {name}")

    def set_default_version(self, name: str) -> None:
        new = self.config_with_default(name)
        if new is not None:
            self._deploy(new, f"default {name}")

    def served_versions(self) -> list[str]:
        return list(self.config.models.versions)

    def default_version(self) -> str:
        assert self.config.models.default_version is not None  # set by RegistryConfig's validator
        return self.config.models.default_version

    # -------------------------------------------------------------------------------------------- Serve
    def _deploy(self, new: Any, what: str) -> None:
        import os

        import ray

        from services import app

        if not ray.is_initialized():
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # as `ola serve` runs its local cluster
            ray.init(address=self.ray_address, namespace=self.namespace, log_to_driver=False)
        try:
            app.deploy(new)
        except Exception as exc:
            raise DeployError(f"local Serve: {what}: the deploy failed: {type(exc).__name__}: {exc}") from exc
        self.config = new

    def replica_versions(self, calls_per_app: int = 4) -> list[list[str]]:
        """``loaded_versions`` of the model applications' replicas (a few calls each, to reach several replicas)."""
        from ray import serve

        seen: dict[str, list[str]] = {}
        for name in MODEL_APPS:
            handle = serve.get_app_handle(name)
            for _ in range(calls_per_app):
                info = handle.replica_info.remote().result(timeout_s=60)
                seen[info["replica_id"]] = list(info["loaded_versions"])
        return list(seen.values())

    def _wait(self, done: Callable[[list[str], list[list[str]]], bool], what: str) -> None:
        from services.client import OlaClient

        deadline = time.monotonic() + self.timeout_s
        listed: list[str] = []
        loaded: list[list[str]] = []
        with OlaClient(self.grpc_address, timeout=60) as client:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    client.wait_ready(timeout=max(1.0, remaining))
                except TimeoutError as exc:
                    raise DeployTimeout(f"local Serve: {what}: {exc}") from None
                listed = [v.model_version for v in client.list_model_versions().versions]
                loaded = self.replica_versions()
                if done(listed, loaded):
                    return
                if time.monotonic() >= deadline:
                    raise DeployTimeout(
                        f"local Serve: {what}: not done after {self.timeout_s:g} s: the gateway lists {listed}, "
                        f"the model replicas have loaded {loaded}"
                    )
                time.sleep(self.poll_s)


# ------------------------------------------------------------------------------------------------ the rollout
class DeployingController:
    """A :class:`RolloutController` whose versions are brought up before they get traffic and removed after.

    - :meth:`start_rollout`: the challenger (and the champion, if it is not served) is brought up first, then the
      controller's own ``start_rollout`` gives it its first share; if that fails, a challenger brought up for it is
      removed again.
    - :meth:`tick`, :meth:`promote`, :meth:`abort`: the controller's, followed by :meth:`reconcile`.
    - :meth:`reconcile` (idempotent): after a rollback or abort the challenger is removed; after a promotion the new
      champion becomes the default version and the previous one is removed once ``keep_previous_s`` seconds have
      passed since the promotion (sessions pinned to it can finish); a running rollout whose challenger is not served
      (started by someone else) gets it brought up. The registry's current champion and the default version are
      never removed. A failing reconcile is logged and retried by the next tick.

    Args:
        controller: the rollout controller (its behaviour is unchanged).
        deployer: where the versions are served.
        source_of: ``source_of(registry_version) -> Source`` (e.g. :func:`registry_source`).
        keep_previous_s: how long the previous champion stays served after a promotion (default: the gateway's
            default session TTL, so sessions pinned to it can finish).
    """

    def __init__(
        self,
        controller: RolloutController,
        deployer: VersionDeployer,
        source_of: Callable[[str], Source],
        *,
        keep_previous_s: float = 3600.0,
    ) -> None:
        if keep_previous_s < 0:
            raise ValueError(f"keep_previous_s: must be >= 0 seconds, got {keep_previous_s}")
        self.controller = controller
        self.deployer = deployer
        self.source_of = source_of
        self.keep_previous_s = keep_previous_s
        self.last_error: str | None = None

    @property
    def model_name(self) -> str:
        return self.controller.model_name

    def state(self) -> RolloutState | None:
        return self.controller.state()

    # -------------------------------------------------------------------------------------------- operations
    def start_rollout(self, challenger: str | None = None, now: float | None = None) -> RolloutState:
        """Bring the challenger up, then start the rollout (see :meth:`RolloutController.start_rollout`).

        Raises:
            GateNotPassed, RolloutError, RolloutConflict: as the controller (checked before anything is deployed).
            DeployError: the challenger could not be brought up (no rollout is started).
        """
        c, name = self.controller, self.model_name
        nominated, champion, _ = c.check_start(challenger)
        served = self.deployer.served_versions()
        champion_serving, challenger_serving = c.serving_version(champion), c.serving_version(nominated)
        if champion_serving not in served:
            log.warning("%s: champion %s is not served; bringing it up too", name, champion_serving)
            self.deployer.ensure_version(champion_serving, self.source_of(champion))
        self.deployer.ensure_version(challenger_serving, self.source_of(nominated))
        try:
            return c.start_rollout(nominated, now)
        except Exception:
            if challenger_serving not in served:  # brought up for this rollout only
                try:
                    self.deployer.remove_version(challenger_serving)
                except Exception:
                    log.exception("%s: could not remove %s after the failed start", name, challenger_serving)
            raise

    def tick(self, now: float | None = None) -> Decision:
        decision = self.controller.tick(now)
        if decision.action not in ("hold", "skipped"):
            self._reconcile_logged(now)
        return decision

    def promote(self, reason: str = "manual promote", now: float | None = None) -> RolloutState:
        state = self.controller.promote(reason, now)
        self._reconcile_logged(now)
        return state

    def abort(self, reason: str = "manual abort", now: float | None = None) -> RolloutState:
        state = self.controller.abort(reason, now)
        self._reconcile_logged(now)
        return state

    def run_controller(
        self, interval: float = 5.0, stop: threading.Event | None = None, max_ticks: int | None = None
    ) -> None:
        """Tick (and reconcile) every ``interval`` seconds until ``stop`` is set; errors are logged."""
        tick_forever(
            self.controller.tick, self.model_name, interval, stop, max_ticks, after=lambda: self._reconcile_logged(None)
        )

    # -------------------------------------------------------------------------------------------- reconciling
    def _reconcile_logged(self, now: float | None) -> None:
        try:
            self.reconcile(now)
            self.last_error = None
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("%s: reconciling the served versions failed (retried on the next tick)", self.model_name)

    def reconcile(self, now: float | None = None) -> list[str]:
        """Make the served versions match the rollout's state; returns what was done (``"remove ola@3"``, ...)."""
        c = self.controller
        now = c.clock() if now is None else now
        state = c.state()
        if state is None:
            return []
        served = self.deployer.served_versions()
        done: list[str] = []
        if state.status in ("running", "promoting"):
            if state.challenger_serving not in served:
                log.warning("%s: rollout %s has a challenger that is not served", self.model_name, state.id)
                self.deployer.ensure_version(state.challenger_serving, self.source_of(state.challenger_version))
                done.append(f"ensure {state.challenger_serving}")
            return done
        if state.status in ("rolled_back", "aborted"):
            if self._removable(state.challenger_serving, served):
                self.deployer.remove_version(state.challenger_serving)
                done.append(f"remove {state.challenger_serving}")
            return done
        # promoted: the challenger is the champion now
        if state.challenger_serving in served and self.deployer.default_version() != state.challenger_serving:
            self.deployer.set_default_version(state.challenger_serving)
            done.append(f"default {state.challenger_serving}")
        promoted_at = max((e.ts for e in state.events if e.action == "promoted"), default=state.updated_at)
        if now - promoted_at >= self.keep_previous_s and self._removable(state.champion_serving, served):
            self.deployer.remove_version(state.champion_serving)
            done.append(f"remove {state.champion_serving}")
        return done

    def _removable(self, serving: str, served: list[str]) -> bool:
        if serving not in served:
            return False
        champion = self.controller.aliases.get_alias(self.model_name, CHAMPION)
        if champion is not None and self.controller.serving_version(champion) == serving:
            return False
        return self.deployer.default_version() != serving
