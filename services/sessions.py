"""Conversation state of the omni gateway: one ``ola.omni.v1.Session`` per session id.

Two stores with one interface: :class:`InProcessSessionStore` for the embedded default, and :class:`RedisSessionStore`,
shared by every gateway replica, which keeps each session as the serialized ``Session`` proto with a TTL that every new
turn refreshes. A session pins its model version: all of its turns run on the version of the first.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from services.gen.ola.omni.v1 import omni_pb2


def _now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


class SessionStore(Protocol):
    async def get(self, session_id: str) -> omni_pb2.Session | None: ...

    async def put(self, session: omni_pb2.Session) -> None: ...

    async def delete(self, session_id: str) -> bool: ...


def new_session(session_id: str, model_version: str, system_prompt: str, ttl_s: float) -> omni_pb2.Session:
    now = _now()
    expire = Timestamp()
    expire.FromSeconds(now.seconds + int(ttl_s))
    return omni_pb2.Session(
        session_id=session_id,
        model_version=model_version,
        system_prompt=system_prompt,
        create_time=now,
        update_time=now,
        expire_time=expire,
    )


def touch(session: omni_pb2.Session, ttl_s: float) -> None:
    session.update_time.CopyFrom(_now())
    session.expire_time.FromSeconds(session.update_time.seconds + int(ttl_s))


class InProcessSessionStore:
    """Sessions in this process's memory (the embedded default), expiring ``ttl_s`` after their last turn."""

    def __init__(self, ttl_s: float = 3600.0, max_sessions: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._data: dict[str, tuple[float, bytes]] = {}
        self._lock = threading.Lock()

    async def get(self, session_id: str) -> omni_pb2.Session | None:
        with self._lock:
            item = self._data.get(session_id)
            if item is None or item[0] < time.monotonic():
                self._data.pop(session_id, None)
                return None
        return omni_pb2.Session.FromString(item[1])

    async def put(self, session: omni_pb2.Session) -> None:
        with self._lock:
            if len(self._data) >= self.max_sessions and session.session_id not in self._data:
                oldest = min(self._data, key=lambda k: self._data[k][0])
                del self._data[oldest]
            self._data[session.session_id] = (time.monotonic() + self.ttl_s, session.SerializeToString())

    async def delete(self, session_id: str) -> bool:
        with self._lock:
            return self._data.pop(session_id, None) is not None


class RedisSessionStore:
    """Sessions in Redis (``redis.asyncio``), shared by all gateway replicas, with a TTL per session."""

    def __init__(self, url: str, ttl_s: float = 3600.0, prefix: str = "ola:session:") -> None:
        import redis.asyncio as redis

        self.ttl_s = ttl_s
        self.prefix = prefix
        self._redis = redis.from_url(url)

    async def get(self, session_id: str) -> omni_pb2.Session | None:
        raw = await self._redis.get(self.prefix + session_id)
        return None if raw is None else omni_pb2.Session.FromString(raw)

    async def put(self, session: omni_pb2.Session) -> None:
        await self._redis.set(self.prefix + session.session_id, session.SerializeToString(), ex=int(self.ttl_s))

    async def delete(self, session_id: str) -> bool:
        return bool(await self._redis.delete(self.prefix + session_id))

    async def close(self) -> None:
        await self._redis.aclose()


def make_session_store(redis_url: str | None, ttl_s: float = 3600.0) -> SessionStore:
    return RedisSessionStore(redis_url, ttl_s) if redis_url else InProcessSessionStore(ttl_s)
