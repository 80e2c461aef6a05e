"""Session stores: the in-process default and Redis (a real server on loopback), one behaviour."""

import asyncio
import uuid

import pytest

from services.sessions import InProcessSessionStore, RedisSessionStore, new_session, touch


def _stores(redis_url):
    return [InProcessSessionStore(ttl_s=60), RedisSessionStore(redis_url, ttl_s=60, prefix=f"t{uuid.uuid4().hex}:")]


@pytest.mark.parametrize("kind", [0, 1])
def test_put_get_delete_round_trip(redis_url, kind):
    async def run():
        store = _stores(redis_url)[kind]
        session = new_session("s1", "tiny@1", "Be brief.", ttl_s=60)
        session.turns.add(index=0, user_text="hi", assistant_text="hello")
        assert await store.get("s1") is None
        await store.put(session)
        got = await store.get("s1")
        assert got == session and got.turns[0].assistant_text == "hello"
        touch(got, 60)
        assert got.expire_time.seconds >= session.expire_time.seconds
        assert await store.delete("s1") is True
        assert await store.delete("s1") is False and await store.get("s1") is None
        if isinstance(store, RedisSessionStore):
            await store.close()

    asyncio.run(run())


def test_redis_sessions_are_shared_between_stores_and_expire(redis_url):
    async def run():
        prefix = f"t{uuid.uuid4().hex}:"
        a = RedisSessionStore(redis_url, ttl_s=1, prefix=prefix)
        b = RedisSessionStore(redis_url, ttl_s=1, prefix=prefix)  # another gateway replica
        await a.put(new_session("shared", "tiny@1", "", ttl_s=1))
        assert (await b.get("shared")).model_version == "tiny@1"
        await asyncio.sleep(1.6)
        assert await b.get("shared") is None  # the TTL expired it
        await a.close()
        await b.close()

    asyncio.run(run())
