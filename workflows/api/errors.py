"""Errors of the control-plane API and their gRPC status codes.

Servicer code raises :class:`ApiError` subclasses; :func:`rpc_method` (a decorator for ``grpc.aio`` servicer methods,
unary or server-streaming) turns them into a status with the message prefixed by the field at fault and an
``ola.common.v1.ErrorDetail`` in the ``ola-error-detail-bin`` trailer, the same trailer the model services use.
Redis being unreachable becomes UNAVAILABLE; anything unexpected is logged with its traceback and becomes INTERNAL.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import grpc
import redis.exceptions

from services.gen.ola.common.v1 import errors_pb2

log = logging.getLogger(__name__)

ERROR_DETAIL_KEY = "ola-error-detail-bin"


class ApiError(Exception):
    """An error with a known status code. ``field`` names the request field at fault (empty if none)."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: int = errors_pb2.ERROR_REASON_UNSPECIFIED

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.message = message
        self.field = field


class InvalidArgument(ApiError):
    """A request field is invalid (INVALID_ARGUMENT)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = errors_pb2.ERROR_REASON_INVALID_FIELD


class NotFound(ApiError):
    """The named run, model or version does not exist (NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ApiError):
    """The request conflicts with the current state (FAILED_PRECONDITION)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(ApiError):
    """The caller's role is too low for the request (PERMISSION_DENIED)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(ApiError):
    """A dependency (Redis, the job backend, the model registry) cannot be reached (UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = errors_pb2.ERROR_REASON_OVERLOADED


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, errors_pb2.ErrorDetail | None]:
    """The status code, message and detail an exception is answered with."""
    if isinstance(exc, ApiError):
        detail = errors_pb2.ErrorDetail(reason=exc.reason, field=exc.field, message=str(exc))
        return exc.code, str(exc), detail
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return grpc.StatusCode.UNAVAILABLE, f"the run store (Redis) is unreachable: {exc}", None
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "timed out", None
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}", None


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    code, message, detail = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=exc)
    else:
        log.info("%s: %s %s", method, code.name, message)
    if detail is not None:
        context.set_trailing_metadata(((ERROR_DETAIL_KEY, detail.SerializeToString()),))
    await context.abort(code, message)


def rpc_method(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a ``grpc.aio`` servicer method (coroutine or async generator) so errors become statuses."""
    name = fn.__qualname__
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream(self, request, context):
            try:
                async for item in fn(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc, name)

        return stream

    @functools.wraps(fn)
    async def unary(self, request, context):
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, name)

    return unary
