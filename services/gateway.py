"""The omni gateway: one ``Chat`` stream of text deltas and sentence-wise speech over four backend services.

For each request the gateway:

1. pins one model version (the request's, else the session's, else the router's choice) for every service it calls;
2. runs the encoders concurrently (images or video on the vision service; audio, or the video's own audio track, on
   the audio service);
3. builds the conversation (session history + the user turn with Ola's placeholder layout) and streams the LLM;
4. cuts the text into sentences as it streams (English and Chinese punctuation) and hands each finished sentence to
   TTS while the LLM goes on, sending audio chunks in sentence order;
5. ends with a usage event and a final event. A deadline bounds every backend call; a client that goes away cancels
   the LLM and TTS calls at once.

The gateway reaches the services through :class:`Backends`: gRPC stubs (:class:`GrpcBackends`) or, inside Ray Serve,
deployment handles. Both speak the same request / response protos, so this module does not care which.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from google.protobuf.duration_pb2 import Duration

from ola_model.prompt import user_content
from services.deadline import timeout_from_metadata
from services.gen.ola.audio.v1 import audio_pb2, audio_pb2_grpc
from services.gen.ola.common.v1 import embedding_pb2, errors_pb2, sampling_pb2, usage_pb2
from services.gen.ola.llm.v1 import llm_pb2, llm_pb2_grpc
from services.gen.ola.omni.v1 import omni_pb2, omni_pb2_grpc
from services.gen.ola.tts.v1 import tts_pb2, tts_pb2_grpc
from services.gen.ola.vision.v1 import vision_pb2, vision_pb2_grpc
from services.sessions import InProcessSessionStore, SessionStore, new_session, touch
from services.text.sentences import SentenceSplitter
from services.wire import error_detail, error_metadata, read_error_detail

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # embedding blocks of long videos are large (bf16 64 frames ~ 100 MB)
_ROLE = {"user": llm_pb2.ROLE_USER, "assistant": llm_pb2.ROLE_ASSISTANT, "system": llm_pb2.ROLE_SYSTEM}


class GatewayError(Exception):
    """A request failure with its gRPC status code and error detail (passed through from a backend or our own)."""

    def __init__(self, code: grpc.StatusCode, detail: errors_pb2.ErrorDetail) -> None:
        super().__init__(detail.message)
        self.code = code
        self.detail = detail

    @classmethod
    def invalid(cls, field_name: str, message: str) -> GatewayError:
        return cls(
            grpc.StatusCode.INVALID_ARGUMENT,
            error_detail(errors_pb2.ERROR_REASON_INVALID_FIELD, message, field=field_name),
        )

    @classmethod
    def from_rpc(cls, exc: grpc.aio.AioRpcError, service: str) -> GatewayError:
        detail = read_error_detail(exc.trailing_metadata()) or error_detail(
            errors_pb2.ERROR_REASON_UNSPECIFIED, exc.details() or ""
        )
        if not detail.message:
            detail.message = exc.details() or ""
        detail.message = f"{service}: {detail.message}"
        code = exc.code()
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            code = grpc.StatusCode.UNAVAILABLE  # a failing replica: the request fails, the gateway goes on
        return cls(code, detail)


# Failures the client caused (bad input, an unknown version, a session pinned to another version): they do not count
# against a model version in a canary. FAILED_PRECONDITION does when a backend cannot load the version.
_CLIENT_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)


def _version_at_fault(exc: GatewayError) -> bool:
    if exc.code == grpc.StatusCode.FAILED_PRECONDITION:
        return exc.detail.reason == errors_pb2.ERROR_REASON_BACKEND_UNAVAILABLE
    return exc.code not in _CLIENT_CODES


class Backends(Protocol):
    """How the gateway reaches the services. ``timeout`` is seconds left of the client's deadline (None: none)."""

    async def encode_images(self, req: vision_pb2.EncodeImagesRequest, timeout: float | None): ...

    async def encode_video(self, req: vision_pb2.EncodeVideoRequest, timeout: float | None): ...

    async def encode_audio(self, req: audio_pb2.EncodeAudioRequest, timeout: float | None): ...

    def generate(self, req: llm_pb2.GenerateRequest, timeout: float | None) -> AsyncIterator: ...

    def synthesize(self, req: tts_pb2.SynthesizeRequest, timeout: float | None) -> AsyncIterator: ...


