"""A small Python client of the platform: ``OlaClient`` streams a Chat turn through Serve's gRPC proxy.

    with OlaClient("127.0.0.1:9000") as client:
        for event in client.chat("What is in the picture?", images=["cat.png"], speak=True):
            if event.HasField("text_delta"):
                print(event.text_delta.text, end="", flush=True)
        # or all at once:
        result = client.ask("And now?", images=["cat.png"], speak=True, session_id=result.session_id)
        result.speech.write_wav("answer.wav")

Events are ``ola.omni.v1.ChatResponse`` messages in stream order (``started``, ``text_delta`` / ``audio_chunk``,
``warning``, ``usage``, ``final``). A failed call raises :class:`OlaError` with the gRPC code and the server's
``ErrorDetail`` (reason, field, value and limit). Media are paths, bytes (sent inline) or ``s3://`` URIs.

This module needs only grpcio, protobuf and the generated stubs (no torch); the readiness helpers
(:meth:`OlaClient.list_applications`, :meth:`OlaClient.wait_ready`) also import Ray Serve's generated stubs.
"""

from __future__ import annotations

import time
import wave
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.deadline import timeout_metadata
from services.gen.ola.common.v1 import errors_pb2, media_pb2, sampling_pb2, usage_pb2
from services.gen.ola.omni.v1 import omni_pb2, omni_pb2_grpc

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
ERROR_DETAIL_KEY = "ola-error-detail-bin"  # as services.wire (not imported: it needs torch)
Media = str | Path | bytes | media_pb2.MediaRef

_MIME_BY_SUFFIX = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".mov": "video/quicktime",
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".m4a": "audio/mp4",
}


def read_error_detail(trailing_metadata: Iterable[tuple[str, Any]] | None) -> errors_pb2.ErrorDetail | None:
    """The ``ErrorDetail`` in a failed call's trailing metadata, if any."""
    for key, value in trailing_metadata or ():
        if key == ERROR_DETAIL_KEY and isinstance(value, bytes):
            return errors_pb2.ErrorDetail.FromString(value)
    return None


class OlaError(Exception):
    """A call that ended with a non-OK gRPC status.

    Attributes:
        code: the ``grpc.StatusCode``.
        detail: the server's ``ola.common.v1.ErrorDetail`` (None if it sent none).
        message: the status message.
    """

    def __init__(self, code: grpc.StatusCode, message: str, detail: errors_pb2.ErrorDetail | None = None) -> None:
        self.code = code
        self.message = message
        self.detail = detail
        super().__init__(self._describe())

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> OlaError:
        code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
        details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
        trailing = exc.trailing_metadata() if callable(getattr(exc, "trailing_metadata", None)) else None
        return cls(code, details or "", read_error_detail(trailing))

    @property
    def reason(self) -> str:
        """The ErrorReason name (``ERROR_REASON_MEDIA_CORRUPT``), or "" without a detail."""
        return errors_pb2.ErrorReason.Name(self.detail.reason) if self.detail is not None else ""

    def _describe(self) -> str:
        text = f"{self.code.name}: {self.message}"
        d = self.detail
        if d is not None:
            extra = [self.reason] if d.reason else []
            if d.field:
                extra.append(f"field {d.field}")
            if d.limit:
                extra.append(f"value {d.value:g} over the limit {d.limit:g} {d.unit}".rstrip())
            if extra:
                text += f" ({', '.join(extra)})"
        return text


def media_ref(item: Media, mime_type: str = "") -> media_pb2.MediaRef:
    """A ``MediaRef``: bytes inline, ``s3://`` URIs by reference, anything else a local file read inline."""
    if isinstance(item, media_pb2.MediaRef):
        return item
    if isinstance(item, bytes | bytearray | memoryview):
        return media_pb2.MediaRef(inline_data=bytes(item), mime_type=mime_type)
    text = str(item)
    if text.startswith("s3://"):
        return media_pb2.MediaRef(uri=text, mime_type=mime_type)
    path = Path(text)
    return media_pb2.MediaRef(
        inline_data=path.read_bytes(), mime_type=mime_type or _MIME_BY_SUFFIX.get(path.suffix.lower(), "")
    )


def sampling(
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    max_new_tokens: int | None = None,
    seed: int | None = None,
) -> sampling_pb2.SamplingParams:
    """``SamplingParams`` with only the given fields set (the rest take the server's defaults)."""
    values = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "repetition_penalty": repetition_penalty,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
    }
    return sampling_pb2.SamplingParams(**{k: v for k, v in values.items() if v is not None})


