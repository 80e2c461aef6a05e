"""Model versions come and go on a running replica (``reconfigure``): new ones load before the swap, removed ones are
freed, the LLM's engines included, and a request still running on a removed version finishes on it first.

The replica is the real deployment class (``LLMDeployment``) built and reconfigured directly, without Ray: what Serve
does in a replica, on tiny preset weights.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from services.gen.ola.common.v1 import sampling_pb2
from services.gen.ola.llm.v1 import llm_pb2

V1, V2, V3 = "tiny@1", "tiny@2", "tiny@3"


def _models(*names: str) -> dict:
    seeds = {V1: 0, V2: 1, V3: 2}
    return {"models": {"versions": {n: {"preset": "tiny", "seed": seeds[n]} for n in names}, "default_version": V1}}


def _request(version: str, max_new_tokens: int) -> llm_pb2.GenerateRequest:
    sampling = sampling_pb2.SamplingParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=max_new_tokens)
    return llm_pb2.GenerateRequest(prompt_text="Count with me: one two", sampling=sampling, model_version=version)


async def _generate(replica, request: llm_pb2.GenerateRequest) -> list[llm_pb2.GenerateResponse]:
    return [message async for message in replica.Generate(request)]


async def _llm_replica():
    from services.app import LLMDeployment, app_args
    from services.serve_config import PlatformConfig

    config = PlatformConfig.from_mapping({**_models(V1), "llm": {"max_batch": 2}}, "test")
    cls = LLMDeployment.func_or_class

    class Replica(cls):  # Serve awaits the async __del__ at shutdown; the test does too, Python's GC must not
        def __del__(self) -> None:
            pass

    replica = Replica.__new__(Replica)
    await replica.__init__(app_args(config, "llm"))  # what Serve runs in a new replica ...
    await replica.reconfigure(_models(V1))  # ... followed by the user_config
    return replica


async def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def test_versions_load_before_the_swap_and_removed_engines_are_dropped():
    async def scenario() -> None:
        replica = await _llm_replica()
        servicer = replica.servicer
        try:
            champion = servicer.registry.get(V1)

            # Added versions are loaded by reconfigure itself (a challenger is warm before its first request).
            await replica.reconfigure(_models(V1, V2, V3))
            assert replica._loaded_versions() == [V1, V2, V3]
            assert servicer.registry.get(V1) is champion  # kept, not loaded again
            for version in (V2, V3):
                out = await _generate(replica, _request(version, 2))
                assert out[0].model_version == version and out[-1].usage.completion_tokens >= 1
            assert set(servicer._engines) == {V2, V3}

            # V2 is busy (its request waits for the held step thread) when both V2 and V3 are removed.
            hold = threading.Event()
            servicer._step_executor.submit(hold.wait)
            running = asyncio.ensure_future(_generate(replica, _request(V2, 6)))
            await _wait_for(lambda: V2 in servicer._engines and servicer._engines[V2].engine.has_work())
            await replica.reconfigure(_models(V1))
            assert servicer.registry.versions == [V1] and servicer.registry.get(V1) is champion
            assert V3 not in servicer._engines  # idle: dropped at once
            assert V2 in servicer._engines  # busy: kept until its request ends
            with pytest.raises(Exception) as info:  # a new request for a removed version: NOT_FOUND
                await _generate(replica, _request(V3, 2))
            assert getattr(info.value, "code", None) == grpc.StatusCode.NOT_FOUND

            hold.set()
            out = await asyncio.wait_for(running, 30)
            assert out[0].model_version == V2 and out[-1].usage.completion_tokens >= 1  # finished on V2
            await _wait_for(lambda: V2 not in servicer._engines)
            assert set(servicer._engines) == set()
            assert replica._loaded_versions() == [V1] and replica._serving()
        finally:
            await type(replica).__mro__[1].__del__(replica)  # LLMDeployment's clean-up: stops the engine driver

    asyncio.run(scenario())
