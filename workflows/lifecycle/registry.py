"""The MLflow model registry for stage outputs: every finished stage of a pipeline run becomes a version of one
registered model (default ``ola``), with its lineage in tags, and aliases (``champion``, ``challenger``) name the
versions that serve. MLflow's stages (Staging / Production) are deprecated; aliases replace them.

A version's ``source`` is a complete artifact (:mod:`workflows.artifacts`: the checkpoint files plus a manifest
written last): the configured artifact store (S3 / MinIO), the stage run's ``checkpoint`` artifact (proxied by the
tracking server), or a local store. Registration checks the artifact is complete *before* creating the version, and
a version whose creation fails midway is deleted, so a registered version is always downloadable.

Tags of a version (all strings):

========================  ==============================================================================
``stage``                 the stage name (``1a``)
``pipeline_id``           the pipeline run (``OUT/pipeline.json``); with ``stage``, the idempotency key
``parent_version``        the version registered for the previous stage of the same pipeline run ('' if none)
``dataset_manifest_hash`` sha256 of the stage data's ``manifest.json`` ('' if the data has none)
``code_revision``         the git commit (``+dirty`` with local changes), else ``ola-platform==<version>``
``config_name``           the training config's name (when given)
``eval.<metric>``         an evaluation metric of the stage output (when given)
========================  ==============================================================================
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workflows.artifacts import ArtifactError, ArtifactStore, check_key, open_store
from workflows.lifecycle.errors import InvalidAlias, ModelNotFound, RegistrationError, RegistryError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "ola"
ALIASES = ("champion", "challenger")  # the conventional aliases: serving, and the candidate under evaluation
TAG_STAGE = "stage"
TAG_PIPELINE = "pipeline_id"
TAG_PARENT = "parent_version"
TAG_DATASET = "dataset_manifest_hash"
TAG_CODE = "code_revision"
TAG_CONFIG = "config_name"
EVAL_PREFIX = "eval."
_ALIAS = re.compile(r"^[a-z][a-z0-9_-]{0,254}$")
_RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,255}$")


# ------------------------------------------------------------------------------------------------ lineage helpers
def dataset_manifest_hash(data_root: str | Path) -> str | None:
    """sha256 of ``<data_root>/manifest.json`` (the dataset's identity, ``workflows.data.manifest``), or None."""
    path = Path(data_root) / "manifest.json"
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code_revision() -> str:
    """The git commit of this checkout (``+dirty`` when tracked files changed), else the installed package version."""
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        if re.fullmatch(r"[0-9a-f]{40}", commit):
            return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"ola-platform=={version('ola-platform')}"
    except PackageNotFoundError:
        return "unknown"


def check_model_name(name: str) -> str:
    """A registered model name: letters, digits, '.', '_', '-' (it appears in ``models:/<name>@alias`` URIs)."""
    if not isinstance(name, str) or not _MODEL_NAME.match(name):
        raise RegistryError(f"model name {name!r} must match {_MODEL_NAME.pattern}")
    return name


def check_alias(alias: str) -> str:
    """An alias: lowercase letters, digits, '_', '-'; not ``latest`` or ``v<N>`` (MLflow reserves them)."""
    if not isinstance(alias, str) or not _ALIAS.match(alias) or _RESERVED_ALIAS.match(alias):
        raise InvalidAlias(
            f"alias {alias!r} must match {_ALIAS.pattern} and not be 'latest' or 'v<number>' "
            f"(the conventional aliases are {list(ALIASES)})"
        )
    return alias


# ----------------------------------------------------------------------------------------------------- versions
@dataclass(frozen=True)
class VersionInfo:
    """A registered model version as this module reports it."""

    name: str
    version: str
    source: str  # a complete artifact URI (s3://..., mlflow-artifacts:/..., or a directory)
    run_id: str | None
    status: str  # READY once usable
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    created_ms: int = 0

    @property
    def stage(self) -> str | None:
        return self.tags.get(TAG_STAGE)

    @property
    def parent_version(self) -> str | None:
        return self.tags.get(TAG_PARENT) or None

    @property
    def eval_metrics(self) -> dict[str, float]:
        """The ``eval.<metric>`` tags as numbers."""
        out = {}
        for key, value in self.tags.items():
            if key.startswith(EVAL_PREFIX):
                try:
                    out[key[len(EVAL_PREFIX) :]] = float(value)
                except ValueError:
                    continue
        return out

    @property
    def uri(self) -> str:
        """``models:/<name>/<version>``."""
        return f"models:/{self.name}/{self.version}"


def _info(mv: Any, aliases: tuple[str, ...] | None = None) -> VersionInfo:
    return VersionInfo(
        name=mv.name,
        version=str(mv.version),
        source=mv.source,
        run_id=mv.run_id or None,
        status=str(mv.status),
        tags=dict(mv.tags or {}),
        aliases=tuple(mv.aliases or ()) if aliases is None else aliases,
        created_ms=int(mv.creation_timestamp or 0),
    )


def _not_found(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "")
    text = str(exc).lower()
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or (
        code == "INVALID_PARAMETER_VALUE" and "not found" in text
    )


class ModelRegistry:
    """The registry behind one MLflow tracking URI (the registry URI is the same).

    Args:
        tracking_uri: an MLflow tracking URI (``http://host:5000``, ``sqlite:///...``); None: MLflow's default
            (``MLFLOW_TRACKING_URI``).
        s3_endpoint_url: the S3 / MinIO endpoint for ``s3://`` sources (default: ``OLA_S3_ENDPOINT_URL``, then
            ``MLFLOW_S3_ENDPOINT_URL``).
    """

    def __init__(self, tracking_uri: str | None = None, *, s3_endpoint_url: str | None = None) -> None:
        import mlflow
        from mlflow.exceptions import MlflowException

        self._exc = MlflowException
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self.client = mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self.s3_endpoint_url = s3_endpoint_url

    # ---- lookups
    def list_versions(self, name: str = DEFAULT_MODEL_NAME) -> list[VersionInfo]:
        """Every version of ``name``, oldest first, with aliases. Raises ModelNotFound for an unknown model."""
        check_model_name(name)
        aliases = self._aliases(name)
        versions = self._search(f"name = '{name}'")
        by_version: dict[str, list[str]] = {}
        for alias, version in aliases.items():
            by_version.setdefault(version, []).append(alias)
        return [_info(mv, tuple(sorted(by_version.get(str(mv.version), ())))) for mv in versions]

    def get_version(self, name: str, version: str | int) -> VersionInfo:
        """One version (tags, aliases, source). Raises ModelNotFound."""
        check_model_name(name)
        version = str(version)
        if not version.isdigit():
            raise ModelNotFound(f"model {name!r}: {version!r} is not a version number (use get_alias for aliases)")
        try:
            return _info(self.client.get_model_version(name, version))
        except self._exc as exc:
            if _not_found(exc):
                raise ModelNotFound(f"model {name!r} has no version {version}") from exc
            raise RegistryError(f"model {name!r} version {version}: {exc}") from exc

    def get_alias(self, name: str, alias: str) -> VersionInfo:
        """The version ``alias`` points to. Raises ModelNotFound for an unknown model or alias."""
        check_model_name(name)
        check_alias(alias)
        try:
            return _info(self.client.get_model_version_by_alias(name, alias))
        except self._exc as exc:
            if _not_found(exc):
                known = sorted(self._aliases(name)) if self._model_exists(name) else None
                where = f"has no alias {alias!r} (aliases: {known})" if known is not None else "is not registered"
                raise ModelNotFound(f"model {name!r} {where}") from exc
            raise RegistryError(f"model {name!r} alias {alias!r}: {exc}") from exc

    def resolve(self, name: str, version_or_alias: str | int) -> VersionInfo:
        """A version number (``3``) or an alias (``champion``) to its version."""
        ref = str(version_or_alias)
        return self.get_version(name, ref) if ref.isdigit() else self.get_alias(name, ref)

    def find_version(self, name: str, *, pipeline_id: str, stage: str) -> VersionInfo | None:
        """The READY version registered for ``stage`` of pipeline run ``pipeline_id``, or None."""
        check_model_name(name)
        found = [mv for mv in self._search(_stage_filter(name, pipeline_id, stage)) if str(mv.status) == "READY"]
        return _info(found[-1]) if found else None

    # ---- aliases
    def set_alias(self, name: str, alias: str, version: str | int) -> VersionInfo:
        """Point ``alias`` at ``version`` (moving it if it pointed elsewhere). Returns the version."""
        check_alias(alias)
        info = self.get_version(name, version)
        try:
            self.client.set_registered_model_alias(name, alias, info.version)
        except self._exc as exc:
            raise RegistryError(f"model {name!r}: cannot set alias {alias!r} to version {info.version}: {exc}") from exc
        log.info("model %s: alias %s -> version %s", name, alias, info.version)
        return self.get_version(name, info.version)

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove ``alias``. Raises ModelNotFound when it does not exist."""
        self.get_alias(name, alias)
        try:
            self.client.delete_registered_model_alias(name, alias)
        except self._exc as exc:
            raise RegistryError(f"model {name!r}: cannot delete alias {alias!r}: {exc}") from exc
        log.info("model %s: alias %s removed", name, alias)

    # ---- download
    def download_version(
        self, name: str, version_or_alias: str | int, dest: str | Path, *, overwrite: bool = False
    ) -> Path:
        """Download a version's checkpoint into ``dest`` (atomically, every file checked against its manifest).

        Returns:
            ``dest``, a checkpoint directory ``ola_model.load_checkpoint`` loads.
        Raises:
            ModelNotFound: unknown model, version or alias. RegistryError: the stored artifact is missing or damaged.
        """
        info = self.resolve(name, version_or_alias)
        try:
            store = open_store(info.source, endpoint_url=self.s3_endpoint_url, tracking_uri=self.tracking_uri)
            out = store.download_dir("", dest, overwrite=overwrite)
        except ArtifactError as exc:
            raise RegistryError(f"model {name!r} version {info.version} ({info.source}): {exc}") from exc
        if not (out / "config.json").is_file():
            raise RegistryError(f"model {name!r} version {info.version}: {info.source} is not an Ola checkpoint")
        log.info("model %s version %s downloaded to %s", name, info.version, out)
        return out

    # ---- registration
    def register_stage_output(
        self,
        model_dir: str | Path,
        *,
        stage: str,
        pipeline_id: str,
        name: str = DEFAULT_MODEL_NAME,
        source: str | None = None,
        store: ArtifactStore | None = None,
        run_id: str | None = None,
        parent_version: str | int | None = None,
        dataset_hash: str | None = None,
        code_rev: str | None = None,
        config_name: str | None = None,
        eval_metrics: Mapping[str, float] | None = None,
        description: str | None = None,
    ) -> str:
        """Register a finished stage's checkpoint as a version of ``name``; idempotent per (pipeline run, stage).

        Args:
            model_dir: the stage's output checkpoint directory (``OUT/stages/<stage>/model``).
            source: where the checkpoint already is, as a complete artifact (the artifact store's URI of it, or the
                stage run's ``checkpoint`` artifact); it is verified, not re-uploaded.
            store: with no ``source``: the store to upload ``model_dir`` to (key
                ``registry/<name>/<pipeline_id>/<stage>``).
            run_id: the stage's MLflow run (the version links to it).
            parent_version: the version registered for the previous stage of this pipeline run.
            dataset_hash / code_rev: lineage tags (default: ``code_revision()``; no dataset hash).
            eval_metrics: numbers tagged ``eval.<metric>``.
        Returns:
            the version number (a string). A second call for the same (pipeline_id, stage) returns the same version.
        Raises:
            RegistrationError: the checkpoint is not a checkpoint, its artifact is incomplete, or the registry failed
                (any half-made version is deleted first).
        """
        check_model_name(name)
        if not pipeline_id or not stage:
            raise RegistrationError(
                f"register_stage_output needs pipeline_id and stage (got {pipeline_id!r}, {stage!r})"
            )
        model_dir = Path(model_dir)
        existing = self.find_version(name, pipeline_id=pipeline_id, stage=stage)
        if existing is not None:
            log.info("stage %s of pipeline %s is already %s version %s", stage, pipeline_id, name, existing.version)
            return existing.version
        self._delete_unfinished(name, pipeline_id, stage)
        if not (model_dir / "config.json").is_file():
            raise RegistrationError(f"stage {stage}: {model_dir} is not a checkpoint directory (no config.json)")
        source = self._complete_source(model_dir, name, pipeline_id, stage, source, store)
        tags = {
            TAG_STAGE: stage,
            TAG_PIPELINE: pipeline_id,
            TAG_PARENT: str(parent_version) if parent_version is not None else "",
            TAG_DATASET: dataset_hash or "",
            TAG_CODE: code_rev or code_revision(),
        }
        if config_name:
            tags[TAG_CONFIG] = config_name
        for metric, value in (eval_metrics or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                tags[f"{EVAL_PREFIX}{metric}"] = repr(float(value))
        self._ensure_model(name)
        return self._create_version(name, source, run_id, tags, description, pipeline_id, stage)

    # ---- internals
    def _complete_source(
        self, model_dir: Path, name: str, pipeline_id: str, stage: str, source: str | None, store: ArtifactStore | None
    ) -> str:
        """A verified, complete artifact URI of the checkpoint (uploading it to ``store`` when no source is given)."""
        try:
            if source is None:
                if store is None:
                    raise RegistrationError(
                        f"stage {stage}: nowhere to keep the checkpoint; give source (a complete artifact URI) or store"
                    )
                key = check_key(f"registry/{name}/{pipeline_id}/{stage}")
                return store.upload_dir(model_dir, key, overwrite=True)
            src_store = open_store(source, endpoint_url=self.s3_endpoint_url, tracking_uri=self.tracking_uri)
            manifest = src_store.manifest("")
        except ArtifactError as exc:
            raise RegistrationError(
                f"stage {stage}: its checkpoint artifact is not complete, not registering: {exc}"
            ) from exc
        if "config.json" not in manifest["files"]:
            raise RegistrationError(f"stage {stage}: {source} holds no config.json; not an Ola checkpoint")
        return source

    def _create_version(
        self,
        name: str,
        source: str,
        run_id: str | None,
        tags: dict[str, str],
        description: str | None,
        pipeline_id: str,
        stage: str,
    ) -> str:
        mv = None
        try:
            mv = self.client.create_model_version(
                name, source, run_id=run_id, tags=tags, description=description, await_creation_for=120
            )
            mv = self.client.get_model_version(name, str(mv.version))
            if str(mv.status) != "READY":
                raise RegistrationError(f"model {name!r} version {mv.version} is {mv.status}, not READY")
            missing = {k for k, v in tags.items() if (mv.tags or {}).get(k) != v}
            if missing:
                raise RegistrationError(f"model {name!r} version {mv.version}: tags {sorted(missing)} were not stored")
        except BaseException as exc:
            self._delete_unfinished(name, pipeline_id, stage, also_ready=True)
            if isinstance(exc, RegistrationError) or not isinstance(exc, Exception):
                raise
            raise RegistrationError(f"registering stage {stage} of pipeline {pipeline_id} as {name!r}: {exc}") from exc
        log.info(
            "registered stage %s of pipeline %s as %s version %s (%s)", stage, pipeline_id, name, mv.version, source
        )
        return str(mv.version)

    def _delete_unfinished(self, name: str, pipeline_id: str, stage: str, also_ready: bool = False) -> None:
        """Delete versions of (pipeline_id, stage) that never became READY (or all of them, after a failure)."""
        try:
            found = self._search(_stage_filter(name, pipeline_id, stage))
        except ModelNotFound:
            return
        for mv in found:
            if also_ready or str(mv.status) != "READY":
                log.warning("deleting half-registered %s version %s (%s)", name, mv.version, mv.status)
                try:
                    self.client.delete_model_version(name, str(mv.version))
                except self._exc:
                    log.warning("could not delete %s version %s", name, mv.version, exc_info=True)

    def _search(self, filter_string: str) -> list[Any]:
        versions: list[Any] = []
        token = None
        while True:
            try:
                page = self.client.search_model_versions(filter_string, max_results=1000, page_token=token)
            except self._exc as exc:
                raise RegistryError(f"searching the registry at {self.tracking_uri} ({filter_string}): {exc}") from exc
            versions.extend(page)
            token = page.token
            if not token:
                break
        return sorted(versions, key=lambda mv: int(mv.version))

    def _model_exists(self, name: str) -> bool:
        try:
            self.client.get_registered_model(name)
            return True
        except self._exc as exc:
            if _not_found(exc):
                return False
            raise

    def _aliases(self, name: str) -> dict[str, str]:
        try:
            return {alias: str(v) for alias, v in self.client.get_registered_model(name).aliases.items()}
        except self._exc as exc:
            if _not_found(exc):
                raise ModelNotFound(f"model {name!r} is not registered") from exc
            raise

    def _ensure_model(self, name: str) -> None:
        if self._model_exists(name):
            return
        try:
            self.client.create_registered_model(name, description="Ola stage outputs (workflows.lifecycle.registry)")
        except self._exc as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise RegistrationError(f"cannot create registered model {name!r}: {exc}") from exc


def _quote(value: str) -> str:
    """A value inside a single-quoted MLflow filter string."""
    return str(value).replace("'", "\\'")


def _stage_filter(name: str, pipeline_id: str, stage: str) -> str:
    """The search filter of the versions of one (pipeline run, stage)."""
    return (
        f"name = '{_quote(name)}' and tags.{TAG_PIPELINE} = '{_quote(pipeline_id)}' "
        f"and tags.{TAG_STAGE} = '{_quote(stage)}'"
    )


# --------------------------------------------------------------------------------------------- module functions
def register_stage_output(model_dir: str | Path, *, tracking_uri: str | None = None, **kwargs: Any) -> str:
    """:meth:`ModelRegistry.register_stage_output` on the registry at ``tracking_uri``."""
    endpoint = kwargs.pop("s3_endpoint_url", None)
    return ModelRegistry(tracking_uri, s3_endpoint_url=endpoint).register_stage_output(model_dir, **kwargs)


def list_versions(name: str = DEFAULT_MODEL_NAME, *, tracking_uri: str | None = None) -> list[VersionInfo]:
    """:meth:`ModelRegistry.list_versions`."""
    return ModelRegistry(tracking_uri).list_versions(name)


def get_version(name: str, version: str | int, *, tracking_uri: str | None = None) -> VersionInfo:
    """:meth:`ModelRegistry.get_version`."""
    return ModelRegistry(tracking_uri).get_version(name, version)


def get_alias(name: str, alias: str, *, tracking_uri: str | None = None) -> VersionInfo:
    """:meth:`ModelRegistry.get_alias`."""
    return ModelRegistry(tracking_uri).get_alias(name, alias)


def set_alias(name: str, alias: str, version: str | int, *, tracking_uri: str | None = None) -> VersionInfo:
    """:meth:`ModelRegistry.set_alias`."""
    return ModelRegistry(tracking_uri).set_alias(name, alias, version)


def delete_alias(name: str, alias: str, *, tracking_uri: str | None = None) -> None:
    """:meth:`ModelRegistry.delete_alias`."""
    ModelRegistry(tracking_uri).delete_alias(name, alias)


def download_version(
    name: str,
    version_or_alias: str | int,
    dest: str | Path,
    *,
    tracking_uri: str | None = None,
    s3_endpoint_url: str | None = None,
    overwrite: bool = False,
) -> Path:
    """:meth:`ModelRegistry.download_version`."""
    return ModelRegistry(tracking_uri, s3_endpoint_url=s3_endpoint_url).download_version(
        name, version_or_alias, dest, overwrite=overwrite
    )


__all__ = [
    "ALIASES",
    "DEFAULT_MODEL_NAME",
    "ModelRegistry",
    "VersionInfo",
    "code_revision",
    "dataset_manifest_hash",
    "delete_alias",
    "download_version",
    "get_alias",
    "get_version",
    "list_versions",
    "register_stage_output",
    "set_alias",
]
