"""API keys for the control-plane API: creation, revocation, lookup, and the gRPC server interceptor.

A key is ``ola_<key id>_<secret>``: the key id (12 hex characters) is public and names the Redis record, the secret
(32 random bytes, URL-safe base64) is shown once at creation and never stored. Redis keeps, per key::

    <prefix>apikey:<key id>   hash: name, role, salt, digest, created_at, revoked_at
    <prefix>apikeys           set of every key id

``digest`` is HMAC-SHA256 over ``salt || secret`` keyed with the server's pepper (``OLA_API_KEY_PEPPER``; empty
means none, which leaves a salted SHA-256). A fast hash is right here: the secrets are 256-bit random strings, not
passwords, so there is nothing to brute-force; the salt keeps equal digests from ever meeting, the pepper keeps a
leaked Redis dump from being checked offline.

Roles are ordered ``read < trigger < admin``; a key may call every method whose required role is at most its own.
The :class:`ApiKeyInterceptor` looks up the ``x-api-key`` metadata of every call: none, unknown or revoked gives
UNAUTHENTICATED, a role too low gives PERMISSION_DENIED, methods without a required role (anything outside
:data:`METHOD_ROLES`) are refused (fail closed), and health checks and reflection are open. Servicers read the
caller with :func:`current_principal`.
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import redis.asyncio as aioredis
import redis.exceptions

from workflows.api.errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)

API_KEY_METADATA = "x-api-key"
DEFAULT_PREFIX = "ola:api:"
KEY_PREFIX = "ola_"
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class Role(enum.IntEnum):
    """What a key may do; a higher role includes the lower ones."""

    READ = 1  # list and watch runs, list model versions, read rollouts
    TRIGGER = 2  # start and cancel runs, gate-checked promotion to challenger, abort a rollout
    ADMIN = 3  # force a version to champion, start and manually promote rollouts

    @classmethod
    def parse(cls, value: str | Role) -> Role:
        """``"read"`` / ``"trigger"`` / ``"admin"`` (any case) to a Role; ValueError naming the choices otherwise."""
        if isinstance(value, Role):
            return value
        try:
            return cls[str(value).upper()]
        except KeyError:
            raise ValueError(f"role must be one of read, trigger, admin (got {value!r})") from None

    @property
    def label(self) -> str:
        return self.name.lower()


# The role each RPC needs. PromoteVersion with force_champion additionally needs ADMIN (checked by the servicer).
METHOD_ROLES: dict[str, Role] = {
    "/ola.pipeline.v1.PipelineService/StartRun": Role.TRIGGER,
    "/ola.pipeline.v1.PipelineService/GetRun": Role.READ,
    "/ola.pipeline.v1.PipelineService/ListRuns": Role.READ,
    "/ola.pipeline.v1.PipelineService/WatchRun": Role.READ,
    "/ola.pipeline.v1.PipelineService/CancelRun": Role.TRIGGER,
    "/ola.models.v1.ModelService/ListVersions": Role.READ,
    "/ola.models.v1.ModelService/PromoteVersion": Role.TRIGGER,
    "/ola.models.v1.ModelService/StartRollout": Role.ADMIN,
    "/ola.models.v1.ModelService/GetRollout": Role.READ,
    "/ola.models.v1.ModelService/AbortRollout": Role.TRIGGER,
    "/ola.models.v1.ModelService/PromoteRollout": Role.ADMIN,
}
# Methods anyone may call: load-balancer health probes and schema discovery.
PUBLIC_METHOD_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


@dataclass(frozen=True)
class ApiKeyInfo:
    """What is known about a key, without its secret."""

    key_id: str
    name: str
    role: Role
    created_at: float
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "name": self.name,
            "role": self.role.label,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }


def hash_secret(secret: str, salt: bytes, pepper: bytes = b"") -> str:
    """Hex HMAC-SHA256 of ``salt || secret`` keyed with ``pepper`` (what Redis stores instead of the secret)."""
    return hmac.new(pepper, salt + secret.encode(), hashlib.sha256).hexdigest()


def parse_key(presented: str) -> tuple[str, str] | None:
    """(key id, secret) of a presented key, or None when it is not shaped like ``ola_<12 hex>_<secret>``."""
    if not presented.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = presented[len(KEY_PREFIX) :].partition("_")
    if not sep or not _KEY_ID.match(key_id) or not secret:
        return None
    return key_id, secret


class ApiKeyStore:
    """API keys in Redis (see the module docstring for the layout)."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX, pepper: bytes | str = b"") -> None:
        self.redis = client
        self.prefix = prefix
        self.pepper = pepper.encode() if isinstance(pepper, str) else pepper

    def _key(self, key_id: str) -> str:
        return f"{self.prefix}apikey:{key_id}"

    @property
    def _index(self) -> str:
        return f"{self.prefix}apikeys"

    async def create(self, name: str, role: str | Role) -> tuple[ApiKeyInfo, str]:
        """Make a key. Returns its info and the plaintext key, which is shown once and not stored anywhere."""
        if not _NAME.match(name or ""):
            raise InvalidArgument(f"must be 1 to 64 characters of [A-Za-z0-9_.@-] (got {name!r})", field="name")
        try:
            role = Role.parse(role)
        except ValueError as exc:
            raise InvalidArgument(str(exc), field="role") from None
        salt = secrets.token_bytes(16)
        secret = secrets.token_urlsafe(32)
        while True:
            key_id = secrets.token_hex(6)
            info = ApiKeyInfo(key_id=key_id, name=name, role=role, created_at=time.time())
            fields = {
                "name": name,
                "role": role.label,
                "salt": salt.hex(),
                "digest": hash_secret(secret, salt, self.pepper),
                "created_at": repr(info.created_at),
            }
            if await self.redis.exists(self._key(key_id)):
                continue  # a 48-bit id collision: draw another
            async with self.redis.pipeline(transaction=True) as pipe:  # the record and its index entry, or neither
                pipe.hset(self._key(key_id), mapping=fields)
                pipe.sadd(self._index, key_id)
                await pipe.execute()
            break
        log.info("created API key %s (%s, role %s)", key_id, name, role.label)
        return info, f"{KEY_PREFIX}{key_id}_{secret}"

    async def get(self, key_id: str) -> ApiKeyInfo:
        """The info of a key (revoked ones too). NotFound for an unknown id."""
        raw = await self.redis.hgetall(self._key(key_id)) if _KEY_ID.match(key_id or "") else {}
        if not raw:
            raise NotFound(f"no API key with id {key_id!r}", field="key_id")
        return _info(key_id, raw)

    async def revoke(self, key_id: str) -> ApiKeyInfo:
        """Revoke a key for good: its digest is deleted, its record kept (marked revoked) for the audit trail."""
        info = await self.get(key_id)
        if info.revoked:
            return info
        now = time.time()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self._key(key_id), "digest", "salt")
            pipe.hset(self._key(key_id), "revoked_at", repr(now))
            await pipe.execute()
        log.info("revoked API key %s (%s)", key_id, info.name)
        return ApiKeyInfo(info.key_id, info.name, info.role, info.created_at, now)

    async def list(self, *, include_revoked: bool = False) -> list[ApiKeyInfo]:
        """Every key, oldest first (revoked ones only with ``include_revoked``)."""
        ids = sorted(await self.redis.smembers(self._index))
        infos = []
        for key_id in ids:
            key_id = key_id.decode() if isinstance(key_id, bytes) else key_id
            raw = await self.redis.hgetall(self._key(key_id))
            if raw:
                info = _info(key_id, raw)
                if include_revoked or not info.revoked:
                    infos.append(info)
        return sorted(infos, key=lambda i: (i.created_at, i.key_id))

    async def authenticate(self, presented: str) -> ApiKeyInfo | None:
        """The key's info when ``presented`` is a live key, else None (malformed, unknown, revoked, wrong secret)."""
        parsed = parse_key(presented)
        if parsed is None:
            return None
        key_id, secret = parsed
        raw = await self.redis.hgetall(self._key(key_id))
        if not raw:
            return None
        fields = _decoded(raw)
        digest, salt = fields.get("digest"), fields.get("salt")
        if not digest or not salt or fields.get("revoked_at"):
            return None
        if not hmac.compare_digest(hash_secret(secret, bytes.fromhex(salt), self.pepper), digest):
            return None
        return _info(key_id, raw)


