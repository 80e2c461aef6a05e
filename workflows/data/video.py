"""Short videos of moving shapes, written as H.264 + AAC mp4 with PyAV.

Three kinds of clip, each with the fact a question asks about:

- ``direction``: 1-3 shapes, each in its own lane, sliding along one axis (left/right or up/down);
- ``count``: 1-5 identical shapes (and maybe another group) wobbling in separate grid cells;
- ``order``: 2-3 different shapes appearing one after another and staying.

The encoders are made deterministic, so the same frames and audio give the same bytes: x264 runs single-threaded and
without its lookahead (with macroblock-tree rate control and a lookahead, x264 was seen to encode the same frames
differently from run to run), FFmpeg's native AAC is deterministic, and the mp4 muxer writes no creation time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

from workflows.data.scenes import draw_shape, grid_cells
from workflows.data.world import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    noun,
    number_word,
    pick,
    pick_distinct,
)

SAMPLE_RATE = 16000
# Sides are multiples of 16 (whole macroblocks: the encoder never pads a frame).
FRAME_SIZES: tuple[tuple[int, int], ...] = ((176, 144), (192, 144), (256, 144), (256, 192), (288, 224), (320, 192))
FPS_CHOICES: tuple[int, ...] = (4, 6, 8)
MIN_FRAMES, MAX_FRAMES = 8, 24
AAC_FRAME = 1024  # samples per AAC frame
X264_OPTIONS = {"preset": "veryfast", "crf": "23", "threads": "1", "x264-params": "rc-lookahead=0:mbtree=0"}


@dataclass(frozen=True)
class Mover:
    """One shape's path: centre at frame t is ``start + velocity * t`` (+ a wobble), in pixels; hidden before
    ``appear``."""

    kind: str
    colour: str
    radius: float
    start: tuple[float, float]
    velocity: tuple[float, float] = (0.0, 0.0)
    wobble: float = 0.0
    phase: float = 0.0
    appear: int = 0


@dataclass(frozen=True)
class ClipSpec:
    """A clip: geometry, timing, background and its shapes."""

    width: int
    height: int
    fps: int
    num_frames: int
    background: str
    movers: tuple[Mover, ...] = field(default_factory=tuple)

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    @property
    def num_audio_samples(self) -> int:
        return round(self.duration * SAMPLE_RATE)


def clip_timing(rng: np.random.Generator, min_seconds: float = 2.0) -> tuple[int, int]:
    """(fps, frames) for a 2-4 s clip (longer when ``min_seconds`` asks), 8-24 frames at 4-8 fps."""
    seconds = max(float(rng.uniform(2.0, 4.0)), min_seconds)
    fps = pick(rng, FPS_CHOICES)
    if math.ceil(seconds * fps) > MAX_FRAMES:
        fps = max(1, math.floor(MAX_FRAMES / seconds))
    frames = min(MAX_FRAMES, max(MIN_FRAMES, math.ceil(seconds * fps)))
    return fps, frames


def _base(
    rng: np.random.Generator, min_seconds: float, avoid: str | None = None
) -> tuple[int, int, int, int, str, list[str]]:
    """(width, height, fps, frames, background, shape colours other than the background's and ``avoid``)."""
    width, height = pick(rng, FRAME_SIZES)
    fps, frames = clip_timing(rng, min_seconds)
    background = pick(rng, [b for b in BACKGROUNDS if b != avoid])
    colours = [c for c in COLOURS if c not in (background, avoid)]
    return width, height, fps, frames, background, colours


def direction_clip(rng: np.random.Generator, min_seconds: float = 2.0) -> tuple[ClipSpec, str, str]:
    """Shapes sliding along one axis in separate lanes; asks which way one of them moves."""
    width, height, fps, frames, background, colours = _base(rng, min_seconds)
    horizontal = bool(rng.random() < 0.5)
    n = int(rng.integers(1, 4))
    kinds, cols = pick_distinct(rng, SHAPES, n), pick_distinct(rng, colours, n)
    along, across = (width, height) if horizontal else (height, width)
    lane = across / n
    radius = min(0.09 * min(width, height), 0.4 * lane)
    movers, directions = [], []
    for i in range(n):
        sign = 1 if rng.random() < 0.5 else -1
        travel = float(rng.uniform(0.35, 0.6)) * (along - 2 * radius - 4)
        a0 = radius + 2 + float(rng.uniform(0, along - 2 * radius - 4 - travel))
        if sign < 0:
            a0 = along - a0
        c0 = (i + 0.5) * lane
        step = sign * travel / max(1, frames - 1)
        start, velocity = ((a0, c0), (step, 0.0)) if horizontal else ((c0, a0), (0.0, step))
        movers.append(Mover(kinds[i], cols[i], radius, start, velocity))
        directions.append(("right" if sign > 0 else "left") if horizontal else ("down" if sign > 0 else "up"))
    target = int(rng.integers(n))
    m = movers[target]
    question = f"Which way does the {m.colour} {m.kind} move?" if n > 1 else f"Which way does the {m.kind} move?"
    return ClipSpec(width, height, fps, frames, background, tuple(movers)), question, directions[target]


def _wobblers(rng: np.random.Generator, width: int, height: int, items: list[tuple[str, str]]) -> list[Mover]:
    """Shapes in distinct cells of a 12-cell grid, each wobbling a little inside its cell."""
    cells = grid_cells(0, 0, width, height, cells=12)
    chosen = rng.choice(len(cells), size=len(items), replace=False)
    movers = []
    for (kind, colour), c in zip(items, chosen, strict=True):
        cx, cy, side = cells[int(c)]
        radius = 0.32 * side
        movers.append(
            Mover(
                kind,
                colour,
                radius,
                (cx, cy),
                wobble=0.12 * side,
                phase=float(rng.uniform(0, 2 * math.pi)),
            )
        )
    return movers


def count_clip(rng: np.random.Generator, min_seconds: float = 2.0) -> tuple[ClipSpec, str, str]:
    """1-5 identical wobbling shapes, maybe with a second group; asks how many of the first."""
    width, height, fps, frames, background, colours = _base(rng, min_seconds)
    kinds, cols = pick_distinct(rng, SHAPES, 2), pick_distinct(rng, colours, 2)
    n = int(rng.integers(1, 6))
    items = [(kinds[0], cols[0])] * n
    other = int(rng.integers(0, 4))
    items += [(kinds[1], cols[1])] * other
    movers = _wobblers(rng, width, height, items)
    if other and rng.random() < 0.5:
        question = f"How many {cols[0]} {noun(kinds[0], 2)} are in the video?"
    elif other:
        question = f"How many {noun(kinds[0], 2)} are in the video?"
    else:
        question = pick(rng, ("How many shapes are in the video?", f"How many {noun(kinds[0], 2)} are there?"))
    return ClipSpec(width, height, fps, frames, background, tuple(movers)), question, number_word(n)


def order_clip(rng: np.random.Generator, min_seconds: float = 2.0) -> tuple[ClipSpec, str, str]:
    """2-3 different shapes appearing one after another; asks which (or which colour) comes first or last."""
    width, height, fps, frames, background, colours = _base(rng, min_seconds)
    n = int(rng.integers(2, 4))
    kinds, cols = pick_distinct(rng, SHAPES, n), pick_distinct(rng, colours, n)
    movers = _wobblers(rng, width, height, list(zip(kinds, cols, strict=True)))
    gap = frames // n
    appear = [i * gap + int(rng.integers(0, max(1, gap // 2))) for i in range(n)]
    movers = [
        Mover(m.kind, m.colour, m.radius, m.start, m.velocity, m.wobble, m.phase, a)
        for m, a in zip(movers, appear, strict=True)
    ]
    which, index = pick(rng, (("first", 0), ("last", n - 1)))
    if rng.random() < 0.5:
        question, answer = f"Which shape appears {which}?", kinds[index]
    else:
        question, answer = f"What color is the shape that appears {which}?", cols[index]
    return ClipSpec(width, height, fps, frames, background, tuple(movers)), question, answer


def scene_clip(rng: np.random.Generator, min_seconds: float = 2.0, subject: tuple[str, str] | None = None) -> ClipSpec:
    """1-3 different wobbling shapes (the picture behind a narration), the first being ``subject`` = (kind, colour)
    when given."""
    width, height, fps, frames, background, colours = _base(rng, min_seconds, avoid=subject[1] if subject else None)
    n = int(rng.integers(1, 4))
    kinds = pick_distinct(rng, [k for k in SHAPES if subject is None or k != subject[0]], n)
    items = list(zip(kinds, pick_distinct(rng, colours, n), strict=True))
    if subject is not None:
        items = [subject, *items[: n - 1]]
    return ClipSpec(width, height, fps, frames, background, tuple(_wobblers(rng, width, height, items)))


CLIP_KINDS = {"direction": direction_clip, "count": count_clip, "order": order_clip}


def sample_clip(rng: np.random.Generator, min_seconds: float = 2.0) -> tuple[ClipSpec, str, str]:
    """A random clip of any kind with its question and answer."""
    return CLIP_KINDS[pick(rng, tuple(CLIP_KINDS))](rng, min_seconds)


def render_frames(spec: ClipSpec) -> list[np.ndarray]:
    """The clip's frames, each [H, W, 3] uint8 RGB."""
    frames = []
    for t in range(spec.num_frames):
        img = Image.new("RGB", (spec.width, spec.height), BACKGROUNDS[spec.background])
        draw = ImageDraw.Draw(img)
        for m in spec.movers:
            if t < m.appear:
                continue
            angle = m.phase + 2 * math.pi * t / max(2, spec.num_frames / 2)
            x = m.start[0] + m.velocity[0] * t + m.wobble * math.cos(angle)
            y = m.start[1] + m.velocity[1] * t + m.wobble * math.sin(angle)
            draw_shape(draw, m.kind, x, y, m.radius, COLOURS[m.colour])
        frames.append(np.asarray(img))
    return frames


def write_mp4(
    path: Path, frames: list[np.ndarray], fps: int, audio: np.ndarray, sample_rate: int = SAMPLE_RATE
) -> None:
    """Encode frames (H.264, yuv420p) and a mono track (AAC) into an mp4.

    Args:
        frames: [H, W, 3] uint8 RGB frames, all the same even size.
        fps: frame rate.
        audio: [N] float32 mono samples at ``sample_rate`` (silence is zeros); N should be about len(frames) / fps s.
    """
    height, width = frames[0].shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        # One thread and no lookahead / mb-tree: see the module docstring. Processes give the parallelism.
        vstream = container.add_stream("libx264", rate=fps, options=X264_OPTIONS)
        vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
        vstream.codec_context.time_base = Fraction(1, fps)
        astream = container.add_stream("aac", rate=sample_rate)
        astream.layout = "mono"
        astream.bit_rate = 48000
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i
            container.mux(vstream.encode(frame))
        container.mux(vstream.encode(None))
        samples = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
        for start in range(0, samples.shape[0], AAC_FRAME):
            chunk = np.ascontiguousarray(samples[None, start : start + AAC_FRAME])  # (1, n): planar mono
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate = sample_rate
            frame.pts = start
            container.mux(astream.encode(frame))
        container.mux(astream.encode(None))