def grpc_target(address: str) -> str:
    """A gRPC target for an address: ``host:port``, any gRPC target URI (``dns:///svc:9000``), or a comma-separated
    list of IPv4 ``host:port`` (several replicas of a service, balanced round robin)."""
    if "," in address and "://" not in address and not address.startswith("ipv4:"):
        return "ipv4:" + ",".join(a.strip() for a in address.split(","))
    return address


class GrpcBackends:
    """Backends behind gRPC addresses (:func:`grpc_target`; calls are spread round robin over every address a
    target resolves to); ``metadata`` is sent with every call (e.g. Serve's app name)."""

    def __init__(
        self,
        vision: str,
        audio: str,
        llm: str,
        tts: str,
        metadata: dict[str, tuple[tuple[str, str], ...]] | None = None,
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.lb_policy_name", "round_robin"),
        ]
        self._channels = {
            name: grpc.aio.insecure_channel(grpc_target(addr), options=options)
            for name, addr in {"vision": vision, "audio": audio, "llm": llm, "tts": tts}.items()
        }
        self._vision = vision_pb2_grpc.VisionEncoderServiceStub(self._channels["vision"])
        self._audio = audio_pb2_grpc.AudioEncoderServiceStub(self._channels["audio"])
        self._llm = llm_pb2_grpc.LLMServiceStub(self._channels["llm"])
        self._tts = tts_pb2_grpc.TTSServiceStub(self._channels["tts"])
        self._md = metadata or {}

    async def encode_images(self, req, timeout):
        return await self._vision.EncodeImages(req, timeout=timeout, metadata=self._md.get("vision"))

    async def encode_video(self, req, timeout):
        return await self._vision.EncodeVideo(req, timeout=timeout, metadata=self._md.get("vision"))

    async def encode_audio(self, req, timeout):
        return await self._audio.EncodeAudio(req, timeout=timeout, metadata=self._md.get("audio"))

    def generate(self, req, timeout):
        return self._llm.Generate(req, timeout=timeout, metadata=self._md.get("llm"))

    def synthesize(self, req, timeout):
        return self._tts.Synthesize(req, timeout=timeout, metadata=self._md.get("tts"))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


@dataclass
class GatewayConfig:
    default_model_version: str = "demo"
    session_ttl_s: float = 3600.0
    max_history_turns: int = 16  # earlier text turns replayed into the prompt
    sentence_min_chars: int = 8  # very short fragments are merged into the next sentence before TTS
    speech_sample_rate_hz: int = 24000
    known_versions: list[str] = field(default_factory=list)  # empty: whatever the services accept


@dataclass
class _Clock:
    start: float = field(default_factory=time.perf_counter)
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.perf_counter() - self.start)


def _seconds(d: float) -> Duration:
    out = Duration()
    out.FromNanoseconds(int(d * 1e9))
    return out


