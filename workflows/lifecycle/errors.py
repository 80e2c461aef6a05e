"""Errors of the model lifecycle (registry, promotion, rollout): each message names the model, version or alias."""

from __future__ import annotations


class LifecycleError(RuntimeError):
    """Base of the lifecycle's errors."""


class RegistryError(LifecycleError):
    """The model registry refused or failed an operation."""


class ModelNotFound(RegistryError, LookupError):
    """No such registered model, version, or alias."""


class InvalidAlias(RegistryError, ValueError):
    """An alias name MLflow would refuse (``latest``, ``v3``) or that is not a plain lowercase name."""


class RegistrationError(RegistryError):
    """A stage output could not be registered (its artifacts are incomplete, or the registry failed midway; a
    half-made version is deleted before this is raised)."""


__all__ = ["InvalidAlias", "LifecycleError", "ModelNotFound", "RegistrationError", "RegistryError"]
