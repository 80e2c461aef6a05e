"""The speech synthesis backend interface, and what every backend shares: input checks, voice choice, PCM chunking.

A backend turns one utterance (typically one sentence of the answer) into a stream of ``PcmChunk``: signed 16-bit
little-endian mono PCM at the requested rate, the last chunk flagged ``is_last``. It raises:
- ``TTSInputError`` (a ``ValueError``, gRPC INVALID_ARGUMENT) for bad input, naming the field and the limit;
- ``BackendUnavailable`` (gRPC FAILED_PRECONDITION) when it cannot run (an executable, package or model missing).
Neither this module nor any backend imports grpc: the servicer maps ``grpc_code`` to a status.
"""

from __future__ import annotations

import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

MIN_SPEED, MAX_SPEED = 0.5, 2.0
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 48000
AUTO_VOICE = "auto"


class BackendUnavailable(RuntimeError):
    """The backend cannot run here: its executable, package or model directory is missing or unusable."""

    grpc_code = "FAILED_PRECONDITION"

    def __init__(self, backend: str, reason: str) -> None:
        self.backend = backend
        self.reason = reason
        super().__init__(f"TTS backend {backend!r} is unavailable: {reason}")


class TTSInputError(ValueError):
    """A synthesis request is invalid; ``field`` names the request field at fault."""

    grpc_code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class SynthesisError(RuntimeError):
    """The backend failed while synthesizing valid input (gRPC INTERNAL)."""

    grpc_code = "INTERNAL"


@dataclass(frozen=True)
class Voice:
    """A voice a backend offers."""

    id: str  # what to pass as ``voice``
    name: str  # human-readable
    languages: tuple[str, ...] = ()  # BCP-47-like tags, main language first
    gender: str = ""  # "male", "female" or "" (unknown)


@dataclass(frozen=True)
class PcmChunk:
    """A piece of an utterance: PCM16 little-endian mono ``data`` at ``sample_rate`` Hz."""

    data: bytes
    sample_rate: int
    index: int  # 0-based position in the utterance
    is_last: bool

    @property
    def num_samples(self) -> int:
        return len(self.data) // 2

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.sample_rate


def text_language(text: str) -> str:
    """The language family of ``text`` by script: ``"zh"`` when Han characters outnumber Latin words, else ``"en"``.

    Mixed text such as "我是Ola" counts as Chinese: Mandarin voices read Latin words as English.
    """
    han = sum(1 for c in text if unicodedata.name(c, "").startswith("CJK UNIFIED IDEOGRAPH"))
    if han == 0:
        return "en"
    latin_words = sum(1 for w in "".join(c if c.isascii() and c.isalpha() else " " for c in text).split())
    return "zh" if han >= latin_words else "en"


class TTSBackend(ABC):
    """A speech synthesizer. Implementations are safe to call from several threads at once."""

    name: str = ""

    def __init__(
        self, sample_rate: int = 24000, default_voice: str = AUTO_VOICE, chunk_ms: int = 100, max_text_chars: int = 2000
    ) -> None:
        check_sample_rate(sample_rate, "sample_rate")
        if not 10 <= chunk_ms <= 1000:
            raise ValueError(f"chunk_ms must be in [10, 1000], got {chunk_ms}")
        if max_text_chars < 1:
            raise ValueError(f"max_text_chars must be >= 1, got {max_text_chars}")
        self._sample_rate = sample_rate
        self.default_voice = default_voice
        self.chunk_ms = chunk_ms
        self.max_text_chars = max_text_chars

    @property
    def sample_rate(self) -> int:
        """The default output rate in Hz."""
        return self._sample_rate

    @abstractmethod
    def voices(self) -> list[Voice]:
        """The voices on offer, sorted by id."""

    @abstractmethod
    def _validate_voice(self, voice: str) -> str:
        """The canonical id of ``voice`` (not ``auto``), or ``TTSInputError`` naming it."""

    @abstractmethod
    def _auto_voice(self, language: str) -> str:
        """The voice ``auto`` picks for a language family of ``text_language``."""

    @abstractmethod
    def _synthesize(self, text: str, voice: str, speed: float, sample_rate: int) -> Iterator[PcmChunk]:
        """Synthesize checked input (``voice`` canonical, ``speed`` and ``sample_rate`` in range)."""

    def resolve_voice(self, text: str, voice: str | None = None) -> str:
        """The voice that speaks ``text``: ``voice``, else the default; ``auto`` picks by the text's script."""
        chosen = (voice or "").strip() or self.default_voice
        if chosen.lower() == AUTO_VOICE:
            return self._auto_voice(text_language(text))
        return self._validate_voice(chosen)

    def synthesize(
        self, text: str, voice: str | None = None, speed: float = 1.0, sample_rate: int | None = None
    ) -> Iterator[PcmChunk]:
        """Speak ``text``, streaming PCM16 chunks of about ``chunk_ms`` (the last one may be shorter or empty).

        Args:
            text: the utterance; not blank, at most ``max_text_chars`` characters. Blank text is an error (a caller
                splitting an answer into sentences never has a reason to send one).
            voice: a voice id, ``None`` / ``""`` for the default, or ``auto`` to pick by the text's script.
            speed: rate relative to normal, in [0.5, 2.0]; ``0`` means 1.0.
            sample_rate: output rate in Hz, in [8000, 48000]; ``None`` / ``0`` means ``self.sample_rate``.

        Input is checked eagerly: ``TTSInputError`` raises from this call, before any audio is made.
        """
        text, voice_id, speed, rate = self.check_request(text, voice, speed, sample_rate)
        return self._synthesize(text, voice_id, speed, rate)

    def check_request(
        self, text: str, voice: str | None, speed: float, sample_rate: int | None
    ) -> tuple[str, str, float, int]:
        """Validate a request; returns (text, canonical voice, speed, sample rate) or raises ``TTSInputError``."""
        if not text or not text.strip():
            raise TTSInputError("text", "is empty; send at least one character to speak")
        if len(text) > self.max_text_chars:
            raise TTSInputError("text", f"has {len(text)} characters, over the limit of {self.max_text_chars}")
        speed = 1.0 if not speed else float(speed)
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise TTSInputError("speed", f"is {speed}, outside [{MIN_SPEED}, {MAX_SPEED}]")
        rate = int(sample_rate) if sample_rate else self.sample_rate
        check_sample_rate(rate, "sample_rate")
        return text, self.resolve_voice(text, voice), speed, rate


