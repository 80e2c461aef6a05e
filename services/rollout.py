"""The gateway's side of a canary rollout: route new sessions by the rollout's share, record every request's outcome.

- :class:`RolloutRouter` is :class:`~services.gateway.OmniGateway`'s ``router`` hook: ``router(session_id) -> version``
  for a new session (a session keeps its version afterwards, and the gateway pins that version on every service the
  request touches). A session goes to the challenger when a stable hash of its id (salted with the rollout id) falls
  in ``[0, share)`` of ``[0, 100)``, so raising the share only moves more sessions over, never back. The rollout
  state is read from Redis by a background thread every ``refresh_s`` seconds; a call only reads the cached snapshot
  and never waits on Redis. With no rollout running it returns the champion (the last promoted version) or, when
  Redis has never seen a rollout of the model, ``fallback`` (the gateway's default version).
- :class:`RolloutRecorder` takes each finished Chat's outcome (version, ok, latency, time to first token) without
  blocking and writes them in batches, from a background thread, into the time buckets that the controller
  (:class:`workflows.lifecycle.rollout.RolloutController`) reads for its analysis windows.
- :class:`OmniProbe` is the controller's ``probe(version) -> accuracy`` over a running gateway: it asks each quality
  probe as one Chat turn with the version pinned and greedy decoding.

The Redis layout is :mod:`workflows.lifecycle.rollout`'s; this module only reads the state and appends samples.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workflows.lifecycle.policy import Probe, probe_accuracy
from workflows.lifecycle.rollout import (
    DEFAULT_PREFIX,
    STATS_BUCKET_S,
    STATS_MAX_PER_BUCKET,
    STATS_RETENTION_S,
    append_samples,
    load_state,
)

log = logging.getLogger(__name__)


def _client(redis: Any) -> Any:
    if isinstance(redis, str):
        import redis as redis_lib

        return redis_lib.Redis.from_url(redis, socket_timeout=5.0, socket_connect_timeout=5.0)
    return redis


def share_bucket(key: str, salt: str = "") -> float:
    """A stable position of ``key`` in ``[0, 100)`` (two decimals), the same in every process and replica."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 / 100.0


@dataclass(frozen=True)
class RouteSnapshot:
    """What the router routes by: the rollout (None: none seen), the versions, the challenger's share."""

    rollout_id: str | None
    champion: str | None
    challenger: str | None
    share: float
    status: str | None
    fetched_at: float  # time.monotonic() of the read; 0: never read


_EMPTY = RouteSnapshot(None, None, None, 0.0, None, 0.0)


class RolloutRouter:
    """Sticky champion / challenger assignment of new sessions by the model's rollout state in Redis.

    Args:
        redis: a ``redis://`` URL or a sync ``redis.Redis`` client.
        model_name: the registry model whose rollout routes the sessions.
        fallback: the version when Redis has no rollout of the model (a string, or a callable read on each call).
        refresh_s: seconds between background reads of the state.
        start: start the background refresher (tests may call :meth:`refresh` themselves instead).
    """

    def __init__(
        self,
        redis: Any,
        model_name: str,
        fallback: str | Callable[[], str],
        *,
        prefix: str = DEFAULT_PREFIX,
        refresh_s: float = 1.0,
        start: bool = True,
    ) -> None:
        if refresh_s <= 0:
            raise ValueError(f"refresh_s: must be > 0 seconds, got {refresh_s}")
        self.redis = _client(redis)
        self.model_name = model_name
        self.prefix = prefix
        self.refresh_s = refresh_s
        self._fallback = fallback if callable(fallback) else (lambda: fallback)
        self._snapshot = _EMPTY
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._loop, name=f"rollout-router-{model_name}", daemon=True)
            self._thread.start()

    @property
    def snapshot(self) -> RouteSnapshot:
        return self._snapshot

    def __call__(self, session_id: str) -> str:
        """The version of a new session ``session_id`` (no I/O: reads the cached snapshot)."""
        snap = self._snapshot
        if (
            snap.challenger is not None
            and snap.share > 0
            and share_bucket(session_id, snap.rollout_id or "") < snap.share
        ):
            return snap.challenger
        return snap.champion or self._fallback()

    def refresh(self) -> bool:
        """Read the rollout state now; False (and the previous snapshot kept) when Redis cannot be read."""
        try:
            state = load_state(self.redis, self.model_name, self.prefix)
        except Exception as exc:  # Redis down: route by the last snapshot, say so
            log.warning(
                "rollout router %s: cannot read the rollout state, keeping the last one: %s", self.model_name, exc
            )
            return False
        if state is None:
            self._snapshot = RouteSnapshot(None, None, None, 0.0, None, time.monotonic())
        else:
            champion, challenger, share = state.routing()
            self._snapshot = RouteSnapshot(state.id, champion, challenger, share, state.status, time.monotonic())
        return True

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.refresh_s)