def _decoded(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()
    }


def _info(key_id: str, raw: Mapping[Any, Any]) -> ApiKeyInfo:
    fields = _decoded(raw)
    revoked = fields.get("revoked_at")
    return ApiKeyInfo(
        key_id=key_id,
        name=fields.get("name", ""),
        role=Role.parse(fields.get("role", "read")),
        created_at=float(fields.get("created_at", 0.0)),
        revoked_at=float(revoked) if revoked else None,
    )


# ------------------------------------------------------------------------------------------------ the interceptor
_PRINCIPAL: contextvars.ContextVar[ApiKeyInfo | None] = contextvars.ContextVar("ola_api_principal", default=None)


def current_principal() -> ApiKeyInfo | None:
    """The key of the call being served (set by :class:`ApiKeyInterceptor`); None outside an authenticated call."""
    return _PRINCIPAL.get()


def require_role(role: Role, what: str) -> ApiKeyInfo:
    """The current caller, if its role is at least ``role``; PermissionDenied otherwise."""
    from workflows.api.errors import PermissionDenied

    principal = current_principal()
    if principal is None or principal.role < role:
        have = principal.role.label if principal else "none"
        raise PermissionDenied(f"{what} needs role {role.label}; this API key has role {have}")
    return principal


def _metadata_value(metadata: Any, key: str) -> str | None:
    for item in metadata or ():
        k, v = item
        if k == key:
            return v.decode() if isinstance(v, bytes) else v
    return None