def check_sample_rate(rate: int, field: str) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise TTSInputError(field, f"is {rate} Hz, outside [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}]")


class PcmChunker:
    """Turns a stream of int16 sample blocks at ``in_rate`` into ``PcmChunk``s of ``chunk_ms`` at ``out_rate``.

    Resampling (soxr, streaming) is fed fixed-size blocks, so the output depends only on the samples, never on how
    they arrived (pipe reads, model chunks); and chunks are cut from the resampled stream, so concatenating them
    gives the same samples for any ``chunk_ms``.
    """

    _BLOCK = 4096  # input samples per resampler call

    def __init__(self, in_rate: int, out_rate: int, chunk_ms: int) -> None:
        self.out_rate = out_rate
        self.chunk_samples = max(1, out_rate * chunk_ms // 1000)
        self._resampler = None
        if in_rate != out_rate:
            import soxr

            self._resampler = soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality="HQ")
        self._pending_in = np.zeros(0, dtype=np.int16)
        self._pending_out = np.zeros(0, dtype=np.int16)
        self._index = 0

    def push(self, samples: np.ndarray) -> Iterator[PcmChunk]:
        """Add int16 samples; yields every full chunk now available."""
        self._pending_in = np.concatenate([self._pending_in, samples.astype(np.int16, copy=False)])
        if self._resampler is None:
            self._pending_out = np.concatenate([self._pending_out, self._pending_in])
            self._pending_in = self._pending_in[:0]
        else:
            n = len(self._pending_in) // self._BLOCK * self._BLOCK
            if n:
                blocks = [
                    self._resampler.resample_chunk(self._pending_in[k : k + self._BLOCK], last=False)
                    for k in range(0, n, self._BLOCK)
                ]
                self._pending_out = np.concatenate([self._pending_out, *blocks])
                self._pending_in = self._pending_in[n:]
        while len(self._pending_out) > self.chunk_samples:  # keep >= 1 sample back: the last chunk is never empty
            yield self._chunk(self._pending_out[: self.chunk_samples], is_last=False)
            self._pending_out = self._pending_out[self.chunk_samples :]

    def finish(self) -> Iterator[PcmChunk]:
        """End of input: yields the remaining chunks, the last flagged ``is_last`` (empty only for silence)."""
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(self._pending_in, last=True)
            self._pending_out = np.concatenate([self._pending_out, tail])
        else:
            self._pending_out = np.concatenate([self._pending_out, self._pending_in])
        self._pending_in = self._pending_in[:0]
        while len(self._pending_out) > self.chunk_samples:
            yield self._chunk(self._pending_out[: self.chunk_samples], is_last=False)
            self._pending_out = self._pending_out[self.chunk_samples :]
        yield self._chunk(self._pending_out, is_last=True)
        self._pending_out = self._pending_out[:0]

    def _chunk(self, samples: np.ndarray, is_last: bool) -> PcmChunk:
        chunk = PcmChunk(samples.astype("<i2").tobytes(), self.out_rate, self._index, is_last)
        self._index += 1
        return chunk


def float_to_int16(wave: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] to int16, clipped."""
    return (np.clip(wave, -1.0, 1.0) * 32767.0).round().astype(np.int16)
