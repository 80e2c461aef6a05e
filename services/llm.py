"""The ``ola.llm.v1.LLMService`` servicer (grpc.aio): embedding blocks spliced into a prompt, answers streamed.

The service is modality-agnostic: the prompt (a conversation rendered in ChatML, prompt text, or token ids) has one
placeholder per block, and the i-th placeholder is replaced by ``blocks[i]``
(:func:`ola_model.prompt.assemble_embeddings`). Every request is checked before it reaches the engine: blocks of
another model version (FAILED_PRECONDITION), malformed tensors, a placeholder / block count mismatch, out-of-range
sampling parameters and a prompt plus ``max_new_tokens`` over the context (INVALID_ARGUMENT with the numbers).

Decoding: one :class:`~ola_model.engine.LLMEngine` per model version (continuous batching: concurrent requests join
and leave one running batch between steps, each with its own sampling parameters), driven by ONE asyncio task per
servicer that calls ``engine.step()`` in a dedicated worker thread while any engine has work, so the event loop never
blocks. Step outputs go to per-request queues; each ``Generate`` stream turns its tokens into text deltas
(:class:`~ola_model.generation.IncrementalDetokenizer`). A cancelled call (client disconnect, deadline) aborts its
engine request at once, which frees its KV-cache row at the next step.

Construction::

    servicer = LLMServicer.from_config({"registry": {...}, "max_batch": 16})
    add_to_server(server, servicer)
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from pydantic import BaseModel, ConfigDict, Field

from ola_model.engine import LLMEngine, StepOutput
from ola_model.generation import IncrementalDetokenizer, SamplingParams
from ola_model.prompt import (
    IMAGE_TOKEN_INDEX,
    Message,
    assemble_embeddings,
    chatml,
    placeholder_positions,
    tokenize_prompt,
)
from services.errors import InvalidArgument, VersionMismatch, grpc_method
from services.gen.ola.common.v1 import embedding_pb2, errors_pb2, sampling_pb2, usage_pb2
from services.gen.ola.llm.v1 import llm_pb2, llm_pb2_grpc
from services.metrics import ServiceMetrics
from services.registry import LoadedModel, ModelRegistry, ModelServiceBase, RegistryConfig
from services.text.sentences import ASCII_TERMINATORS, CJK_TERMINATORS, CLOSERS
from services.vision import duration
from services.wire import tensor_from_proto

log = logging.getLogger(__name__)

SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["LLMService"].full_name

_ROLES = {llm_pb2.ROLE_SYSTEM: "system", llm_pb2.ROLE_USER: "user", llm_pb2.ROLE_ASSISTANT: "assistant"}
_MODALITY_NAMES = {
    embedding_pb2.MODALITY_IMAGE: "image",
    embedding_pb2.MODALITY_VIDEO: "video",
    embedding_pb2.MODALITY_AUDIO: "audio",
}
_FINISH = {
    "stop": sampling_pb2.FINISH_REASON_STOP,
    "length": sampling_pb2.FINISH_REASON_LENGTH,
    "abort": sampling_pb2.FINISH_REASON_CANCELLED,
}


class LLMServiceConfig(BaseModel):
    """Everything an :class:`LLMServicer` is built from (validated before any model loads)."""

    model_config = ConfigDict(extra="forbid")

    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    max_batch: int = Field(16, ge=1, description="Most requests decoding together per model version.")
    default_max_new_tokens: int = Field(
        1024, ge=1, description="max_new_tokens when a request leaves it unset (capped to the room left)."
    )
    max_blocks: int = Field(64, ge=0, description="Most embedding blocks in one request.")
    stream_interval_ms: float = Field(
        20.0,
        ge=0,
        description=(
            "Longest a decoded token waits to be sent with later ones (0: one message per token). The first token, "
            "the last, and text ending or following a sentence mark go at once: a reader never sees 20 ms, and "
            "sentence-wise speech is not delayed. Fewer, larger messages are what lets a CPU replica batch."
        ),
    )


# A sentence boundary is decided on a terminator and the character after it (services/text/sentences.py): text with
# either goes at once so that the gateway can hand the sentence to TTS without waiting for the interval.
_SENTENCE_MARKS = frozenset(ASCII_TERMINATORS | CJK_TERMINATORS | CLOSERS | {"\n"})


def send_at_once(text: str, after_mark: bool) -> bool:
    """Whether held text goes out now, before the stream interval ends: it holds a sentence mark, or it follows one
    (the gateway's splitter decides a boundary on the character after the mark)."""
    return after_mark or any(c in _SENTENCE_MARKS for c in text)


def ends_with_mark(text: str) -> bool:
    """Whether text ends with a sentence mark (trailing spaces and tabs aside)."""
    return text.rstrip(" \t")[-1:] in _SENTENCE_MARKS


STEP_TURN_S = 0.05  # longest one engine steps before the driver looks at the other model versions' engines


class _Stream:
    """The decoded tokens of one Generate call between two of its messages.

    The engine driver pushes each step's output here (in the event loop's thread); the call's coroutine wakes only
    when a message is due: the first text, a sentence mark or the text after one, the end, or ``interval`` seconds
    after the oldest token waiting. So a stream costs one wake-up per message, not one per token.
    """

    def __init__(self, tokenizer: Any, interval: float, start: float) -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        self.interval = interval
        self.ready = asyncio.Event()
        self.ids: list[int] = []  # token ids not taken yet
        self.parts: list[str] = []  # their text
        self.sent_any = False  # set by the call once it sent a message
        self.after_mark = False  # the text so far ends with a sentence mark
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.completion = 0
        self.first_token_at: float | None = None
        self.last_token_at = start
        self._timer: asyncio.TimerHandle | None = None

    def push(self, out: StepOutput) -> None:
        if out.token_id is not None:
            self.last_token_at = time.perf_counter()
            if self.first_token_at is None:
                self.first_token_at = self.last_token_at
            self.completion += 1
            piece = self.detok.push(out.token_id)
            self.parts.append(piece)
            self.ids.append(out.token_id)
            due = not self.sent_any or self.interval <= 0 or send_at_once(piece, self.after_mark)
            if piece:  # empty: a character split across tokens
                self.after_mark = ends_with_mark(piece)
        else:
            due = False
        if out.finished:
            self.finish_reason = out.finish_reason or "stop"
            due = True
        if due:
            self._wake()
        elif self._timer is None and self.ids:  # the oldest token waiting goes within the interval
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._wake)

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        self.close()
        self.ready.set()

    def take(self) -> tuple[str, list[int]]:
        """The text and token ids gathered since the last take."""
        self.ready.clear()
        self.close()
        text, ids = "".join(self.parts), self.ids
        self.parts, self.ids = [], []
        return text, ids

    def close(self) -> None:
        """Stop the interval timer, if one runs."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


@dataclass
class _Block:
    embeddings: torch.Tensor  # (N, C)
    modality: str  # image / video / audio
    cache_hit: bool


@dataclass
class _EngineState:
    """One model version's engine and the queues of its requests' streams."""

    loaded: LoadedModel
    engine: LLMEngine
    streams: dict[str, _Stream] = field(default_factory=dict)


def sampling_params(
    msg: sampling_pb2.SamplingParams, default_max_new_tokens: int, room: int | None = None
) -> SamplingParams:
    """Proto sampling parameters -> :class:`SamplingParams` (Ola's defaults for unset fields).

    ``room``: context positions left after the prompt; an unset ``max_new_tokens`` is capped to it.

    Raises:
        InvalidArgument: an out-of-range field, named ``sampling.<field>`` with the allowed range.
    """
    defaults = SamplingParams()
    kw: dict[str, Any] = {}

    def bad(name: str, value: float, allowed: str) -> InvalidArgument:
        return InvalidArgument(f"must be {allowed}, got {value}", field=f"sampling.{name}")

    if msg.HasField("temperature"):
        if not math.isfinite(msg.temperature) or msg.temperature < 0:
            raise bad("temperature", msg.temperature, ">= 0")
        kw["temperature"] = float(msg.temperature)
    if msg.HasField("top_k"):
        kw["top_k"] = int(msg.top_k)
    if msg.HasField("top_p"):
        if not 0 < msg.top_p <= 1:
            raise bad("top_p", msg.top_p, "in (0, 1]")
        kw["top_p"] = float(msg.top_p)
    if msg.HasField("repetition_penalty"):
        if not math.isfinite(msg.repetition_penalty) or msg.repetition_penalty <= 0:
            raise bad("repetition_penalty", msg.repetition_penalty, "> 0")
        kw["repetition_penalty"] = float(msg.repetition_penalty)
    if msg.HasField("max_new_tokens"):
        if msg.max_new_tokens < 1:
            raise bad("max_new_tokens", msg.max_new_tokens, ">= 1")
        kw["max_new_tokens"] = int(msg.max_new_tokens)
    else:
        kw["max_new_tokens"] = max(1, min(default_max_new_tokens, room if room is not None else default_max_new_tokens))
    if msg.HasField("seed"):
        kw["seed"] = int(msg.seed)
    return defaults.with_(**kw)


class LLMServicer(ModelServiceBase, llm_pb2_grpc.LLMServiceServicer):
    """Serves Generate / CountTokens for the versions of its registry.

    Args:
        config: the service config (registry, batch size, defaults).
        registry, metrics: shared instances (one registry per process loads each version once).

    ``max_batch_size`` (the largest running batch seen) and ``batch_sizes`` (recent per-step batch sizes) expose the
    batching for tests and dashboards; the ``ola_llm_batch_size`` histogram has them too.
    """

    SERVICE_NAME = SERVICE_NAME
    SERVICE_LABEL = "llm"

    def __init__(
        self,
        config: LLMServiceConfig | None = None,
        *,
        registry: ModelRegistry | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.config = config or LLMServiceConfig()
        super().__init__(registry or ModelRegistry(self.config.registry), metrics)
        self._engines: dict[str, _EngineState] = {}
        self._step_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-step")
        self._driver: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        # Step outputs on their way from the step thread to the event loop; one wake-up of the loop takes all that
        # gathered since the last (each call_soon_threadsafe writes to the loop's wake-up pipe: a system call).
        self._handoff: collections.deque[tuple[_EngineState, list[StepOutput]]] = collections.deque()
        self._handoff_lock = threading.Lock()
        self._handoff_scheduled = False
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=4096)
        self.max_batch_size = 0

    @classmethod
    def from_config(cls, config: LLMServiceConfig | Mapping[str, Any] | None = None) -> LLMServicer:
        if config is not None and not isinstance(config, LLMServiceConfig):
            config = LLMServiceConfig.model_validate(config)
        return cls(config)

    def engine(self, version: str = "") -> LLMEngine | None:
        """The engine of a model version ("" = default), if it has been started."""
        state = self._engines.get(self.registry.resolve(version))
        return state.engine if state else None

    # ------------------------------------------------------------------------------------------------ engines
    def drop_stale_engines(self) -> list[str]:
        """Drop every engine (model, KV cache) whose weights the registry no longer serves; returns the versions
        still busy, whose requests finish on their engine (the driver steps every engine it holds)."""
        busy = []
        for version, state in list(self._engines.items()):
            if self.registry.is_loaded(version) and self.registry.get(version) is state.loaded:
                continue
            if state.streams or state.engine.has_work():
                busy.append(version)
                continue
            del self._engines[version]
            log.info("llm: dropped the engine of model version %s", version)
        return busy

    def _state(self, loaded: LoadedModel) -> _EngineState:
        state = self._engines.get(loaded.version)
        if state is None:
            state = self._engines[loaded.version] = _EngineState(loaded, self._new_engine(loaded))
        return state

    def _new_engine(self, loaded: LoadedModel) -> LLMEngine:
        limits = loaded.pipeline.config.limits
        return LLMEngine(
            loaded.model, loaded.pipeline.stop_ids, max_batch=self.config.max_batch, max_context=limits.max_context
        )

    def _ensure_driver(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._driver is None or self._driver.done() or self._driver.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._driver = loop.create_task(self._drive(), name="llm-engine-driver")
            self._driver.add_done_callback(self._driver_done)
        assert self._wake is not None
        return self._wake

    async def _drive(self) -> None:
        """The one loop that steps every engine with work; idles on ``_wake`` otherwise."""
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            busy = [s for s in self._engines.values() if s.engine.has_work()]
            if not busy:
                self._wake.clear()
                await self._wake.wait()
                continue
            for state in busy:
                try:
                    await loop.run_in_executor(self._step_executor, self._run_steps, state, loop)
                except Exception as exc:
                    log.exception("engine step of %s failed; failing its requests", state.loaded.version)
                    self._fail(state, exc)
                    state.engine = self._new_engine(state.loaded)  # its batch state is unknown now
                    continue

    def _run_steps(self, state: _EngineState, loop: asyncio.AbstractEventLoop) -> None:
        """In the step thread: step one engine back to back while it has work, for up to ``STEP_TURN_S`` (then other
        versions' engines get their turn). Each step's outputs go to the event loop without waiting for it, so the
        loop's work (messages, detokenising) overlaps the next step. New requests and aborts reach the engine through
        its lock-protected inbox between steps."""
        engine = state.engine
        until = time.perf_counter() + STEP_TURN_S
        while engine.has_work():
            outputs = engine.step()
            with self._handoff_lock:
                self._handoff.append((state, outputs))
                wake, self._handoff_scheduled = not self._handoff_scheduled, True
            if wake:
                loop.call_soon_threadsafe(self._take_handoff)
            if time.perf_counter() >= until:
                break

    def _take_handoff(self) -> None:
        """In the event loop: every step output handed over since the last wake-up, in step order."""
        with self._handoff_lock:
            items = list(self._handoff)
            self._handoff.clear()
            self._handoff_scheduled = False
        for state, outputs in items:
            self._after_step(state, outputs)

    def _after_step(self, state: _EngineState, outputs: list[StepOutput]) -> None:
        engine = state.engine
        engine.batch_sizes.clear()  # the engine keeps every step's size; the service keeps a bounded window
        size = sum(1 for o in outputs if o.finish_reason != "abort")  # requests decoded in this step
        self.batch_sizes.append(size)
        self.max_batch_size = max(self.max_batch_size, size)
        self.metrics.engine_step(state.loaded.version, size, engine.num_running, engine.num_waiting)
        for out in outputs:
            stream = state.streams.get(out.request_id)
            if stream is not None:
                stream.push(out)

    def _fail(self, state: _EngineState, exc: BaseException) -> None:
        for stream in state.streams.values():
            stream.fail(exc)

    def _driver_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("the engine driver stopped", exc_info=exc)
            for state in self._engines.values():
                self._fail(state, exc)

    async def close(self) -> None:
        """Stop the driver and the step thread (running requests end with an error)."""
        if self._driver is not None:
            self._driver.cancel()
            try:
                await self._driver
            except asyncio.CancelledError:
                pass
            self._driver = None
        for state in self._engines.values():
            self._fail(state, RuntimeError("the LLM service is shutting down"))
        self._step_executor.shutdown(wait=False, cancel_futures=True)

    # -------------------------------------------------------------------------------------------------- prompts
    def _text(self, request: Any) -> str | None:
        """The prompt text of a conversation / prompt_text request; None for token ids."""
        kind = request.WhichOneof("prompt")
        if kind == "conversation":
            messages = []
            for i, m in enumerate(request.conversation.messages):
                if m.role not in _ROLES:
                    raise InvalidArgument(
                        "role must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT",
                        field=f"conversation.messages[{i}].role",
                    )
                if m.role == llm_pb2.ROLE_SYSTEM and i > 0:
                    raise InvalidArgument(
                        "a system message may only come first", field=f"conversation.messages[{i}].role"
                    )
                messages.append(Message(_ROLES[m.role], m.content))
            if not messages:
                raise InvalidArgument("the conversation has no messages", field="conversation.messages")
            return chatml(messages)
        if kind == "prompt_text":
            if not request.prompt_text:
                raise InvalidArgument("the prompt text is empty", field="prompt_text")
            return request.prompt_text
        if kind == "token_ids":
            return None
        raise InvalidArgument("set one of conversation, prompt_text or token_ids", field="prompt")

    def _prompt_ids(self, request: Any, loaded: LoadedModel) -> list[int]:
        """Token ids with every placeholder as IMAGE_TOKEN_INDEX (the service fills them in order, whatever kind).

        Runs on the event loop thread: the tokenizer is not safe to share between threads.
        """
        text = self._text(request)
        if text is not None:
            ids = tokenize_prompt(text, loaded.tokenizer)
        else:
            vocab = len(loaded.tokenizer)
            ids = list(request.token_ids.ids)
            if not ids:
                raise InvalidArgument("no token ids", field="token_ids.ids")
            for i, t in enumerate(ids):
                if t >= vocab:
                    raise InvalidArgument(
                        f"token id {t} is not in the tokenizer (ids < {vocab})",
                        field=f"token_ids.ids[{i}]",
                        value=t,
                        limit=vocab - 1,
                    )
        if not ids:
            raise InvalidArgument("the prompt is empty", field="prompt")
        return [IMAGE_TOKEN_INDEX if t < 0 else t for t in ids]

    def _blocks(self, request: llm_pb2.GenerateRequest, loaded: LoadedModel) -> list[_Block]:
        """Decode and check every block (version, modality, shape, width, finiteness)."""
        if len(request.blocks) > self.config.max_blocks:
            raise InvalidArgument(
                f"{len(request.blocks)} blocks is over the limit of {self.config.max_blocks}",
                field="blocks",
                value=len(request.blocks),
                limit=self.config.max_blocks,
            )
        width = loaded.pipeline.config.llm.hidden_size
        blocks = []
        for i, b in enumerate(request.blocks):
            where = f"blocks[{i}]"
            if b.model_version and b.model_version != loaded.version:
                raise VersionMismatch(
                    f"the block comes from model version {b.model_version!r} but the request decodes with "
                    f"{loaded.version!r}; projectors are tied to their checkpoint, so encode with the same version",
                    field=f"{where}.model_version",
                )
            if b.modality not in _MODALITY_NAMES:
                raise InvalidArgument(
                    "modality must be MODALITY_IMAGE, MODALITY_VIDEO or MODALITY_AUDIO", field=f"{where}.modality"
                )
            try:
                tensor = tensor_from_proto(b.embeddings, f"{where}.embeddings")
            except ValueError as exc:
                raise InvalidArgument(str(exc), field=f"{where}.embeddings") from exc
            if not tensor.is_floating_point() or tensor.dim() != 2 or tensor.shape[0] == 0 or tensor.shape[1] != width:
                raise InvalidArgument(
                    f"must be floating-point of shape (num_tokens > 0, {width}), got {tensor.dtype} "
                    f"{list(tensor.shape)}",
                    field=f"{where}.embeddings",
                )
            if b.num_tokens != tensor.shape[0]:
                raise InvalidArgument(
                    f"num_tokens is {b.num_tokens} but the embeddings have {tensor.shape[0]} rows",
                    field=f"{where}.num_tokens",
                )
            if not bool(torch.isfinite(tensor).all()):
                raise InvalidArgument("the embeddings contain NaN or infinite values", field=f"{where}.embeddings")
            blocks.append(_Block(tensor, _MODALITY_NAMES[b.modality], b.cache_hit))
        return blocks

    @staticmethod
    def _check_placeholders(ids: list[int], num_blocks: int, field: str) -> int:
        placeholders = len(placeholder_positions(ids))
        if placeholders != num_blocks:
            raise InvalidArgument(
                f"the prompt has {placeholders} placeholders but {num_blocks} blocks were given; "
                "each placeholder needs exactly one block, in order",
                field=field,
                value=num_blocks,
                limit=placeholders,
            )
        return placeholders

    @staticmethod
    def _check_context(sizes: dict[str, int], max_new_tokens: int, max_context: int) -> None:
        prompt = sum(sizes.values())
        if prompt + max_new_tokens > max_context:
            raise InvalidArgument(
                f"the prompt takes {prompt} positions (text {sizes['text']}, image {sizes['image']}, video "
                f"{sizes['video']}, audio {sizes['audio']}) + max_new_tokens {max_new_tokens} = "
                f"{prompt + max_new_tokens}, over the model's context of {max_context}; use fewer video frames, "
                "shorter audio, fewer images or a smaller max_new_tokens",
                field="context",
                value=prompt + max_new_tokens,
                limit=max_context,
                unit="tokens",
                reason=errors_pb2.ERROR_REASON_CONTEXT_OVERFLOW,
            )

    @staticmethod
    def _assemble(loaded: LoadedModel, ids: list[int], blocks: list[_Block]) -> torch.Tensor:
        model = loaded.model
        dev, dtype = model.device, model.dtype
        with torch.inference_mode():
            return assemble_embeddings(
                ids,
                [b.embeddings.to(device=dev, dtype=dtype) for b in blocks],  # the model's dtype, not the wire's
                [],
                lambda t: model.embed_tokens(t.to(dev)),
            )

    # --------------------------------------------------------------------------------------------------- RPCs
    @grpc_method
    async def Generate(
        self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        start = time.perf_counter()
        loaded = await self.registry.aget(request.model_version)
        version = loaded.version
        ids = self._prompt_ids(request, loaded)
        # Decoding and checking blocks, and splicing them in, can take milliseconds (a long video's block): off the
        # event loop. A text-only prompt is a table lookup; a thread hop would cost more than the work.
        blocks = await asyncio.to_thread(self._blocks, request, loaded) if request.blocks else []
        num_placeholders = self._check_placeholders(ids, len(blocks), "blocks")
        sizes = {"text": len(ids) - num_placeholders, "image": 0, "video": 0, "audio": 0}
        for b in blocks:
            sizes[b.modality] += b.embeddings.shape[0]
        max_context = loaded.pipeline.config.limits.max_context
        params = sampling_params(
            request.sampling, self.config.default_max_new_tokens, room=max_context - sum(sizes.values())
        )
        self._check_context(sizes, params.max_new_tokens, max_context)
        if blocks:
            embeds = await asyncio.to_thread(self._assemble, loaded, ids, blocks)
        else:
            embeds = self._assemble(loaded, ids, blocks)

        state = self._state(loaded)
        rid = uuid.uuid4().hex
        stream = _Stream(loaded.tokenizer, self.config.stream_interval_ms / 1e3, start)
        wake = self._ensure_driver()
        state.streams[rid] = stream
        finished = False
        try:
            state.engine.add(rid, embeds, params)
            wake.set()
            ttft_observed = False
            while True:
                await stream.ready.wait()
                if stream.error is not None:
                    raise stream.error
                # Everything decoded since the last message goes in this one: a busy server sends fewer, larger
                # messages instead of falling behind.
                delta, ids = stream.take()
                if stream.first_token_at is not None and not ttft_observed:
                    ttft_observed = True
                    self.metrics.time_to_first_token.labels(self.SERVICE_LABEL, version).observe(
                        stream.first_token_at - start
                    )
                if stream.finish_reason is None and not (delta or (request.return_token_ids and ids)):
                    continue  # nothing to send yet (a character split across tokens)
                response = llm_pb2.GenerateResponse(text_delta=delta)
                if request.return_token_ids:
                    response.token_ids.extend(ids)
                if not stream.sent_any:
                    response.model_version = version
                stream.sent_any = True
                if stream.finish_reason is not None:
                    finished = True
                    response.finish_reason = _FINISH.get(stream.finish_reason, sampling_pb2.FINISH_REASON_STOP)
                    end = time.perf_counter()
                    timings = usage_pb2.Timings(total=duration(end - start))
                    if stream.first_token_at is not None:
                        timings.time_to_first_token.CopyFrom(duration(stream.first_token_at - start))
                        timings.decode.CopyFrom(duration(stream.last_token_at - stream.first_token_at))
                    response.usage.CopyFrom(
                        usage_pb2.Usage(
                            prompt_tokens=usage_pb2.PromptTokens(total=sum(sizes.values()), **sizes),
                            completion_tokens=stream.completion,
                            cached_blocks=sum(b.cache_hit for b in blocks),
                            timings=timings,
                        )
                    )
                    yield response
                    return
                yield response
        finally:
            stream.close()
            state.streams.pop(rid, None)
            if not finished:  # cancelled (client gone, deadline) or failed: free the cache row now
                state.engine.abort(rid)
                wake.set()

    @grpc_method
    async def CountTokens(
        self, request: llm_pb2.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> llm_pb2.CountTokensResponse:
        loaded = await self.registry.aget(request.model_version)
        ids = self._prompt_ids(request, loaded)
        placeholders = self._check_placeholders(ids, len(request.block_num_tokens), "block_num_tokens")
        text = len(ids) - placeholders
        prompt = text + sum(request.block_num_tokens)
        max_context = loaded.pipeline.config.limits.max_context
        return llm_pb2.CountTokensResponse(
            model_version=loaded.version,
            text_tokens=text,
            num_placeholders=placeholders,
            prompt_tokens=prompt,
            max_context=max_context,
            fits=prompt + request.max_new_tokens <= max_context,
        )


def add_to_server(server: grpc.aio.Server, servicer: LLMServicer, health_servicer: Any = None) -> Any:
    """Register the LLM service and its grpc.health.v1 status on ``server``; returns the health servicer."""
    llm_pb2_grpc.add_LLMServiceServicer_to_server(servicer, server)
    return servicer.attach_health(server, health_servicer)
