"""Non-speech sounds synthesized with numpy: 1-5 tones, chords or noise bursts with nameable properties.

A clip is ``count`` identical events of one ``kind`` (tone / chord / noise), at a ``pitch`` (high / low: the tone's
or chord root's frequency, or the noise band), and a ``tempo`` (fast / slow: event length and gap), over a faint hiss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from workflows.data.world import number_word, pick

SAMPLE_RATE = 16000
SOUND_KINDS: tuple[str, ...] = ("tone", "chord", "noise")
PITCH_RANGES = {"low": (160.0, 330.0), "high": (1100.0, 2200.0)}  # tone frequency / chord root, Hz
NOISE_BANDS = {"low": (60.0, 500.0), "high": (2500.0, 6000.0)}  # noise band, Hz
TEMPOS = {"fast": ((0.10, 0.18), (0.08, 0.15)), "slow": ((0.30, 0.45), (0.35, 0.55))}  # (event s, gap s) ranges
EVENT_NOUNS = {"tone": "beeps", "chord": "chords", "noise": "bursts"}


@dataclass(frozen=True)
class SoundSpec:
    """What a sound clip contains (everything a question can ask about)."""

    kind: str
    pitch: str
    count: int
    tempo: str


def sample_sound_spec(rng: np.random.Generator, max_count: int = 5) -> SoundSpec:
    return SoundSpec(
        pick(rng, SOUND_KINDS),
        pick(rng, ("low", "high")),
        int(rng.integers(1, max_count + 1)),
        pick(rng, ("fast", "slow")),
    )


def _envelope(n: int, sample_rate: int) -> np.ndarray:
    """Flat with 10 ms raised-cosine edges, so events do not click."""
    ramp = min(n // 2, int(0.01 * sample_rate))
    env = np.ones(n, dtype=np.float64)
    if ramp > 0:
        edge = 0.5 - 0.5 * np.cos(np.linspace(0.0, math.pi, ramp))
        env[:ramp] = edge
        env[n - ramp :] = edge[::-1]
    return env


def _event(spec: SoundSpec, freq: float, n: int, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    t = np.arange(n) / sample_rate
    if spec.kind == "tone":
        x = np.sin(2 * math.pi * freq * t)
    elif spec.kind == "chord":  # a major triad: root, major third, fifth
        x = sum(np.sin(2 * math.pi * freq * ratio * t) for ratio in (1.0, 1.26, 1.5)) / 3
    else:  # band-limited noise: zero the spectrum outside the band
        lo, hi = NOISE_BANDS[spec.pitch]
        spectrum = np.fft.rfft(rng.standard_normal(n))
        freqs = np.fft.rfftfreq(n, 1 / sample_rate)
        spectrum[(freqs < lo) | (freqs > hi)] = 0
        x = np.fft.irfft(spectrum, n)
        x /= max(1e-9, float(np.max(np.abs(x))))
    return x * _envelope(n, sample_rate)


def event_times(spec: SoundSpec, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> list[tuple[int, int]]:
    """(start, length) in samples of each event, after a short lead-in."""
    (e_lo, e_hi), (g_lo, g_hi) = TEMPOS[spec.tempo]
    start = int(rng.uniform(0.1, 0.35) * sample_rate)
    events = []
    for _ in range(spec.count):
        n = int(rng.uniform(e_lo, e_hi) * sample_rate)
        events.append((start, n))
        start += n + int(rng.uniform(g_lo, g_hi) * sample_rate)
    return events


def render_sounds(
    spec: SoundSpec, rng: np.random.Generator, num_samples: int | None = None, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """The clip of ``spec``: its events over a faint hiss.

    Args:
        num_samples: clip length; None for the events plus a short tail. Events that would not fit are an error.

    Returns:
        [N] float32 mono waveform, peak about 0.3-0.7.
    """
    events = event_times(spec, rng, sample_rate)
    end = events[-1][0] + events[-1][1]
    if num_samples is None:
        num_samples = end + int(rng.uniform(0.15, 0.4) * sample_rate)
    if end > num_samples:
        raise ValueError(f"{spec} needs {end} samples but the clip has {num_samples}")
    lo, hi = PITCH_RANGES[spec.pitch]
    freq = float(rng.uniform(lo, hi))
    gain = float(rng.uniform(0.3, 0.7))
    out = rng.standard_normal(num_samples) * 0.002
    for start, n in events:
        out[start : start + n] += gain * _event(spec, freq, n, rng, sample_rate)
    return out.astype(np.float32)


def sound_question(spec: SoundSpec, rng: np.random.Generator) -> tuple[str, str]:
    """A question about the clip and its short answer."""
    options = ["count", "count", "pitch", "kind"] + (["tempo"] if spec.count > 1 else [])
    what = pick(rng, options)
    if what == "count":
        if rng.random() < 0.5:
            return "How many sounds are there?", number_word(spec.count)
        return f"How many {EVENT_NOUNS[spec.kind]} do you hear?", number_word(spec.count)
    if what == "pitch":
        return "Is the sound high or low?", spec.pitch
    if what == "kind":
        return "Is it a tone, a chord or noise?", spec.kind
    return "Are the sounds fast or slow?", spec.tempo
