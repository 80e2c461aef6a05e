"""The synthetic world's vocabulary: colours, shapes, positions, numbers, words, and the task list.

The vocabulary is small and regular on purpose: the tiny model's 1000-token BPE (``ola_model.tokenizer._WORDS``) was
trained on words like these, so answers are one or two tokens and exact-match accuracy is meaningful.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")

# Task names of the data format (docs/data-format.md), in a fixed order used for plans and tables.
TASKS: tuple[str, ...] = (
    "image_qa",
    "caption",
    "ocr",
    "asr",
    "spoken_image_qa",
    "sound_qa",
    "video_qa",
    "video_audio_qa",
)
SPEECH_TASKS = frozenset({"asr", "spoken_image_qa", "video_audio_qa"})  # the tasks that need espeak-ng
DEFAULT_MIX: dict[str, float] = {
    "image_qa": 0.25,
    "caption": 0.10,
    "ocr": 0.10,
    "asr": 0.15,
    "spoken_image_qa": 0.05,
    "sound_qa": 0.10,
    "video_qa": 0.10,
    "video_audio_qa": 0.15,
}
SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_SPLITS: dict[str, float] = {"train": 0.90, "val": 0.05, "test": 0.05}

# Shape colours, chosen to be far apart so a colour name is never a judgement call.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "orange": (245, 130, 30),
    "purple": (140, 60, 180),
    "pink": (240, 120, 190),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "gray": (165, 165, 165),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "ring", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "diamond": "diamonds",
    "ring": "rings",
    "cross": "crosses",
}
POSITIONS: tuple[str, ...] = ("left", "top", "center", "bottom", "right")  # also the caption order
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
SIZES: tuple[str, ...] = ("small", "big")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
NUMBER_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
)
# Words rendered for OCR and used as "secret words" in narrations: short, lowercase, mostly from the tiny BPE's list.
WORDS: tuple[str, ...] = (
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "pink",
    "black",
    "white",
    "circle",
    "square",
    "star",
    "ring",
    "heart",
    "line",
    "dot",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "hello",
    "world",
    "ola",
    "music",
    "sound",
    "voice",
    "video",
    "image",
    "photo",
    "word",
    "text",
    "yes",
    "no",
    "good",
    "true",
    "false",
    "left",
    "right",
    "up",
    "down",
    "fast",
    "slow",
    "big",
    "small",
    "high",
    "low",
    "loud",
    "quiet",
    "model",
    "answer",
    "scene",
    "frame",
    "clip",
    "tone",
)
NAMES: tuple[str, ...] = ("bob", "anna", "tom", "max", "sam", "lily", "kim", "leo", "mia", "ben")


def number_word(n: int) -> str:
    """``3`` -> ``"three"`` (0..15)."""
    if not 0 <= n < len(NUMBER_WORDS):
        raise ValueError(f"number {n} is outside the vocabulary (0..{len(NUMBER_WORDS) - 1})")
    return NUMBER_WORDS[n]


def noun(kind: str, count: int) -> str:
    """The shape noun, plural unless ``count`` is 1."""
    return kind if count == 1 else PLURALS[kind]


def pick(rng: np.random.Generator, items: Sequence[T]) -> T:
    """One element of ``items``, uniformly."""
    return items[int(rng.integers(len(items)))]


def pick_distinct(rng: np.random.Generator, items: Sequence[T], k: int) -> list[T]:
    """``k`` different elements of ``items`` in random order."""
    return [items[int(i)] for i in rng.choice(len(items), size=k, replace=False)]


def sentence_case(text: str) -> str:
    """Capitalise the first letter (questions read as sentences; answers stay lowercase)."""
    return text[:1].upper() + text[1:]
