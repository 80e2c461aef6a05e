"""The ``ola.tts.v1.TTSService`` gRPC servicer around a ``TTSBackend``, and a standalone server with health and
reflection.

Errors map to status codes with an ``ErrorDetail`` trailer (``services.wire.ERROR_DETAIL_KEY``):
``TTSInputError`` -> INVALID_ARGUMENT, an unknown model version -> NOT_FOUND, ``BackendUnavailable`` ->
FAILED_PRECONDITION (a backend that cannot be built still lets the server start: every call then answers
FAILED_PRECONDITION with the reason, and health reports NOT_SERVING), ``SynthesisError`` -> INTERNAL.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping
from concurrent import futures
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.errors import UnknownModelVersion, status_of
from services.gen.ola.common.v1 import audio_chunk_pb2
from services.gen.ola.tts.v1 import tts_pb2, tts_pb2_grpc
from services.tts.backend import BackendUnavailable, SynthesisError, TTSBackend, TTSInputError
from services.tts.registry import TTSConfig, make_backend
from services.wire import error_metadata

log = logging.getLogger(__name__)

SERVICE_NAME = tts_pb2.DESCRIPTOR.services_by_name["TTSService"].full_name  # "ola.tts.v1.TTSService"


def _abort(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    code, detail = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("TTS request failed", exc_info=exc)
    context.set_trailing_metadata(error_metadata(detail))
    context.abort(code, detail.message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


class TTSServicer(tts_pb2_grpc.TTSServiceServicer):
    """Serves one backend. ``model_versions``: the versions this deployment serves (None: any)."""

    def __init__(
        self,
        backend: TTSBackend | None,
        unavailable: BackendUnavailable | None = None,
        model_versions: Collection[str] | None = None,
    ) -> None:
        if (backend is None) == (unavailable is None):
            raise ValueError("give either a backend or the reason it is unavailable")
        self.backend = backend
        self.unavailable = unavailable
        self.model_versions = model_versions

    @classmethod
    def from_config(
        cls, config: TTSConfig | Mapping[str, Any] | None = None, model_versions: Collection[str] | None = None
    ) -> TTSServicer:
        """Build the configured backend; if it cannot run here, serve FAILED_PRECONDITION with the reason."""
        try:
            return cls(make_backend(config), model_versions=model_versions)
        except BackendUnavailable as e:
            log.error("%s", e)
            return cls(None, unavailable=e, model_versions=model_versions)

    def _ready(self, model_version: str) -> TTSBackend:
        if self.model_versions is not None and model_version and model_version not in self.model_versions:
            raise UnknownModelVersion(
                f"{model_version!r} is not served here; served: {sorted(self.model_versions)}", field="model_version"
            )
        if self.backend is None:
            assert self.unavailable is not None
            raise self.unavailable
        return self.backend

    def Synthesize(
        self, request: tts_pb2.SynthesizeRequest, context: grpc.ServicerContext
    ) -> Iterator[tts_pb2.SynthesizeResponse]:
        try:
            backend = self._ready(request.model_version)
            text, voice, speed, rate = backend.check_request(
                request.text, request.voice, request.speed, request.sample_rate_hz
            )
        except (TTSInputError, UnknownModelVersion, BackendUnavailable) as e:
            _abort(context, e)
        stream = backend.synthesize(text, voice, speed, rate)
        try:
            for chunk in stream:
                if not context.is_active():  # client gone or deadline passed: stop synthesizing now
                    return
                pcm = audio_chunk_pb2.AudioChunk(
                    pcm16=chunk.data, sample_rate_hz=chunk.sample_rate, chunk_index=chunk.index, is_last=chunk.is_last
                )
                yield tts_pb2.SynthesizeResponse(chunk=pcm, voice=voice if chunk.index == 0 else "")
        except (SynthesisError, BackendUnavailable) as e:
            _abort(context, e)
        finally:
            stream.close()

    def ListVoices(
        self, request: tts_pb2.ListVoicesRequest, context: grpc.ServicerContext
    ) -> tts_pb2.ListVoicesResponse:
        try:
            backend = self._ready("")
        except BackendUnavailable as e:
            _abort(context, e)
        language = request.language.strip().lower()
        voices = [
            tts_pb2.Voice(id=v.id, name=v.name, languages=list(v.languages), gender=v.gender)
            for v in backend.voices()
            if not language or any(lang == language or lang.startswith(language + "-") for lang in v.languages)
        ]
        return tts_pb2.ListVoicesResponse(
            voices=voices, default_voice=backend.default_voice, backend=backend.name, sample_rate_hz=backend.sample_rate
        )


def build_server(servicer: TTSServicer, address: str = "127.0.0.1:0", max_workers: int = 8) -> tuple[grpc.Server, int]:
    """A started gRPC server with the TTS service, grpc.health.v1 and reflection; returns it and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    tts_pb2_grpc.add_TTSServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    status = health_pb2.HealthCheckResponse.SERVING if servicer.backend else health_pb2.HealthCheckResponse.NOT_SERVING
    health_servicer.set(SERVICE_NAME, status)
    health_servicer.set("", status)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    server.start()
    return server, port
