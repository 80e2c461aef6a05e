"""Dynamic batching of encoder calls across concurrent requests.

Requests of one key (model version + output dtype) that arrive while the encoder is busy wait; when a worker is
free it takes every waiting request (whole requests, up to ``max_items`` items; a single request larger than that
goes alone) into one call. A lone request therefore never waits for company, and a busy replica batches. If a merged
call fails, each of its requests is run again alone, so one bad input fails only its own request.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

EncodeFn = Callable[[list[Any]], Awaitable[tuple[list[Any], float]]]  # items -> (one result per item, seconds)


@dataclass
class _Waiting:
    items: list[Any]
    future: asyncio.Future
    run: EncodeFn


@dataclass
class _Queue:
    waiting: collections.deque[_Waiting] = field(default_factory=collections.deque)
    workers: int = 0


class RequestBatcher:
    """Merges the items of concurrent requests of one key into one encoder call.

    Args:
        max_items: most items in one merged call.
        workers: merged calls of one key running at once (the encoder's own concurrency).
    """

    def __init__(self, max_items: int, workers: int = 1) -> None:
        if max_items < 1 or workers < 1:
            raise ValueError("max_items and workers must be >= 1")
        self.max_items = max_items
        self.workers = workers
        self._queues: dict[Hashable, _Queue] = {}
        self._tasks: set[asyncio.Task] = set()
        self.calls: collections.deque[int] = collections.deque(maxlen=4096)  # requests per merged call, newest last

    async def submit(self, key: Hashable, items: Sequence[Any], run: EncodeFn) -> tuple[list[Any], float]:
        """Encode ``items`` (one result each) with ``run``, merged with other requests of ``key``; returns the
        results and the seconds of the call they went in. A merged call uses the first request's ``run`` for every
        item, so a key must only group requests whose ``run`` does the same (one model version and dtype)."""
        loop = asyncio.get_running_loop()
        queue = self._queues.setdefault(key, _Queue())
        waiting = _Waiting(list(items), loop.create_future(), run)
        queue.waiting.append(waiting)
        if queue.workers < self.workers:
            queue.workers += 1
            task = loop.create_task(self._work(key, queue), name=f"encode-batcher-{key}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await waiting.future

    def _take(self, queue: _Queue) -> list[_Waiting]:
        batch: list[_Waiting] = []
        count = 0
        while queue.waiting:
            nxt = queue.waiting[0]
            if nxt.future.done():  # its caller went away (cancelled): nothing to encode
                queue.waiting.popleft()
                continue
            if batch and count + len(nxt.items) > self.max_items:
                break
            batch.append(queue.waiting.popleft())
            count += len(nxt.items)
        return batch

    async def _work(self, key: Hashable, queue: _Queue) -> None:
        try:
            while batch := self._take(queue):
                self.calls.append(len(batch))
                items = [item for w in batch for item in w.items]
                try:
                    results, seconds = await batch[0].run(items)
                except Exception as exc:
                    if len(batch) == 1:
                        _settle(batch[0].future, exception=exc)
                    else:
                        await self._one_by_one(batch)
                    continue
                start = 0
                for w in batch:
                    _settle(w.future, result=(results[start : start + len(w.items)], seconds))
                    start += len(w.items)
        finally:
            queue.workers -= 1
            if not queue.waiting and queue.workers == 0:
                self._queues.pop(key, None)

    @staticmethod
    async def _one_by_one(batch: list[_Waiting]) -> None:
        for w in batch:
            if w.future.done():
                continue
            try:
                _settle(w.future, result=await w.run(w.items))
            except Exception as exc:
                _settle(w.future, exception=exc)


def _settle(future: asyncio.Future, result: Any = None, exception: BaseException | None = None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