def _denying_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers every call with ``code``."""

    async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext):
        await context.abort(code, message)
        yield  # pragma: no cover  (makes this an async generator)

    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny_unary, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny_unary, **kwargs)


def _with_principal(handler: grpc.RpcMethodHandler, principal: ApiKeyInfo) -> grpc.RpcMethodHandler:
    """``handler`` with :func:`current_principal` set while its behaviour runs."""
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = _PRINCIPAL.set(principal)
            try:
                return await inner(request, context)
            finally:
                _PRINCIPAL.reset(token)

        return handler._replace(unary_unary=unary_unary)
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext):
            token = _PRINCIPAL.set(principal)
            try:
                async for item in inner_stream(request, context):
                    yield item
            finally:
                _PRINCIPAL.reset(token)

        return handler._replace(unary_stream=unary_stream)
    return handler  # client-streaming methods: none in these services


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call by its ``x-api-key`` metadata and checks the method's required role."""

    def __init__(
        self,
        keys: ApiKeyStore,
        method_roles: Mapping[str, Role] | None = None,
        public_prefixes: tuple[str, ...] = PUBLIC_METHOD_PREFIXES,
    ) -> None:
        self.keys = keys
        self.method_roles = dict(METHOD_ROLES if method_roles is None else method_roles)
        self.public_prefixes = public_prefixes

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self.public_prefixes):
            return handler
        required = self.method_roles.get(method)
        if required is None:
            return _denying_handler(handler, grpc.StatusCode.PERMISSION_DENIED, f"{method} is not open to API keys")
        presented = _metadata_value(handler_call_details.invocation_metadata, API_KEY_METADATA)
        if not presented:
            return _denying_handler(
                handler, grpc.StatusCode.UNAUTHENTICATED, f"no API key: send one in the {API_KEY_METADATA} metadata"
            )
        try:
            principal = await self.keys.authenticate(presented)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            log.warning("API key lookup failed: %s", exc)
            return _denying_handler(handler, grpc.StatusCode.UNAVAILABLE, "the API key store (Redis) is unreachable")
        if principal is None:
            return _denying_handler(handler, grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked API key")
        if principal.role < required:
            return _denying_handler(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method.rsplit('/', 1)[-1]} needs role {required.label}; "
                f"API key {principal.name!r} has role {principal.role.label}",
            )
        return _with_principal(handler, principal)
