"""Dynamic batching of encoder calls across requests: merging while busy, limits, failures and cancellations stay
per request. The encoder here is a plain async function over integers (the real ViT path is in test_encoders)."""

from __future__ import annotations

import asyncio

import pytest

from services.batching import RequestBatcher


class Encoder:
    """Doubles each item; the first call waits for ``gate``; a call with a negative item fails."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls: list[list[int]] = []

    async def __call__(self, items: list[int]) -> tuple[list[int], float]:
        self.calls.append(list(items))
        if len(self.calls) == 1:
            await self.gate.wait()
        if any(i < 0 for i in items):
            raise ValueError(f"bad item in {items}")
        return [2 * i for i in items], 0.5


async def _spin() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_requests_that_arrive_while_busy_go_together_in_the_next_call():
    async def main():
        enc, batcher = Encoder(), RequestBatcher(max_items=5)
        first = asyncio.create_task(batcher.submit("v1", [1], enc))
        await _spin()  # the first call is running (held at the gate)
        rest = [asyncio.create_task(batcher.submit("v1", items, enc)) for items in ([2, 3], [4], [5, 6], [7])]
        other = asyncio.create_task(batcher.submit("v2", [9], enc))  # another key: its own calls
        await _spin()
        enc.gate.set()
        results = await asyncio.gather(first, *rest, other)
        return enc, batcher, results

    enc, batcher, results = asyncio.run(main())
    assert [r[0] for r in results] == [[2], [4, 6], [8], [10, 12], [14], [18]]
    assert all(r[1] == 0.5 for r in results)
    # v1: [1] alone, then the waiting requests, whole, up to 5 items per call; v2 in a call of its own
    assert sorted(enc.calls) == sorted([[1], [2, 3, 4, 5, 6], [7], [9]])
    assert sorted(batcher.calls) == [1, 1, 1, 3]


def test_a_failing_request_fails_alone_and_a_cancelled_one_is_skipped():
    async def main():
        enc, batcher = Encoder(), RequestBatcher(max_items=10)
        first = asyncio.create_task(batcher.submit("v", [1], enc))
        await _spin()
        good = asyncio.create_task(batcher.submit("v", [2], enc))
        bad = asyncio.create_task(batcher.submit("v", [-1], enc))
        gone = asyncio.create_task(batcher.submit("v", [100], enc))
        also_good = asyncio.create_task(batcher.submit("v", [3], enc))
        await _spin()
        gone.cancel()
        enc.gate.set()
        out = await asyncio.gather(first, good, bad, also_good, return_exceptions=True)
        return enc, out

    enc, (first, good, bad, also_good) = asyncio.run(main())
    assert first == ([2], 0.5) and good == ([4], 0.5) and also_good == ([6], 0.5)
    assert isinstance(bad, ValueError)
    # the merged call failed, then each request ran alone; the cancelled request was never encoded
    assert enc.calls == [[1], [2, -1, 3], [2], [-1], [3]]


def test_a_request_larger_than_the_limit_goes_alone():
    async def main():
        enc, batcher = Encoder(), RequestBatcher(max_items=2)
        enc.gate.set()
        return enc, await batcher.submit("v", [1, 2, 3], enc)

    enc, result = asyncio.run(main())
    assert result == ([2, 4, 6], 0.5) and enc.calls == [[1, 2, 3]]
    with pytest.raises(ValueError, match=">= 1"):
        RequestBatcher(max_items=0)