class OmniGateway:
    """Transport-independent Chat logic. ``router(session_id) -> version`` picks a version for new sessions."""

    def __init__(
        self,
        backends: Backends,
        config: GatewayConfig | None = None,
        sessions: SessionStore | None = None,
        router: Callable[[str], str] | None = None,
        metrics=None,
        recorder=None,
    ) -> None:
        self.backends = backends
        self.config = config or GatewayConfig()
        self.sessions = sessions or InProcessSessionStore(self.config.session_ttl_s)
        self.router = router or (lambda session_id: self.config.default_model_version)
        self.metrics = metrics
        self.recorder = recorder  # services.rollout.RolloutRecorder: each turn's outcome per version (canary)

    # ------------------------------------------------------------------------------------------------- chat
    async def chat(
        self, req: omni_pb2.ChatRequest, deadline: float | None = None
    ) -> AsyncIterator[omni_pb2.ChatResponse]:
        """Stream the events of one turn. ``deadline`` is a ``time.monotonic()`` instant (None: no deadline).

        With a ``recorder``, the turn's outcome is recorded for its model version when it ends or fails on the
        server's side (errors the client caused, and clients that go away, are not the version's doing).
        """
        if self.recorder is None:
            async for ev in self._chat(req, deadline):
                yield ev
            return
        start = time.perf_counter()
        version, ttft = "", None
        try:
            async for ev in self._chat(req, deadline):
                if ev.HasField("started"):
                    version = ev.started.model_version
                elif ev.HasField("usage") and ev.usage.timings.HasField("time_to_first_token"):
                    ttft = ev.usage.timings.time_to_first_token.ToNanoseconds() / 1e9
                yield ev
        except GatewayError as exc:
            if version and _version_at_fault(exc):
                self.recorder.record(version, False, time.perf_counter() - start)
            raise
        except Exception:
            if version:
                self.recorder.record(version, False, time.perf_counter() - start)
            raise
        self.recorder.record(version, True, time.perf_counter() - start, ttft)

    async def _chat(
        self, req: omni_pb2.ChatRequest, deadline: float | None = None
    ) -> AsyncIterator[omni_pb2.ChatResponse]:
        clock = _Clock()
        seq = 0

        def event(**kw) -> omni_pb2.ChatResponse:
            nonlocal seq
            seq += 1
            return omni_pb2.ChatResponse(sequence=seq - 1, **kw)

        def remaining() -> float | None:
            if deadline is None:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise GatewayError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    error_detail(errors_pb2.ERROR_REASON_UNSPECIFIED, "deadline exceeded in the gateway"),
                )
            return left

        self._validate(req)
        request_id = req.request_id or uuid.uuid4().hex
        session = await self._session(req)
        version = session.model_version
        yield event(
            started=omni_pb2.ChatStarted(
                request_id=request_id,
                session_id=session.session_id,
                model_version=version,
                turn_index=len(session.turns),
            )
        )

        blocks, modalities = await self._encode(req, request_id, version, remaining, clock)
        messages = self._messages(req, session, blocks, modalities)
        want_audio = omni_pb2.OUTPUT_MODALITY_AUDIO in req.output_modalities
        gen_req = llm_pb2.GenerateRequest(
            request_id=request_id,
            model_version=version,
            conversation=llm_pb2.Conversation(messages=messages),
            blocks=blocks,
            sampling=req.sampling if req.HasField("sampling") else sampling_pb2.SamplingParams(),
        )
        out: asyncio.Queue = asyncio.Queue()
        sentences: asyncio.Queue = asyncio.Queue()
        done = object()
        state = {
            "text": [],
            "finish": sampling_pb2.FINISH_REASON_UNSPECIFIED,
            "usage": None,
            "n_sentences": 0,
            "audio_s": 0.0,
        }

        async def run_llm() -> None:
            splitter = SentenceSplitter(min_chars=self.config.sentence_min_chars)
            try:
                async for resp in self.backends.generate(gen_req, remaining()):
                    if resp.text_delta:
                        clock.mark("first_token")
                        state["text"].append(resp.text_delta)
                        await out.put(event(text_delta=omni_pb2.TextDelta(text=resp.text_delta)))
                        if want_audio:
                            for s in splitter.feed(resp.text_delta):
                                await sentences.put(s)
                    if resp.finish_reason:
                        state["finish"] = resp.finish_reason
                    if resp.HasField("usage"):
                        state["usage"] = resp.usage
            except grpc.aio.AioRpcError as exc:
                raise GatewayError.from_rpc(exc, "llm") from exc
            finally:
                if want_audio:
                    for s in splitter.flush():
                        await sentences.put(s)
                    await sentences.put(None)
            clock.mark("decode_done")

        async def run_tts() -> None:
            speech = req.speech
            index = 0
            while (sentence := await sentences.get()) is not None:
                tts_req = tts_pb2.SynthesizeRequest(
                    request_id=f"{request_id}/{index}",
                    model_version=version,
                    text=sentence,
                    voice=speech.voice or "auto",
                    speed=speech.speed or 1.0,
                    sample_rate_hz=speech.sample_rate_hz or self.config.speech_sample_rate_hz,
                )
                try:
                    async for resp in self.backends.synthesize(tts_req, remaining()):
                        chunk = resp.chunk
                        if not chunk.pcm16 and not chunk.is_last:
                            continue  # a status carrier (Serve ends failed streams with an empty message)
                        clock.mark("first_audio")
                        state["audio_s"] += len(chunk.pcm16) / 2 / max(chunk.sample_rate_hz, 1)
                        await out.put(
                            event(
                                audio_chunk=omni_pb2.SpeechChunk(
                                    sentence_index=index, sentence_text=sentence, audio=chunk
                                )
                            )
                        )
                except grpc.aio.AioRpcError as exc:
                    # Speech is best effort: the text answer goes on; the client learns which sentence is missing.
                    err = GatewayError.from_rpc(exc, "tts")
                    log.warning("request %s: sentence %d not spoken: %s", request_id, index, err)
                    await out.put(event(warning=omni_pb2.ChatWarning(detail=err.detail, sentence_index=index)))
                index += 1
            state["n_sentences"] = index

        async def pump(coro) -> None:
            try:
                await coro
            except BaseException as exc:  # delivered to the consumer below, in order
                await out.put(exc)
                raise
            finally:
                await out.put(done)

        tasks = [asyncio.create_task(pump(run_llm()))]
        if want_audio:
            tasks.append(asyncio.create_task(pump(run_tts())))
        try:
            finished = 0
            while finished < len(tasks):
                item = await out.get()
                if item is done:
                    finished += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:  # client gone, deadline, or an error: stop the LLM and TTS work now
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t

        text = "".join(state["text"])
        usage = self._usage(state, clock)
        if self.metrics is not None:
            self.metrics.observe_chat(version, clock.marks)  # services.metrics.ServiceMetrics
        yield event(usage=usage)
        yield event(
            final=omni_pb2.ChatFinal(finish_reason=state["finish"], text=text, num_sentences=state["n_sentences"])
        )
        turn = omni_pb2.Turn(
            index=len(session.turns),
            user_text=req.text,
            user_media=modalities,
            assistant_text=text,
            finish_reason=state["finish"],
            usage=usage,
        )
        turn.create_time.GetCurrentTime()
        session.turns.append(turn)
        touch(session, self.config.session_ttl_s)
        await self.sessions.put(session)

    # ------------------------------------------------------------------------------------------------ parts
    def _validate(self, req: omni_pb2.ChatRequest) -> None:
        if req.images and req.HasField("video"):
            raise GatewayError.invalid("images", "a request takes images or one video, not both")
        if req.spoken_question and not (req.HasField("audio") and (req.images or req.HasField("video"))):
            raise GatewayError.invalid("spoken_question", "a spoken question needs audio and an image or video")
        if not (req.text or req.images or req.HasField("video") or req.HasField("audio")):
            raise GatewayError.invalid("text", "the request has no text and no media")
        known = self.config.known_versions
        if req.model_version and known and req.model_version not in known:
            raise GatewayError(
                grpc.StatusCode.NOT_FOUND,
                error_detail(
                    errors_pb2.ERROR_REASON_UNKNOWN_MODEL_VERSION,
                    f"unknown model version {req.model_version!r}; known: {known}",
                    field="model_version",
                ),
            )

    async def _session(self, req: omni_pb2.ChatRequest) -> omni_pb2.Session:
        session_id = req.session_id or uuid.uuid4().hex
        session = await self.sessions.get(session_id) if req.session_id else None
        if session is None:
            version = req.model_version or self.router(session_id)
            return new_session(session_id, version, req.system_prompt, self.config.session_ttl_s)
        if req.model_version and req.model_version != session.model_version:
            raise GatewayError(
                grpc.StatusCode.FAILED_PRECONDITION,
                error_detail(
                    errors_pb2.ERROR_REASON_VERSION_MISMATCH,
                    f"session {session_id} runs model version {session.model_version!r}, "
                    f"not {req.model_version!r}; start a new session to switch",
                    field="model_version",
                ),
            )
        return session

    async def _encode(self, req, request_id, version, remaining, clock) -> tuple[list, list]:
        """Run the encoders concurrently. Returns blocks (vision first, then speech) and the user's modalities."""
        calls: dict[str, asyncio.Task] = {}
        b = self.backends
        if req.images:
            calls["images"] = asyncio.ensure_future(
                b.encode_images(
                    vision_pb2.EncodeImagesRequest(request_id=request_id, model_version=version, images=req.images),
                    remaining(),
                )
            )
        if req.HasField("video"):
            calls["video"] = asyncio.ensure_future(
                b.encode_video(
                    vision_pb2.EncodeVideoRequest(
                        request_id=request_id, model_version=version, video=req.video, max_frames=req.max_video_frames
                    ),
                    remaining(),
                )
            )
        audio_ref = req.audio if req.HasField("audio") else None
        from_video = audio_ref is None and req.HasField("video") and not req.ignore_video_audio
        if audio_ref is not None or from_video:
            calls["audio"] = asyncio.ensure_future(
                b.encode_audio(
                    audio_pb2.EncodeAudioRequest(
                        request_id=request_id, model_version=version, audio=audio_ref or req.video
                    ),
                    remaining(),
                )
            )
        results: dict[str, object] = {}
        try:
            for name, task in calls.items():
                try:
                    results[name] = await task
                except grpc.aio.AioRpcError as exc:
                    service = "audio" if name == "audio" else "vision"
                    err = GatewayError.from_rpc(exc, service)
                    if name == "audio" and from_video and exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        # A video without a usable audio track is still a video question.
                        log.info("request %s: video audio track not used: %s", request_id, err)
                        continue
                    raise err from exc
        finally:
            for task in calls.values():
                task.cancel()
        clock.mark("encoded")
        blocks: list[embedding_pb2.EmbeddingBlock] = []
        modalities = []
        if "images" in results:
            blocks += list(results["images"].blocks)
            modalities.append(embedding_pb2.MODALITY_IMAGE)
        if "video" in results:
            blocks.append(results["video"].block)
            modalities.append(embedding_pb2.MODALITY_VIDEO)
        if "audio" in results:
            blocks.append(results["audio"].block)
            modalities.append(embedding_pb2.MODALITY_AUDIO)
        for blk in blocks:
            if blk.model_version and blk.model_version != version:
                raise GatewayError(
                    grpc.StatusCode.INTERNAL,
                    error_detail(
                        errors_pb2.ERROR_REASON_VERSION_MISMATCH,
                        f"an encoder answered with version {blk.model_version!r}, not {version!r}",
                    ),
                )
        return blocks, modalities

    def _messages(self, req, session, blocks, modalities) -> list[llm_pb2.ChatMessage]:
        messages = []
        system = session.system_prompt or req.system_prompt
        if system:
            messages.append(llm_pb2.ChatMessage(role=llm_pb2.ROLE_SYSTEM, content=system))
        for turn in list(session.turns)[-self.config.max_history_turns :]:
            messages.append(llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content=turn.user_text))
            messages.append(llm_pb2.ChatMessage(role=llm_pb2.ROLE_ASSISTANT, content=turn.assistant_text))
        n_images = sum(1 for b in blocks if b.modality == embedding_pb2.MODALITY_IMAGE)
        content = user_content(
            req.text,
            num_images=n_images,
            video=embedding_pb2.MODALITY_VIDEO in modalities,
            audio=embedding_pb2.MODALITY_AUDIO in modalities,
            spoken_question=req.spoken_question,
        )
        messages.append(llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content=content))
        return messages

    def _usage(self, state, clock: _Clock) -> usage_pb2.Usage:
        usage = usage_pb2.Usage()
        if state["usage"] is not None:
            usage.CopyFrom(state["usage"])
        usage.audio_output_seconds = state["audio_s"]
        t = usage.timings
        m = clock.marks
        if "encoded" in m:
            t.media_decode.CopyFrom(_seconds(m["encoded"]))
        if "first_token" in m:
            t.time_to_first_token.CopyFrom(_seconds(m["first_token"]))
        if "first_audio" in m:
            t.time_to_first_audio.CopyFrom(_seconds(m["first_audio"]))
        t.total.CopyFrom(_seconds(time.perf_counter() - clock.start))
        return usage

    # --------------------------------------------------------------------------------------------- sessions
    async def get_session(self, session_id: str) -> omni_pb2.Session:
        session = await self.sessions.get(session_id)
        if session is None:
            raise GatewayError(
                grpc.StatusCode.NOT_FOUND,
                error_detail(
                    errors_pb2.ERROR_REASON_SESSION_NOT_FOUND, f"no session {session_id!r}", field="session_id"
                ),
            )
        return session


