"""Choosing and building the TTS backend from a small typed config (validated before anything loads)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from services.tts.backend import AUTO_VOICE, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, TTSBackend

BackendName = Literal["espeak", "cosyvoice"]
EspeakEngine = Literal["auto", "library", "process"]


@dataclass(frozen=True)
class TTSConfig:
    """How the TTS service speaks.

    Attributes:
        backend: ``espeak`` (default, installed by the setup) or ``cosyvoice`` (needs ``model_dir`` and the
            ``cosyvoice`` package).
        model_dir: local CosyVoice 2 model directory (cosyvoice only).
        sample_rate: default output rate in Hz, in [8000, 48000].
        default_voice: voice of requests that name none; ``auto`` picks by the text's script (espeak: ``cmn`` for
            Chinese, ``en-us`` otherwise; cosyvoice: its first speaker).
        chunk_ms: duration of each streamed PCM chunk, in milliseconds.
        max_text_chars: longest text one request may ask to speak.
        prompt_voices: cosyvoice zero-shot voices, ``{voice_id: (prompt_wav_path, prompt_transcript)}``.
        espeak_engine: espeak only: ``library`` (in-process libespeak-ng, no program start per sentence),
            ``process`` (the ``espeak-ng`` program per request) or ``auto`` (the library where it loads).
    """

    backend: BackendName = "espeak"
    model_dir: str | None = None
    sample_rate: int = 24000
    default_voice: str = AUTO_VOICE
    chunk_ms: int = 100
    max_text_chars: int = 2000
    prompt_voices: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    espeak_engine: EspeakEngine = "auto"

    def __post_init__(self) -> None:
        if self.backend not in get_args(BackendName):
            raise ValueError(f"backend must be one of {get_args(BackendName)}, got {self.backend!r}")
        if not MIN_SAMPLE_RATE <= self.sample_rate <= MAX_SAMPLE_RATE:
            raise ValueError(f"sample_rate must be in [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}], got {self.sample_rate}")
        if not 10 <= self.chunk_ms <= 1000:
            raise ValueError(f"chunk_ms must be in [10, 1000], got {self.chunk_ms}")
        if self.max_text_chars < 1:
            raise ValueError(f"max_text_chars must be >= 1, got {self.max_text_chars}")
        if self.espeak_engine not in get_args(EspeakEngine):
            raise ValueError(f"espeak_engine must be one of {get_args(EspeakEngine)}, got {self.espeak_engine!r}")
        if self.backend != "espeak" and self.espeak_engine != "auto":
            raise ValueError(f"espeak_engine is an espeak setting; backend is {self.backend!r}")
        if self.backend != "cosyvoice" and (self.model_dir or self.prompt_voices):
            raise ValueError(f"model_dir and prompt_voices are cosyvoice settings; backend is {self.backend!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TTSConfig:
        """Build from plain data (YAML / JSON); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TTS config keys {unknown}; known: {sorted(known)}")
        values = dict(data)
        if "prompt_voices" in values:
            values["prompt_voices"] = {k: tuple(v) for k, v in values["prompt_voices"].items()}
        return cls(**values)


def make_backend(config: TTSConfig | Mapping[str, Any] | None = None) -> TTSBackend:
    """Build the configured backend. Raises ``BackendUnavailable`` when it cannot run here."""
    if config is None:
        config = TTSConfig()
    elif not isinstance(config, TTSConfig):
        config = TTSConfig.from_dict(config)
    common = {
        "sample_rate": config.sample_rate,
        "default_voice": config.default_voice,
        "chunk_ms": config.chunk_ms,
        "max_text_chars": config.max_text_chars,
    }
    if config.backend == "cosyvoice":
        from services.tts.cosyvoice import CosyVoiceBackend

        return CosyVoiceBackend(config.model_dir, prompt_voices=config.prompt_voices, **common)
    from services.tts.espeak import EspeakBackend

    return EspeakBackend(engine=config.espeak_engine, **common)