# ------------------------------------------------------------------------------------------------ results
@dataclass
class Speech:
    """The spoken answer: sentence chunks concatenated in order, PCM16 little-endian mono at ``sample_rate_hz``."""

    sample_rate_hz: int = 0
    pcm16: bytearray = field(default_factory=bytearray)
    sentences: list[str] = field(default_factory=list)

    def add(self, chunk: omni_pb2.SpeechChunk) -> None:
        rate = chunk.audio.sample_rate_hz
        if self.sample_rate_hz and rate and rate != self.sample_rate_hz:
            raise ValueError(f"speech chunks at {rate} Hz after {self.sample_rate_hz} Hz; one rate per answer")
        self.sample_rate_hz = self.sample_rate_hz or rate
        if len(self.sentences) <= chunk.sentence_index:  # every chunk of a sentence carries its text; keep it once
            self.sentences.append(chunk.sentence_text)
        self.pcm16 += chunk.audio.pcm16

    @property
    def duration_s(self) -> float:
        return len(self.pcm16) / 2 / self.sample_rate_hz if self.sample_rate_hz else 0.0

    def write_wav(self, path: str | Path) -> Path:
        """Write a 16-bit mono WAV; ``ValueError`` when there is no speech."""
        if not self.sample_rate_hz or not self.pcm16:
            raise ValueError("the answer has no speech (ask with speak=True)")
        path = Path(path)
        tmp = path.with_name(path.name + ".part")
        with wave.open(str(tmp), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(self.sample_rate_hz)
            out.writeframes(bytes(self.pcm16))
        tmp.replace(path)  # never a half-written file under the real name
        return path


@dataclass
class ChatResult:
    """A whole Chat turn, collected from its events (:func:`collect`)."""

    text: str = ""
    session_id: str = ""
    request_id: str = ""
    model_version: str = ""
    turn_index: int = 0
    finish_reason: str = ""  # STOP, LENGTH, CONTEXT, CANCELLED
    usage: usage_pb2.Usage | None = None
    warnings: list[omni_pb2.ChatWarning] = field(default_factory=list)
    speech: Speech = field(default_factory=Speech)
    events: int = 0


def collect(events: Iterable[omni_pb2.ChatResponse]) -> ChatResult:
    """Fold a Chat event stream into a :class:`ChatResult` (text deltas joined, speech chunks concatenated)."""
    result = ChatResult()
    parts: list[str] = []
    for ev in events:
        result.events += 1
        kind = ev.WhichOneof("event")
        if kind == "started":
            result.session_id = ev.started.session_id
            result.request_id = ev.started.request_id
            result.model_version = ev.started.model_version
            result.turn_index = ev.started.turn_index
        elif kind == "text_delta":
            parts.append(ev.text_delta.text)
        elif kind == "audio_chunk":
            result.speech.add(ev.audio_chunk)
        elif kind == "warning":
            result.warnings.append(ev.warning)
        elif kind == "usage":
            result.usage = ev.usage
        elif kind == "final":
            result.finish_reason = sampling_pb2.FinishReason.Name(ev.final.finish_reason).removeprefix("FINISH_REASON_")
    result.text = "".join(parts)
    return result


# ------------------------------------------------------------------------------------------------ client
class OlaClient:
    """The omni gateway (or any platform application) behind Serve's gRPC proxy at ``target`` (``host:port``).

    Args:
        target: the proxy's address.
        application: the Serve application of the gateway (metadata ``("application", name)``).
        timeout: seconds a call may take (the gRPC deadline).
        metadata: extra metadata sent with every call.
    """

    def __init__(
        self,
        target: str,
        application: str = "omni",
        timeout: float = 300.0,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.target = target
        self.application = application
        self.timeout = timeout
        self._metadata = (("application", application), *tuple(metadata))
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.stub = omni_pb2_grpc.OmniServiceStub(self.channel)

    def __enter__(self) -> OlaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    # -------------------------------------------------------------------------------------------- chat
    def request(
        self,
        text: str = "",
        images: Sequence[Media] = (),
        video: Media | None = None,
        audio: Media | None = None,
        session_id: str = "",
        speak: bool = False,
        sampling: sampling_pb2.SamplingParams | None = None,
        voice: str = "",
        sample_rate_hz: int = 0,
        model_version: str = "",
        system_prompt: str = "",
        spoken_question: bool = False,
        max_video_frames: int = 0,
        request_id: str = "",
    ) -> omni_pb2.ChatRequest:
        """The ``ChatRequest`` that :meth:`chat` sends (media read here)."""
        outputs = [omni_pb2.OUTPUT_MODALITY_TEXT]
        if speak:
            outputs.append(omni_pb2.OUTPUT_MODALITY_AUDIO)
        req = omni_pb2.ChatRequest(
            request_id=request_id,
            session_id=session_id,
            model_version=model_version,
            text=text,
            images=[media_ref(i) for i in images],
            spoken_question=spoken_question,
            max_video_frames=max_video_frames,
            output_modalities=outputs,
            speech=omni_pb2.SpeechOptions(voice=voice, sample_rate_hz=sample_rate_hz),
            system_prompt=system_prompt,
        )
        if video is not None:
            req.video.CopyFrom(media_ref(video))
        if audio is not None:
            req.audio.CopyFrom(media_ref(audio))
        if sampling is not None:
            req.sampling.CopyFrom(sampling)
        return req

    def chat(self, text: str = "", **kw: Any) -> Iterator[omni_pb2.ChatResponse]:
        """Stream one turn's events (arguments as :meth:`request`). Raises :class:`OlaError` on failure.

        A failed stream's last message only carries its status (Serve's proxy needs one): it is dropped here.
        """
        metadata = (*self._metadata, *timeout_metadata(self.timeout))  # the deadline survives Serve's proxy
        call = self.stub.Chat(self.request(text, **kw), timeout=self.timeout, metadata=metadata)
        held: omni_pb2.ChatResponse | None = None  # a warning waits for the next event: it may be the status carrier
        try:
            for event in call:
                if held is not None:
                    yield held
                    held = None
                if event.WhichOneof("event") == "warning":
                    held = event
                elif event.WhichOneof("event") is not None:
                    yield event
        except grpc.RpcError as exc:
            error = OlaError.from_rpc(exc)
            if held is not None and not (error.detail is not None and held.warning.detail == error.detail):
                yield held
            raise error from None
        finally:
            call.cancel()  # a consumer that stops early ends the server's work
        if held is not None:
            yield held

    def ask(self, text: str = "", **kw: Any) -> ChatResult:
        """:meth:`chat` collected into a :class:`ChatResult`."""
        return collect(self.chat(text, **kw))

    # -------------------------------------------------------------------------------------------- sessions
    def _unary(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise OlaError.from_rpc(exc) from None

    def get_session(self, session_id: str) -> omni_pb2.Session:
        return self._unary(self.stub.GetSession, omni_pb2.GetSessionRequest(session_id=session_id)).session

    def delete_session(self, session_id: str, allow_missing: bool = False) -> bool:
        req = omni_pb2.DeleteSessionRequest(session_id=session_id, allow_missing=allow_missing)
        return self._unary(self.stub.DeleteSession, req).deleted

    def list_model_versions(self) -> omni_pb2.ListModelVersionsResponse:
        return self._unary(self.stub.ListModelVersions, omni_pb2.ListModelVersionsRequest())

    # -------------------------------------------------------------------------------------------- readiness
    def list_applications(self, timeout: float = 5.0) -> list[str]:
        """The applications Serve's proxy routes (its built-in ``ListApplications``)."""
        from ray.serve.generated import serve_pb2, serve_pb2_grpc

        stub = serve_pb2_grpc.RayServeAPIServiceStub(self.channel)
        return list(stub.ListApplications(serve_pb2.ListApplicationsRequest(), timeout=timeout).application_names)

    def health(self, application: str | None = None, timeout: float = 5.0) -> bool:
        """grpc.health.v1 ``Check`` of an application (default: this client's) through the proxy."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        md = (("application", application or self.application),)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout, metadata=md)
        except grpc.RpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def wait_ready(self, applications: Iterable[str] = ("vision", "audio", "llm", "tts", "omni"), timeout: float = 120):
        """Block until the proxy routes every application and each answers SERVING; ``TimeoutError`` otherwise."""
        wanted = list(applications)
        deadline = time.monotonic() + timeout
        pending = list(wanted)
        while time.monotonic() < deadline:
            try:
                routed = set(self.list_applications())
            except grpc.RpcError:
                routed = set()
            pending = [a for a in wanted if a not in routed or not self.health(a)]
            if not pending:
                return
            time.sleep(0.2)
        raise TimeoutError(f"not ready after {timeout:.0f} s: {pending} (target {self.target})")
