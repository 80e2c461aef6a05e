"""The CosyVoice 2 backend: natural multilingual speech, enabled by configuring a local model directory.

The ``cosyvoice`` package (FunAudioLLM/CosyVoice, installed from its repository with its own dependencies) is
imported only when this backend is built, never at module import, so the platform runs without it. Anything
missing (no directory configured, a directory that is not a CosyVoice 2 model, the package not importable) raises
``BackendUnavailable`` (gRPC FAILED_PRECONDITION) with the reason and the fix.

Voices are the model's built-in speakers (``list_available_spks``) plus zero-shot prompt voices given as
``{voice_id: (prompt_wav_path, prompt_transcript)}``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from services.tts.backend import (
    AUTO_VOICE,
    BackendUnavailable,
    PcmChunk,
    PcmChunker,
    SynthesisError,
    TTSBackend,
    TTSInputError,
    Voice,
    float_to_int16,
)

log = logging.getLogger(__name__)

# Files every CosyVoice 2 model directory (CosyVoice2-0.5B) holds; checked before anything is imported or loaded.
REQUIRED_FILES = ("cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt")
PROMPT_SAMPLE_RATE = 16000  # CosyVoice's prompt speech rate
MODULE = "cosyvoice.cli.cosyvoice"


def check_model_dir(model_dir: str | Path | None) -> Path:
    """The model directory as a Path, or ``BackendUnavailable`` saying what is missing."""
    if not model_dir:
        raise BackendUnavailable(
            "cosyvoice", "no model directory is configured; set model_dir to a local CosyVoice 2 model directory"
        )
    path = Path(model_dir)
    if not path.is_dir():
        raise BackendUnavailable("cosyvoice", f"the model directory {path} does not exist or is not a directory")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise BackendUnavailable(
            "cosyvoice", f"{path} is not a CosyVoice 2 model directory: missing {', '.join(missing)}"
        )
    return path


def import_cosyvoice2() -> type:
    """The ``CosyVoice2`` class, or ``BackendUnavailable`` when the package cannot be imported."""
    try:
        module = importlib.import_module(MODULE)
    except Exception as e:  # ImportError, or a dependency failing at import time
        raise BackendUnavailable(
            "cosyvoice",
            f"the `cosyvoice` package cannot be imported ({type(e).__name__}: {e}); install CosyVoice 2 from its "
            "repository (FunAudioLLM/CosyVoice) with its requirements, or use the espeak backend",
        ) from e
    cls = getattr(module, "CosyVoice2", None)
    if cls is None:
        raise BackendUnavailable("cosyvoice", f"{MODULE} has no CosyVoice2 class (a CosyVoice 1 install?)")
    return cls


class CosyVoiceBackend(TTSBackend):
    """Speech with a local CosyVoice 2 model (24 kHz), streamed as the model produces it."""

    name = "cosyvoice"

    def __init__(
        self,
        model_dir: str | Path | None,
        sample_rate: int = 24000,
        default_voice: str = "",
        chunk_ms: int = 100,
        max_text_chars: int = 2000,
        prompt_voices: Mapping[str, tuple[str, str]] | None = None,
        fp16: bool = False,
    ) -> None:
        super().__init__(sample_rate, default_voice, chunk_ms, max_text_chars)
        path = check_model_dir(model_dir)
        cosyvoice2 = import_cosyvoice2()
        try:
            self._model = cosyvoice2(str(path), load_jit=False, load_trt=False, fp16=fp16)
        except Exception as e:
            raise BackendUnavailable(self.name, f"loading {path} failed ({type(e).__name__}: {e})") from e
        self._model_rate = int(self._model.sample_rate)
        self._speakers = sorted(self._model.list_available_spks() or [])
        self._prompts = {vid: self._load_prompt(vid, wav, text) for vid, (wav, text) in (prompt_voices or {}).items()}
        if not self._speakers and not self._prompts:
            raise BackendUnavailable(
                self.name, f"{path} has no built-in speakers; configure prompt_voices (voice id -> wav and transcript)"
            )
        if not default_voice or default_voice.lower() == AUTO_VOICE:
            self.default_voice = (self._speakers or sorted(self._prompts))[0]
        elif default_voice not in self._speakers and default_voice not in self._prompts:
            raise ValueError(f"default_voice {default_voice!r} is not a speaker or prompt voice of {path}")

    def _load_prompt(self, voice_id: str, wav_path: str, transcript: str):
        import soundfile
        import soxr
        import torch

        try:
            wave, rate = soundfile.read(wav_path, dtype="float32", always_2d=True)
        except Exception as e:
            raise BackendUnavailable(self.name, f"prompt voice {voice_id!r}: cannot read {wav_path}: {e}") from e
        mono = wave.mean(axis=1)
        if rate != PROMPT_SAMPLE_RATE:
            mono = soxr.resample(mono, rate, PROMPT_SAMPLE_RATE)
        return transcript, torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))[None]  # (1, T)

    def voices(self) -> list[Voice]:
        return sorted((Voice(v, v) for v in [*self._speakers, *self._prompts]), key=lambda v: v.id)

    def _validate_voice(self, voice: str) -> str:
        if voice in self._speakers or voice in self._prompts:
            return voice
        raise TTSInputError("voice", f"{voice!r} is not a CosyVoice speaker or prompt voice; ListVoices lists them")

    def _auto_voice(self, language: str) -> str:
        return self.default_voice  # multilingual: one voice speaks every language

    def _synthesize(self, text: str, voice: str, speed: float, sample_rate: int) -> Iterator[PcmChunk]:
        chunker = PcmChunker(self._model_rate, sample_rate, self.chunk_ms)
        # CosyVoice keeps per-call state keyed by a fresh uuid, so concurrent calls need no lock here.
        if voice in self._prompts:
            transcript, prompt = self._prompts[voice]
            pieces = self._model.inference_zero_shot(text, transcript, prompt, stream=True, speed=speed)
        else:
            pieces = self._model.inference_sft(text, voice, stream=True, speed=speed)
        try:
            for piece in pieces:
                speech = piece["tts_speech"]  # torch (1, T) float in [-1, 1]
                wave = speech.detach().float().cpu().numpy().reshape(-1)
                yield from chunker.push(float_to_int16(wave))
        except (KeyError, AttributeError, TypeError) as e:
            raise SynthesisError(f"unexpected CosyVoice output: {type(e).__name__}: {e}") from e
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()  # stop the model's generator at once when the consumer stopped early
        yield from chunker.finish()