def _earliest(*timeouts: float | None) -> float | None:
    known = [t for t in timeouts if t is not None]
    return min(known) if known else None


class OmniServicer(omni_pb2_grpc.OmniServiceServicer):
    """``ola.omni.v1.OmniService`` over grpc.aio, around an :class:`OmniGateway`."""

    def __init__(self, gateway: OmniGateway) -> None:
        self.gateway = gateway

    async def Chat(self, request, context):
        """The earlier of the call's deadline and the client's ``x-ola-timeout-ms`` (which survives Serve's proxy)."""
        try:
            remaining = _earliest(context.time_remaining(), timeout_from_metadata(context.invocation_metadata()))
        except ValueError as exc:
            reason = errors_pb2.ERROR_REASON_INVALID_FIELD
            await _abort(context, GatewayError(grpc.StatusCode.INVALID_ARGUMENT, error_detail(reason, str(exc))))
        deadline = time.monotonic() + remaining if remaining is not None else None
        try:
            async for ev in self.gateway.chat(request, deadline):
                yield ev
        except GatewayError as exc:
            await _abort(context, exc)

    async def GetSession(self, request, context):
        try:
            return omni_pb2.GetSessionResponse(session=await self.gateway.get_session(request.session_id))
        except GatewayError as exc:
            await _abort(context, exc)

    async def DeleteSession(self, request, context):
        deleted = await self.gateway.sessions.delete(request.session_id)
        if not deleted and not request.allow_missing:
            await _abort(
                context,
                GatewayError(
                    grpc.StatusCode.NOT_FOUND,
                    error_detail(
                        errors_pb2.ERROR_REASON_SESSION_NOT_FOUND,
                        f"no session {request.session_id!r}",
                        field="session_id",
                    ),
                ),
            )
        return omni_pb2.DeleteSessionResponse(deleted=deleted)

    async def ListModelVersions(self, request, context):
        cfg = self.gateway.config
        versions = cfg.known_versions or [cfg.default_model_version]
        return omni_pb2.ListModelVersionsResponse(
            versions=[omni_pb2.ModelVersionInfo(model_version=v) for v in versions],
            default_model_version=cfg.default_model_version,
        )


async def _abort(context, exc: GatewayError):
    context.set_trailing_metadata(error_metadata(exc.detail))
    await context.abort(exc.code, exc.detail.message)
