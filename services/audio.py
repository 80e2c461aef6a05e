"""The ``ola.audio.v1.AudioEncoderService`` servicer (grpc.aio): audio, or a video's audio track, to a speech block.

The clip is decoded (libsndfile, then FFmpeg for mp3 / m4a / the audio track of a video; raw PCM by its
``audio/L16;rate=...;channels=...`` media type, little-endian as the contract says), resampled to 16 kHz mono, cut
into 30 s chunks (at most the model config's ``limits.max_audio_chunks``), and all chunks go through Whisper + BEATs
+ the speech projector as one batch (:meth:`ola_model.model.OlaModel.encode_audio`). The block has 2 + 151 positions
per chunk. Outputs are cached like the vision encoder's.

Construction::

    servicer = AudioEncoderServicer.from_config({"registry": {...}, "cache": {...}})
    add_to_server(server, servicer)
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import grpc
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ola_model.errors import LimitError
from ola_model.processing.audio import (
    CHUNK_SAMPLES,
    SAMPLE_RATE,
    AudioFeatures,
    decode_audio_array,
    load_audio,
    process_audio,
)
from services.cache import CacheConfig, CachedBlock, cache_key
from services.errors import InvalidArgument, at_field, grpc_method
from services.gen.ola.audio.v1 import audio_pb2, audio_pb2_grpc
from services.gen.ola.common.v1 import embedding_pb2, errors_pb2, usage_pb2
from services.media import MediaConfig, ResolvedMedia
from services.registry import LoadedModel, RegistryConfig
from services.vision import EncoderServicerBase, duration, output_dtype

log = logging.getLogger(__name__)

SERVICE_NAME = audio_pb2.DESCRIPTOR.services_by_name["AudioEncoderService"].full_name


class AudioServiceConfig(BaseModel):
    """Everything an :class:`AudioEncoderServicer` is built from (validated before any model loads)."""

    model_config = ConfigDict(extra="forbid")

    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    media: MediaConfig = Field(default_factory=MediaConfig)
    encode_threads: int = Field(1, ge=1, description="Encoder calls running at once (others wait their turn).")


def parse_pcm_type(mime_type: str) -> tuple[int, int] | None:
    """(rate, channels) of a raw PCM media type ``audio/L16;rate=R;channels=C``; None for any other type.

    Raises:
        InvalidArgument: an L16 type without a valid rate or channel count (field ``audio.mime_type``).
    """
    parts = [p.strip() for p in mime_type.split(";")]
    if parts[0].lower() != "audio/l16":
        return None
    params = {}
    for part in parts[1:]:
        name, _, value = part.partition("=")
        params[name.strip().lower()] = value.strip()
    try:
        rate = int(params["rate"])
        channels = int(params.get("channels", "1"))
    except (KeyError, ValueError):
        raise InvalidArgument(
            f"raw PCM needs `audio/L16;rate=<Hz>;channels=<n>`, got {mime_type!r}", field="audio.mime_type"
        ) from None
    if not 1000 <= rate <= 384000 or not 1 <= channels <= 32:
        raise InvalidArgument(
            f"raw PCM rate {rate} Hz or {channels} channels is out of range (1000..384000 Hz, 1..32 channels)",
            field="audio.mime_type",
        )
    return rate, channels


def _too_long(seconds: float, max_seconds: float) -> LimitError:
    return LimitError(
        "audio duration (seconds)", math.ceil(seconds), math.floor(max_seconds), "send a shorter recording"
    )


class AudioEncoderServicer(EncoderServicerBase, audio_pb2_grpc.AudioEncoderServiceServicer):
    """Serves EncodeAudio for the versions of its registry.

    Arguments as :class:`~services.vision.VisionEncoderServicer`.
    """

    SERVICE_NAME = SERVICE_NAME
    SERVICE_LABEL = "audio"
    config_class = AudioServiceConfig

    @grpc_method
    async def EncodeAudio(
        self, request: audio_pb2.EncodeAudioRequest, context: grpc.aio.ServicerContext
    ) -> audio_pb2.EncodeAudioResponse:
        loaded = await self.registry.aget(request.model_version)
        dtype = output_dtype(request.output_dtype, loaded.model.dtype)
        if not request.HasField("audio"):
            raise InvalidArgument("an audio item is needed", field="audio")
        pcm = parse_pcm_type(request.audio.mime_type)
        media = await self.media.resolve(request.audio, "audio")
        decode_s = media.fetch_seconds
        max_chunks = loaded.pipeline.config.limits.max_audio_chunks
        params = {"max_chunks": max_chunks, "sample_rate": SAMPLE_RATE, "pcm": list(pcm) if pcm else None}
        key = cache_key(loaded.version, media.sha256, "audio", params, dtype)
        block = await self._lookup(key, "audio")
        hit, encode_s = block is not None, 0.0
        if block is None:
            start = time.perf_counter()
            features = await asyncio.to_thread(self._decode, media, pcm, max_chunks)
            decode_s += time.perf_counter() - start
            tensor, encode_s = await self._encode("audio", self._encode_audio, loaded, features, dtype)
            meta = {"duration_s": features.num_samples / SAMPLE_RATE, "num_chunks": features.num_chunks}
            block = CachedBlock(tensor, meta)
            await self.cache.put(key, block)
        return audio_pb2.EncodeAudioResponse(
            model_version=loaded.version,
            block=self.block_proto(block.embeddings, embedding_pb2.MODALITY_AUDIO, loaded.version, hit),
            duration_s=block.meta["duration_s"],
            num_chunks=block.meta["num_chunks"],
            timings=usage_pb2.Timings(media_decode=duration(decode_s), audio_encode=duration(encode_s)),
        )

    @staticmethod
    def _decode(media: ResolvedMedia, pcm: tuple[int, int] | None, max_chunks: int) -> AudioFeatures:
        max_seconds = max_chunks * CHUNK_SAMPLES / SAMPLE_RATE
        with at_field("audio"):
            if pcm is None:
                wav = load_audio(media.data, max_seconds=max_seconds)  # stops decoding once over the limit
            else:
                rate, channels = pcm
                if len(media.data) % (2 * channels):
                    raise InvalidArgument(
                        f"raw PCM of {len(media.data)} bytes is not whole 16-bit samples of {channels} channels",
                        reason=errors_pb2.ERROR_REASON_MEDIA_CORRUPT,
                    )
                samples = np.frombuffer(media.data, dtype="<i2").reshape(-1, channels)
                if samples.shape[0] > max_seconds * rate:
                    raise _too_long(samples.shape[0] / rate, max_seconds)
                wav = decode_audio_array(samples, rate)
            return process_audio(wav, max_chunks=max_chunks)

    @staticmethod
    def _encode_audio(loaded: LoadedModel, features: AudioFeatures, dtype: torch.dtype) -> torch.Tensor:
        model = loaded.model
        dev = model.device
        block = model.encode_audio(features.mel.to(dev), features.wav_chunks.to(dev))  # all chunks, one batch
        return block.to(device="cpu", dtype=dtype)


def add_to_server(server: grpc.aio.Server, servicer: AudioEncoderServicer, health_servicer: Any = None) -> Any:
    """Register the audio service and its grpc.health.v1 status on ``server``; returns the health servicer."""
    audio_pb2_grpc.add_AudioEncoderServiceServicer_to_server(servicer, server)
    return servicer.attach_health(server, health_servicer)
