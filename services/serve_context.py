"""How the platform's servicers run inside Ray Serve replicas: Serve's gRPC context as the ``grpc.aio`` context the
servicers expect, and the calls that end a unary or streaming method with its gRPC status.

Serve's proxy applies the context a replica sends with each *message* (``services/app.py`` explains the whole path):
a unary call returns an empty response, and a stream yields one last message that carries the status. Through a
deployment handle nobody reads the context, so the status is raised as :class:`RpcStatusError` instead.

This module needs no Ray: the deployments in ``services/app.py`` use it, and its tests run without a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

log = logging.getLogger(__name__)


class RpcStatusError(Exception):
    """A call through a deployment handle (no gRPC context) that ended with a non-OK status."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple = ()) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


HEALTH_WATCH_POLL_S = 1.0  # how often a health Watch stream looks at the replica's state


def health_status(serving: bool) -> int:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING


async def watch_health(serving: Callable[[], bool], poll_s: float) -> AsyncIterator[Any]:
    """Health responses for a ``Watch`` stream: the status at once, then one per change (looked at every ``poll_s``
    seconds). Endless: the stream ends when the client cancels it."""
    last = None
    while True:
        status = health_status(serving())
        if status != last:
            last = status
            yield health_pb2.HealthCheckResponse(status=status)
        await asyncio.sleep(poll_s)


class ServeContext:
    """The part of ``grpc.aio.ServicerContext`` the servicers use, over Serve's ``RayServegRPCContext``.

    ``abort`` records the code, details and trailing metadata on Serve's context and raises ``grpc.aio.AbortError``
    (the servicers' error decorators let it through), awaitable or not: the TTS servicer is synchronous.
    ``time_remaining`` counts down from ``timeout_s`` (Serve's proxy does not pass the client's deadline on; the
    gateway also reads the client's ``x-ola-timeout-ms``, :mod:`services.deadline`).

    Args:
        grpc_context: Serve's context; None when called through a deployment handle.
        timeout_s: the call's deadline from now; None: none.
    """

    def __init__(self, grpc_context: Any = None, timeout_s: float | None = None) -> None:
        self._ctx = grpc_context
        self._deadline = time.monotonic() + timeout_s if timeout_s else None
        self._trailing: tuple = ()
        self.code: grpc.StatusCode | None = None
        self.details = ""

    # ------------------------------------------------------------------------------------------- status
    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code
        if self._ctx is not None:
            self._ctx.set_code(code)

    def set_details(self, details: str) -> None:
        self.details = details
        if self._ctx is not None:
            self._ctx.set_details(details)

    def set_trailing_metadata(self, trailing_metadata: Iterable[tuple[str, Any]]) -> None:
        self._trailing = tuple(trailing_metadata)
        if self._ctx is not None:
            self._ctx.set_trailing_metadata(list(self._trailing))

    def trailing_metadata(self) -> tuple:
        return self._trailing

    def _abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Iterable[tuple[str, Any]]) -> None:
        if code == grpc.StatusCode.OK:
            raise ValueError("abort() needs a non-OK status code")
        self.set_code(code)
        self.set_details(details)
        if trailing_metadata:
            self.set_trailing_metadata(trailing_metadata)
        raise grpc.aio.AbortError(f"{code.name}: {details}")

    def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Iterable = ()) -> Any:
        """End the call with ``code``: raises ``grpc.aio.AbortError`` (also when awaited, like grpc.aio's)."""
        self._abort(code, details, trailing_metadata)

    def fail(self, exc: BaseException) -> None:
        """Record the status of an unexpected exception (``services.errors.status_of``) without raising."""
        from services.errors import status_of
        from services.wire import error_metadata

        code, detail = status_of(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.error("request failed unexpectedly", exc_info=exc)
        self.set_code(code)
        self.set_details(detail.message)
        self.set_trailing_metadata(error_metadata(detail))

    def error_detail(self) -> Any:
        """The ``ErrorDetail`` of the recorded status (from the trailer, else made from code and details)."""
        from services.wire import error_detail, read_error_detail

        return read_error_detail(self._trailing) or error_detail(0, self.details)

    def raise_if_detached(self) -> None:
        """Outside the gRPC proxy nobody reads the context: raise the recorded status instead."""
        if self._ctx is None and self.code is not None:
            raise RpcStatusError(self.code, self.details, self._trailing)

    # ------------------------------------------------------------------------------------------- call state
    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def is_active(self) -> bool:
        return self.code is None and (self._deadline is None or time.monotonic() < self._deadline)

    def invocation_metadata(self) -> tuple:
        return tuple(self._ctx.invocation_metadata()) if self._ctx is not None else ()

    def peer(self) -> str:
        return self._ctx.peer() if self._ctx is not None else ""


@contextlib.contextmanager
def _failure_as_status(ctx: ServeContext) -> Iterator[None]:
    """End a servicer method's failure here with its status on ``ctx``: an abort has recorded it already, any other
    exception is recorded now. Cancellation passes through."""
    try:
        yield
    except grpc.aio.AbortError:
        pass
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        ctx.fail(exc)


async def call_unary(
    fn: Callable[[Any, ServeContext], Awaitable[Any]], request: Any, ctx: ServeContext, empty: Callable[[], Any]
) -> Any:
    """Run a unary servicer method; a failure sets the status on ``ctx`` and returns ``empty()``."""
    with _failure_as_status(ctx):
        return await fn(request, ctx)
    ctx.raise_if_detached()
    return empty()


async def call_stream(
    fn: Callable[[Any, ServeContext], AsyncIterator[Any]],
    request: Any,
    ctx: ServeContext,
    carrier: Callable[[Any, Any], Any],
) -> AsyncIterator[Any]:
    """Run a streaming servicer method; a failure sets the status and yields ``carrier(last, detail)`` last.

    Serve's proxy applies a replica's gRPC context only with a message, so the status needs one message to ride on.
    """
    last = None
    with _failure_as_status(ctx):
        async for message in fn(request, ctx):
            last = message
            yield message
        return
    ctx.raise_if_detached()
    yield carrier(last, ctx.error_detail())
