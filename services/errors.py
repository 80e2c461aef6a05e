"""Errors of the model services and their gRPC status codes, in one place.

Servicer code raises exceptions and never calls ``context.abort`` itself; :func:`grpc_method` (a decorator for
``grpc.aio`` servicer methods, unary or streaming) turns any exception into a status code with an
``ola.common.v1.ErrorDetail`` in the ``ola-error-detail-bin`` trailer (:mod:`services.wire`), counts the RPC in the
servicer's metrics, and logs unexpected failures with their traceback. :func:`rpc_errors` does the same as an
``async with`` block, for code that is not a decorated servicer method.

The mapping (:func:`status_of`):

======================================================  ==================  ==================================
exception                                               code                ErrorReason
======================================================  ==================  ==================================
``ola_model`` ``LimitError`` (frames / audio / prompt)  INVALID_ARGUMENT    TOO_MANY_FRAMES / AUDIO_TOO_LONG /
                                                                            CONTEXT_OVERFLOW, with value + limit
``ola_model`` ``MediaError``                            INVALID_ARGUMENT    MEDIA_CORRUPT / MEDIA_UNSUPPORTED
``ola_model`` ``InputError``                            INVALID_ARGUMENT    INVALID_FIELD
:class:`PayloadTooLarge`                                RESOURCE_EXHAUSTED  PAYLOAD_TOO_LARGE
:class:`UnknownModelVersion`                            NOT_FOUND           UNKNOWN_MODEL_VERSION
:class:`VersionMismatch`                                FAILED_PRECONDITION VERSION_MISMATCH
``CheckpointError``, :class:`BackendUnavailable`        FAILED_PRECONDITION BACKEND_UNAVAILABLE
:class:`Unavailable`, a failed Ray replica               UNAVAILABLE         OVERLOADED
a downstream ``grpc.RpcError``                          its own code        its own detail
``TimeoutError``                                        DEADLINE_EXCEEDED   (none)
anything else                                           INTERNAL            (none; traceback logged)
======================================================  ==================  ==================================

The request field at fault travels in ``ErrorDetail.field`` and prefixes the status message (``images[1]: ...``).
``ola_model`` errors do not know the request's field names, so servicers wrap per-field work in :func:`at_field`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import grpc

from ola_model.errors import CheckpointError, InputError, LimitError, MediaError
from services.gen.ola.common.v1 import errors_pb2
from services.tts.backend import BackendUnavailable as TTSBackendUnavailable
from services.tts.backend import SynthesisError, TTSInputError
from services.wire import error_detail, error_metadata, read_error_detail

log = logging.getLogger(__name__)

_FIELD_ATTR = "ola_field"  # set on an exception by at_field(): the request field it concerns


class ServiceError(Exception):
    """An error with a known status code and ``ErrorDetail``. Subclasses fix the code and the default reason."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: int = errors_pb2.ERROR_REASON_UNSPECIFIED

    def __init__(
        self,
        message: str,
        *,
        field: str = "",
        value: float = 0.0,
        limit: float = 0.0,
        unit: str = "",
        reason: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.value = float(value)
        self.limit = float(limit)
        self.unit = unit
        if reason is not None:
            self.reason = reason


class InvalidArgument(ServiceError):
    """A request field is invalid (INVALID_ARGUMENT)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = errors_pb2.ERROR_REASON_INVALID_FIELD


class PayloadTooLarge(ServiceError):
    """A media item or message is larger than the server accepts (RESOURCE_EXHAUSTED); value / limit in bytes."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = errors_pb2.ERROR_REASON_PAYLOAD_TOO_LARGE


class UnknownModelVersion(ServiceError, LookupError):
    """The requested model version is not deployed (NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND
    reason = errors_pb2.ERROR_REASON_UNKNOWN_MODEL_VERSION


class VersionMismatch(ServiceError):
    """The request mixes model versions, e.g. a block of another version (FAILED_PRECONDITION)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = errors_pb2.ERROR_REASON_VERSION_MISMATCH


class BackendUnavailable(ServiceError):
    """A model version cannot be loaded or a backend is not configured (FAILED_PRECONDITION)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = errors_pb2.ERROR_REASON_BACKEND_UNAVAILABLE


class Unavailable(ServiceError):
    """Overloaded, or a replica / downstream service is down: retry with backoff (UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = errors_pb2.ERROR_REASON_OVERLOADED


@contextmanager
def at_field(field: str) -> Iterator[None]:
    """Attribute errors raised inside to the request field ``field`` (``images[1]``, ``video``, ``audio``).

    Only errors that do not name a field yet are annotated, so the innermost field wins.
    """
    try:
        yield
    except ServiceError as exc:
        if not exc.field:
            exc.field = field
        raise
    except Exception as exc:
        if not getattr(exc, _FIELD_ATTR, ""):
            setattr(exc, _FIELD_ATTR, field)
        raise


_UNSUPPORTED_MEDIA = ("no video stream", "no audio stream", "not a recognised", "not a video", "unsupported")


def _media_reason(exc: MediaError) -> int:
    text = exc.reason.lower()
    if any(marker in text for marker in _UNSUPPORTED_MEDIA):
        return errors_pb2.ERROR_REASON_MEDIA_UNSUPPORTED
    return errors_pb2.ERROR_REASON_MEDIA_CORRUPT


def _limit_reason(exc: LimitError) -> tuple[int, str]:
    what = exc.what.lower()
    if "prompt" in what or "context" in what or "max_new_tokens" in what:
        return errors_pb2.ERROR_REASON_CONTEXT_OVERFLOW, "tokens"
    if "frame" in what:
        return errors_pb2.ERROR_REASON_TOO_MANY_FRAMES, "frames"
    if "audio" in what:
        return errors_pb2.ERROR_REASON_AUDIO_TOO_LONG, "seconds" if "second" in what else "chunks"
    return errors_pb2.ERROR_REASON_INVALID_FIELD, ""


def _is_replica_failure(exc: BaseException) -> bool:
    """A Ray actor / worker failure (checked without importing Ray)."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    if ray_exceptions is None:
        return False
    kinds = tuple(
        getattr(ray_exceptions, name)
        for name in ("RayActorError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError")
        if hasattr(ray_exceptions, name)
    )
    return bool(kinds) and isinstance(exc, kinds)


def _with_field(field: str, message: str) -> str:
    return f"{field}: {message}" if field and not message.startswith(f"{field}: ") else message


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, errors_pb2.ErrorDetail]:
    """The status code and error detail of an exception raised while serving a request."""
    field = getattr(exc, _FIELD_ATTR, "")
    if isinstance(exc, ServiceError):
        message = _with_field(exc.field, exc.message)
        return exc.code, error_detail(exc.reason, message, exc.field, exc.value, exc.limit, exc.unit)
    if isinstance(exc, LimitError):
        reason, unit = _limit_reason(exc)
        field = field or ("context" if reason == errors_pb2.ERROR_REASON_CONTEXT_OVERFLOW else "")
        return grpc.StatusCode.INVALID_ARGUMENT, error_detail(
            reason, _with_field(field, str(exc)), field, float(exc.value), float(exc.limit), unit
        )
    if isinstance(exc, MediaError):
        return grpc.StatusCode.INVALID_ARGUMENT, error_detail(_media_reason(exc), _with_field(field, str(exc)), field)
    if isinstance(exc, InputError):
        return grpc.StatusCode.INVALID_ARGUMENT, error_detail(
            errors_pb2.ERROR_REASON_INVALID_FIELD, _with_field(field, str(exc)), field
        )
    if isinstance(exc, TTSInputError):
        return grpc.StatusCode.INVALID_ARGUMENT, error_detail(
            errors_pb2.ERROR_REASON_INVALID_FIELD, _with_field(exc.field, str(exc)), exc.field
        )
    if isinstance(exc, TTSBackendUnavailable):
        return grpc.StatusCode.FAILED_PRECONDITION, error_detail(errors_pb2.ERROR_REASON_BACKEND_UNAVAILABLE, str(exc))
    if isinstance(exc, SynthesisError):
        return grpc.StatusCode.INTERNAL, error_detail(0, f"speech synthesis failed: {exc}")
    if isinstance(exc, CheckpointError):
        return grpc.StatusCode.FAILED_PRECONDITION, error_detail(
            errors_pb2.ERROR_REASON_BACKEND_UNAVAILABLE, f"the model cannot be loaded: {exc}"
        )
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        # A downstream call failed: pass its status on (a gateway calling the encoders, for example).
        code = exc.code()
        detail = (
            read_error_detail(exc.trailing_metadata()) if callable(getattr(exc, "trailing_metadata", None)) else None
        )
        if detail is None:
            reason = errors_pb2.ERROR_REASON_OVERLOADED if code == grpc.StatusCode.UNAVAILABLE else 0
            detail = error_detail(reason, f"downstream call failed: {exc.details()}")
        return code, detail
    if _is_replica_failure(exc):
        return grpc.StatusCode.UNAVAILABLE, error_detail(
            errors_pb2.ERROR_REASON_OVERLOADED, f"a model replica failed; retry: {exc}"
        )
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, error_detail(0, f"timed out: {exc}")
    return grpc.StatusCode.INTERNAL, error_detail(0, f"internal error ({type(exc).__name__}); see the server log")


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> grpc.StatusCode:
    """End the RPC with the status of ``exc`` and its ErrorDetail trailer (raises grpc's AbortError)."""
    code, detail = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("request failed unexpectedly", exc_info=exc)
    else:
        log.info("request failed: %s %s", code.name, detail.message)
    await context.abort(code, detail.message, trailing_metadata=error_metadata(detail))
    return code  # pragma: no cover (abort raises)


@asynccontextmanager
async def rpc_errors(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """``async with rpc_errors(context): ...``: an exception inside ends the RPC with its status (:func:`status_of`).

    Cancellation and an explicit ``context.abort`` pass through unchanged.
    """
    try:
        yield
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception as exc:
        await abort_with(context, exc)


def _record(servicer: Any, method: str, code: grpc.StatusCode, start: float) -> None:
    metrics = getattr(servicer, "metrics", None)
    if metrics is not None:
        metrics.observe_rpc(
            getattr(servicer, "SERVICE_LABEL", type(servicer).__name__), method, code.name, time.perf_counter() - start
        )


def grpc_method(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an ``async def`` (unary) or ``async def ... yield`` (server-streaming) grpc.aio servicer method.

    Exceptions become statuses (:func:`status_of`); a cancelled RPC (client gone, deadline) propagates
    ``asyncio.CancelledError`` untouched so the method's own clean-up runs. Each call is counted in
    ``self.metrics`` (a :class:`services.metrics.ServiceMetrics`) under ``self.SERVICE_LABEL`` when present.
    """
    name = fn.__name__

    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                async for item in fn(self, request, context):
                    yield item
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                code = grpc.StatusCode.UNKNOWN
                raise
            except Exception as exc:
                code = status_of(exc)[0]
                await abort_with(context, exc)
            finally:
                _record(self, name, code, start)

        return stream_wrapper

    @functools.wraps(fn)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        start, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            return await fn(self, request, context)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            code = grpc.StatusCode.UNKNOWN
            raise
        except Exception as exc:
            code = status_of(exc)[0]
            await abort_with(context, exc)
        finally:
            _record(self, name, code, start)

    return unary_wrapper