class RolloutRecorder:
    """Per-version request outcomes into Redis time buckets, written in batches by a background thread.

    :meth:`record` never blocks on Redis: it appends to a bounded in-memory queue (the oldest samples are dropped
    when Redis cannot keep up); the thread flushes it every ``flush_s`` seconds. Timestamps are wall-clock
    (``clock``, default ``time.time``), the controller's clock.
    """

    def __init__(
        self,
        redis: Any,
        *,
        prefix: str = DEFAULT_PREFIX,
        bucket_s: float = STATS_BUCKET_S,
        retention_s: float = STATS_RETENTION_S,
        max_per_bucket: int = STATS_MAX_PER_BUCKET,
        flush_s: float = 0.25,
        max_pending: int = 100_000,
        clock: Callable[[], float] = time.time,
        start: bool = True,
    ) -> None:
        if flush_s <= 0:
            raise ValueError(f"flush_s: must be > 0 seconds, got {flush_s}")
        self.redis = _client(redis)
        self.prefix = prefix
        self.bucket_s = bucket_s
        self.retention_s = retention_s
        self.max_per_bucket = max_per_bucket
        self.flush_s = flush_s
        self.clock = clock
        self._pending: collections.deque = collections.deque(maxlen=max_pending)
        self._lock = threading.Lock()  # one flush at a time
        self.dropped = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._loop, name="rollout-recorder", daemon=True)
            self._thread.start()

    def record(self, version: str, ok: bool, latency_s: float, ttft_s: float | None = None) -> None:
        """Note one finished request of ``version``: ``ok`` (False: a server-side failure), its latency and TTFT."""
        if not version:
            raise ValueError("version: must be a non-empty model version")
        if not (math.isfinite(latency_s) and latency_s >= 0):
            raise ValueError(f"latency_s: must be a finite number >= 0, got {latency_s}")
        if ttft_s is not None and not (math.isfinite(ttft_s) and ttft_s >= 0):
            raise ValueError(f"ttft_s: must be None or a finite number >= 0, got {ttft_s}")
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1
        self._pending.append((version, self.clock(), bool(ok), float(latency_s), ttft_s))

    def flush(self) -> int:
        """Write every pending sample now; returns how many were written (0 on a Redis error, which is logged)."""
        with self._lock:
            batch = []
            while self._pending:
                batch.append(self._pending.popleft())
            if not batch:
                return 0
            try:
                return append_samples(
                    self.redis,
                    batch,
                    prefix=self.prefix,
                    bucket_s=self.bucket_s,
                    retention_s=self.retention_s,
                    max_per_bucket=self.max_per_bucket,
                )
            except Exception as exc:  # statistics are best effort; requests never fail for them
                self.dropped += len(batch)
                log.warning("rollout recorder: %d samples not written: %s", len(batch), exc)
                return 0

    def close(self) -> None:
        """Stop the thread after a last flush."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()


class OmniProbe:
    """``probe(version) -> accuracy``: each quality probe as one Chat turn on the omni gateway, the version pinned.

    Args:
        target: ``host:port`` of the gateway (``ola.omni.v1.OmniService``).
        probes: the quality probes (``PromotionPolicy.probe_set``).
        metadata: sent with each call (``(("application", "omni"),)`` through Serve's proxy).
    """

    def __init__(
        self,
        target: str,
        probes: list[Probe],
        *,
        timeout_s: float = 60.0,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> None:
        if not probes:
            raise ValueError("probes: at least one probe is needed")
        self.target = target
        self.probes = list(probes)
        self.timeout_s = timeout_s
        self.metadata = metadata

    def __call__(self, version: str) -> float:
        import grpc

        from services.gen.ola.common.v1 import sampling_pb2
        from services.gen.ola.omni.v1 import omni_pb2, omni_pb2_grpc

        with grpc.insecure_channel(self.target) as channel:
            stub = omni_pb2_grpc.OmniServiceStub(channel)

            def ask(probe: Probe) -> str:
                session_id = f"rollout-probe-{probe.id}-{uuid.uuid4().hex[:8]}"
                req = omni_pb2.ChatRequest(
                    session_id=session_id,
                    model_version=version,
                    text=probe.prompt,
                    sampling=sampling_pb2.SamplingParams(
                        temperature=0.0, top_k=0, repetition_penalty=1.0, max_new_tokens=probe.max_new_tokens
                    ),
                )
                try:
                    events = list(stub.Chat(req, timeout=self.timeout_s, metadata=self.metadata))
                finally:
                    stub.DeleteSession(
                        omni_pb2.DeleteSessionRequest(session_id=session_id, allow_missing=True),
                        timeout=self.timeout_s,
                        metadata=self.metadata,
                    )
                return next(e.final.text for e in events if e.HasField("final"))

            accuracy = probe_accuracy(self.probes, ask)
        log.info("probes on %s: accuracy %.3f over %d probes", version, accuracy, len(self.probes))
        return accuracy
