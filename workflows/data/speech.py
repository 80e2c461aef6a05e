"""Speech with espeak-ng: several English voices, speeds and pitches, resampled to 16 kHz mono float32.

espeak-ng is deterministic for a given text, voice, speed and pitch, so spoken samples are reproducible. Its WAV goes
to stdout (no temporary files) and is resampled with librosa's soxr_hq, the resampler Ola's audio loader uses.
"""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf

from workflows.data.errors import SynthError
from workflows.data.world import (
    COLOURS,
    NAMES,
    POSITION_PHRASES,
    SHAPES,
    WORDS,
    noun,
    number_word,
    pick,
)

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
ESPEAK = "espeak-ng"
ESPEAK_APT_PACKAGE = "espeak-ng"
# English voices of the stock Debian espeak-ng-data (no mbrola), with two voice variants for some timbre spread.
VOICES: tuple[str, ...] = (
    "en-us",
    "en-us+f3",
    "en-gb",
    "en-gb-x-rp",
    "en-gb-scotland",
    "en-029",
    "en-us+m3",
    "en+f4",
)
SPEED_RANGE = (130, 190)  # words per minute
PITCH_RANGE = (30, 70)  # espeak-ng's 0..99 scale


@dataclass(frozen=True)
class Voice:
    """How espeak-ng speaks one utterance."""

    name: str
    speed: int
    pitch: int


def sample_voice(rng: np.random.Generator) -> Voice:
    return Voice(
        pick(rng, VOICES),
        int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1)),
        int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
    )


def espeak_path() -> str:
    """The espeak-ng executable.

    Raises:
        SynthError: when espeak-ng is not installed, naming the Debian package to install.
    """
    exe = shutil.which(ESPEAK)
    if exe is None:
        raise SynthError(
            f"{ESPEAK} is not installed or not on PATH; it speaks the asr, spoken_image_qa and video_audio_qa "
            f"samples. Install the Debian package: apt-get install -y {ESPEAK_APT_PACKAGE} (or run `make system`)"
        )
    return exe


def espeak_version() -> str:
    """espeak-ng's version line, e.g. "eSpeak NG text-to-speech: 1.51 ..."."""
    out = subprocess.run([espeak_path(), "--version"], capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.strip()


def speak(text: str, voice: Voice, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Speak ``text`` with espeak-ng.

    Returns:
        [N] float32 mono waveform at ``sample_rate`` Hz, peak about 0.7.

    Raises:
        SynthError: when espeak-ng is missing, fails, or returns no audio.
    """
    if not text.strip() or text.lstrip().startswith("-"):
        raise SynthError(f"cannot speak {text!r}: empty or starts with '-'")
    cmd = [espeak_path(), "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "--stdout", text]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=60, check=True)
    except subprocess.CalledProcessError as exc:
        raise SynthError(f"espeak-ng failed on {text!r} ({voice}): {exc.stderr.decode(errors='replace')}") from exc
    except subprocess.TimeoutExpired as exc:
        raise SynthError(f"espeak-ng timed out on {text!r} ({voice})") from exc
    # espeak-ng streams a WAV with placeholder sizes; libsndfile reads it up to the end of the data.
    data, rate = sf.read(io.BytesIO(done.stdout), dtype="float32", always_2d=True)
    wav = data.mean(axis=1)
    if wav.size == 0 or not np.any(wav):
        raise SynthError(f"espeak-ng returned no audio for {text!r} ({voice})")
    if rate != sample_rate:
        wav = librosa.resample(wav, orig_sr=rate, target_sr=sample_rate, res_type="soxr_hq")
    peak = float(np.max(np.abs(wav)))
    return (wav * (0.7 / peak)).astype(np.float32)


def speech_clip(text: str, rng: np.random.Generator) -> np.ndarray:
    """``text`` in a random voice, with random level, a little silence around it and a faint noise floor.

    The level, padding and noise make every clip unique, even when the same sentence meets the same voice twice
    (which would otherwise put identical audio in train and test).

    Returns:
        [N] float32 mono waveform at 16 kHz.
    """
    wav = speak(text, sample_voice(rng)) * float(rng.uniform(0.6, 1.2))
    lead, tail = (int(rng.uniform(0.05, 0.3) * SAMPLE_RATE) for _ in range(2))
    wav = np.concatenate([np.zeros(lead, np.float32), wav, np.zeros(tail, np.float32)])
    return (wav + rng.standard_normal(wav.shape[0]) * 5e-4).astype(np.float32)


def write_wav(path: Path, wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write [N] float samples as 16-bit PCM mono WAV (no timestamps or other varying metadata)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(wav, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")


def asr_sentence(rng: np.random.Generator) -> str:
    """A sentence of the small grammar, lowercase without punctuation (the ASR target, scored by WER)."""
    colour, kind = pick(rng, tuple(COLOURS)), pick(rng, SHAPES)
    n = int(rng.integers(1, 11))
    template = int(rng.integers(8))
    if template == 0:
        return f"the {colour} {kind} is {pick(rng, tuple(POSITION_PHRASES.values()))}"
    if template == 1:
        return f"there {'is' if n == 1 else 'are'} {number_word(n)} {colour} {noun(kind, n)}"
    if template == 2:
        return f"the number is {number_word(n)}"
    if template == 3:
        return f"i see {number_word(n)} {noun(kind, n)} and a {pick(rng, tuple(COLOURS))} {pick(rng, SHAPES)}"
    if template == 4:
        return f"the {kind} moves {pick(rng, ('left', 'right', 'up', 'down'))}"
    if template == 5:
        return f"the {colour} {kind} is named {pick(rng, NAMES)}"
    if template == 6:
        return f"please read the word {pick(rng, WORDS)}"
    return f"the {colour} {kind} is {pick(rng, ('big', 'small'))}"
