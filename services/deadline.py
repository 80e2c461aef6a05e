"""A call's deadline through proxies that drop it.

Ray Serve's gRPC proxy does not pass a call's deadline (``grpc-timeout``) on to the replica. So clients also send it
as the metadata ``x-ola-timeout-ms`` (milliseconds left when the call starts: :func:`timeout_metadata`), and the
gateway takes the earlier of it, the call's own deadline and its configured limit (:func:`timeout_from_metadata`).
No torch here: the client imports it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

TIMEOUT_METADATA = "x-ola-timeout-ms"


def timeout_metadata(timeout_s: float | None) -> tuple[tuple[str, str], ...]:
    """The metadata that carries a call's deadline through proxies that drop ``grpc-timeout`` (none for None)."""
    if timeout_s is None:
        return ()
    return ((TIMEOUT_METADATA, str(max(1, math.ceil(timeout_s * 1000)))),)


def timeout_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> float | None:
    """Seconds of the client's deadline from ``x-ola-timeout-ms``; None when absent. A malformed or non-positive
    value raises ``ValueError`` naming the key (servers answer INVALID_ARGUMENT)."""
    for key, value in metadata or ():
        if key != TIMEOUT_METADATA:
            continue
        text = value.decode() if isinstance(value, bytes) else str(value)
        try:
            ms = int(text)
        except ValueError:
            detail = f"metadata {TIMEOUT_METADATA} must be a whole number of milliseconds, got {text!r}"
            raise ValueError(detail) from None
        if ms <= 0:
            raise ValueError(f"metadata {TIMEOUT_METADATA} must be > 0, got {ms}")
        return ms / 1000.0
    return None
